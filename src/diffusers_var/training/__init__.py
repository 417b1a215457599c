"""Reusable parts of the training scripts in examples/: objective, optimiser, data, EMA and checkpoints."""
