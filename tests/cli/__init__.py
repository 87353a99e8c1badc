"""Tests of cli/, one file per module."""
