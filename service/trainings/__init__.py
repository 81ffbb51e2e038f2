"""Adversarial training jobs (``/trainings``)."""
