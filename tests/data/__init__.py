"""Tests of trainer/data/, one file per module."""
