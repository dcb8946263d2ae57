"""Evaluation: held-out loss, perplexity and generation metrics (`ift eval`)."""
