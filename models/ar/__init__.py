"""Autoregressive (diffusion-forcing) chunk runtime: SkyReels-V2 timestep schedules (`schedules`),
diffusion-forcing sampling over them (`diffusion_forcing`), and the KV-cached chunk rollout (`rollout`, over
the cache of `kv_cache`, with the generic compression hook of `compression`); both also on a device mesh (`mesh=`)
with the K/V split by heads."""

from models.ar.compression import CacheCompressor
from models.ar.diffusion_forcing import df_sample
from models.ar.rollout import RolloutConfig, RolloutOutput, chunk_denoiser, chunk_state_of, kv_cache_bytes, rollout
from models.ar.schedules import generate_timestep_matrix

__all__ = ["df_sample", "generate_timestep_matrix", "RolloutConfig", "RolloutOutput", "chunk_denoiser",
           "chunk_state_of", "kv_cache_bytes", "rollout", "CacheCompressor"]
