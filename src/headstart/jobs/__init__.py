"""Whole jobs behind the CLI and the Python API: train, evaluate, predict, inspect."""
