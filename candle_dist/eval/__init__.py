"""Evaluation: long-tailed metrics and plots."""
