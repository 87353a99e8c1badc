"""Tests of cli/kube/, one file per module."""
