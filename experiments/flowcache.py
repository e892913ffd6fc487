"""FlowCache (arXiv 2602.10825) for AR chunk rollouts: chunk-wise caching and KV-cache compression.

    den = flowcache(chunk_denoiser(model), flowcache_config(thresh=0.1, coefficients=...))
    den = flowcache(chunk_denoiser(model), flowcache_magi_config(thresh=0.01), solver=solver)
    den = flowcache(chunk_denoiser(model, RolloutConfig(kv_compression=kv_compression())), cfg)
    out = rollout(den, noise, context, solver=solver, ...)

Every chunk and CFG branch has its own accumulator; the first 5 calls of each chunk are computed (the
code's warm-up; the paper says m = 4 for SkyReels and 5 for MAGI). Both published metric variants
(../shared/specs/ar_caching.md sections 1.2 and 1.3):

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

**KV compression** (`kv_compression`, see `vidaccel.kv_compression`): importance-redundancy scores per
head, lambda = 0.07, max pool 7, top-B per head with B = one chunk fewer than the budget, fired when a
finished chunk does not fit in the `cache_chunks`-chunk budget. It is a `RolloutConfig` option because it
manages the chunk denoiser's cache; the SkyReels slow/fast scripts run without it.

Our execution model differs from the papers': the rollout denoises one chunk at a time (synchronous
diffusion forcing), so per-chunk state is reset at each chunk boundary rather than kept for several chunks
in flight, and "skipped chunks keep stale K/V" reduces to: earlier chunks are committed (clean K/V from the
t = 0 pass, or in `kv_mode="last_step"` the K/V of the chunk's last call, which FlowCache-SkyReels forces).
"""

from __future__ import annotations

from experiments.teacache import WAN21_COEFFICIENTS
from vidaccel.kv_compression import KVCompressionConfig
from vidaccel.residual_cache import ResidualCacheConfig, residual_cache
from vidaccel.transforms import Denoiser

WARMUP = 5                    # calls of each chunk always computed (the code's ret_steps / warmup_steps)
SKYREELS_THRESH = {"slow": 0.1, "fast": 0.15}
MAGI_THRESH = {"slow": 0.01, "fast": 0.015}


def flowcache_config(thresh: float, coefficients=WAN21_COEFFICIENTS[("1.3b", True)], *,
                     warmup: int = WARMUP, max_change: float | None = None) -> ResidualCacheConfig:
    """FlowCache-SkyReels: e0 indicator, rescaled, per-chunk warm-up and forced last call, hidden residual.
    max_change: the calibrated input range's top (see `teacache_config`)."""
    return ResidualCacheConfig(thresh, coefficients, indicator="e0", warmup=warmup, cutoff=-1, scope="chunk",
                               max_change=max_change)


def flowcache_magi_config(thresh: float, *, warmup: int = WARMUP) -> ResidualCacheConfig:
    """FlowCache-MAGI: raw relative L1 of the patch embedding, per-chunk warm-up, latent-displacement reuse."""
    return ResidualCacheConfig(thresh, None, indicator="patch", warmup=warmup, cutoff=None, scope="chunk",
                               reuse="latent")


def kv_compression(cache_chunks: int = 6, **overrides) -> KVCompressionConfig:
    """FlowCache's KV compression config (MAGI code defaults); pass it as `RolloutConfig(kv_compression=...)`."""
    return KVCompressionConfig(cache_chunks=cache_chunks, **overrides)


def flowcache(den: Denoiser, cfg: ResidualCacheConfig, *, solver=None) -> Denoiser:
    """FlowCache as a transform of an AR chunk denoiser (`models.ar.rollout.chunk_denoiser`); the MAGI
    variant (reuse="latent") needs the rollout's `solver`."""
    if cfg.scope != "chunk":
        raise ValueError("FlowCache's state is per chunk; its config must have scope='chunk'")
    return residual_cache(den, cfg, name="flowcache", solver=solver)
