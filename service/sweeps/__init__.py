"""Sweeps (``/sweeps``): a grid of trainings and the trade-off table of their evaluations."""
