"""FlowCache's chunk-wise caching rule: the two published variants as `ResidualCacheConfig` presets.

Every chunk and CFG branch has its own accumulator; the first `WARMUP` calls of each chunk are computed
(the code's warm-up; the paper says m = 4 for SkyReels and 5 for MAGI). See the package docstring for the
two variants and how they differ from the paper's text.
"""

from __future__ import annotations

from experiments.teacache import WAN21_COEFFICIENTS
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


def flowcache(den: Denoiser, cfg: ResidualCacheConfig, *, solver=None) -> Denoiser:
    """FlowCache as a transform of an AR chunk denoiser (`models.ar.rollout.chunk_denoiser`); the MAGI
    variant (reuse="latent") needs the rollout's `solver`."""
    if cfg.scope != "chunk":
        raise ValueError(f"FlowCache's state is per chunk; its config must have scope='chunk', not {cfg.scope!r}")
    return residual_cache(den, cfg, name="flowcache", solver=solver)


__all__ = ["WARMUP", "SKYREELS_THRESH", "MAGI_THRESH", "flowcache_config", "flowcache_magi_config", "flowcache"]
