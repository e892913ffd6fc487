"""FlowCache (arXiv 2602.10825) for AR chunk rollouts: chunk-wise caching and KV-cache compression.

    den = flowcache(chunk_denoiser(model), flowcache_config(thresh=0.1, coefficients=...))
    den = flowcache(chunk_denoiser(model), flowcache_magi_config(thresh=0.01), solver=solver)
    den = flowcache(chunk_denoiser(model, RolloutConfig(kv_compression=kv_compression())), cfg)
    out = rollout(den, noise, context, solver=solver, ...)

**Chunk-wise caching** (`caching`): every chunk and CFG branch has its own accumulator; the first 5 calls
of each chunk are computed. Both published metric variants (../shared/specs/ar_caching.md sections 1.2, 1.3):

- **SkyReels-V2 code** (`flowcache_config`): indicator = relative L1 change of `e0` rescaled by TeaCache's
  polynomial; each chunk's last call is forced; a reused call adds the chunk's stored block-stack residual
  and runs the head with the current time embedding. Published thresholds 0.1 (slow) / 0.15 (fast) with
  TeaCache's Wan2.1-1.3B ret-steps polynomial.
- **MAGI-1 code** (`flowcache_magi_config`): indicator = raw relative L1 change of the patch embedding of
  the noisy latent (no polynomial); a reused call repeats the last computed step's latent displacement,
  not rescaled by the current step (see `vidaccel.residual_cache` for how this is expressed as a velocity:
  exact for Euler, MAGI's solver). MAGI forces only the global first and last steps; in our rollout the
  first is inside chunk 0's warm-up and the last (the final chunk's last call) is not forced (`cutoff`
  None, as the per-chunk code). Published thresholds 0.01 (slow) / 0.015 (fast) for MAGI-1.

Neither is the paper's text's metric (the relative L1 change of the latent itself, ||v dt|| / ||x||); the
SkyReels variant's schedule depends on the timesteps only, the MAGI variant's on the content.

**KV compression** (`compression`, `kv_compression()`): importance-redundancy scores per head,
lambda = 0.07, max pool 7, top-B per head with B = one chunk fewer than the budget, fired when a finished
chunk does not fit in the `cache_chunks`-chunk budget. `KVCompressionConfig` is the rollout's generic
`models.ar.compression.CacheCompressor` hook, since it manages the chunk denoiser's cache; the SkyReels
slow/fast scripts run without it.

Two execution models. With `models.ar.rollout` (synchronous: one chunk at a time) per-chunk state is reset
at each chunk boundary and "skipped chunks keep stale K/V" reduces to: earlier chunks are committed (clean
K/V from the t = 0 pass, or in `kv_mode="last_step"` the K/V of the chunk's last call). With
`models.ar.df_sample(execution="chunks")` (the papers' own, asynchronous diffusion forcing) several chunks
are in flight at staggered noise levels, each with its own state, forwarded block-causally against a
per-window K/V buffer that skipped chunks leave stale; KV compression counts the chunks in flight in its
budget (`KVCompressionConfig.score`, the `WindowCompressor` hook). `df_run(method, ...)` (`async_df`) runs
any cache there by name.
"""

from experiments.flowcache.async_df import DF_METHODS, df_method, df_run
from experiments.flowcache.caching import (
    MAGI_THRESH,
    SKYREELS_THRESH,
    WARMUP,
    flowcache,
    flowcache_config,
    flowcache_magi_config,
)
from experiments.flowcache.compression import (
    QUERY_GRANULARITIES,
    KVCompressionConfig,
    compress_cache,
    compression_due,
    importance,
    kv_compression,
    redundancy,
    scores,
    select,
)

__all__ = ["WARMUP", "SKYREELS_THRESH", "MAGI_THRESH", "flowcache_config", "flowcache_magi_config", "flowcache",
           "kv_compression", "QUERY_GRANULARITIES", "KVCompressionConfig", "importance", "redundancy", "scores",
           "select", "compress_cache", "compression_due", "DF_METHODS", "df_method", "df_run"]
