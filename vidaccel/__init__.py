"""vidaccel: training-free acceleration of video diffusion transformers in JAX/Flax/Pallas."""

__version__ = "0.1.0"
