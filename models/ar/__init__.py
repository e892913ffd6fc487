"""Autoregressive (diffusion-forcing) chunk runtime: schedules, KV-cached chunk generation."""

from models.ar.schedules import generate_timestep_matrix

__all__ = ["generate_timestep_matrix"]
