"""Tests of trainer/plan/, one file per module."""
