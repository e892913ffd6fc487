"""The Wan2.1 causal 3D VAE (diffusers' `AutoencoderKLWan`) in Flax NNX: config, model, chunked encode/decode with
an explicit per-convolution cache, latent (de)normalisation, and the checkpoint loader."""

from models.wan_vae.config import WanVAEConfig, wan21_vae, wan_vae_tiny
from models.wan_vae.loader import load_wan_vae
from models.wan_vae.model import (
    WanVAE,
    abstract_wan_vae,
    count_params,
    decode_fn,
    decode_memory_report,
    denormalize_latents,
    init_wan_vae,
    normalize_latents,
    sample_posterior,
)

__all__ = ["WanVAEConfig", "wan21_vae", "wan_vae_tiny", "load_wan_vae", "WanVAE", "abstract_wan_vae", "count_params",
           "decode_fn", "decode_memory_report", "denormalize_latents", "init_wan_vae", "normalize_latents",
           "sample_posterior"]
