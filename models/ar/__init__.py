"""Autoregressive (diffusion-forcing) chunk runtime: schedules, diffusion-forcing sampling, KV-cached chunk
generation (`models.ar.rollout`)."""

from models.ar.diffusion_forcing import df_sample
from models.ar.schedules import generate_timestep_matrix

__all__ = ["df_sample", "generate_timestep_matrix"]
