"""Evaluation: weighted kNN, FLOP counts, and the baseline study."""
