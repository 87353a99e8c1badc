"""Tests of trainer/serve/, one file per module."""
