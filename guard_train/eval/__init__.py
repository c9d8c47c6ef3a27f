"""Evaluation: the eval command, the end-of-run summary, the lab benchmark."""
