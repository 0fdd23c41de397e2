"""Evaluation: classification metrics as local `evaluate` modules, and the figures of a run."""
