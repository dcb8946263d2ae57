"""Evaluation (`ift eval`): held-out loss, perplexity and generation metrics, multiple-choice
benchmarks by option log-likelihood, several models side by side, and task metrics during
training."""
