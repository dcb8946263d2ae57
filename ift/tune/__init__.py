"""Sweeps over data mixtures and hyperparameters on Ray Tune (`ift tune`), and their report."""
