"""FlowCache (arXiv 2602.10825) for AR chunk rollouts: chunk-wise accumulated-change residual caching.

    den = flowcache(chunk_denoiser(model), flowcache_config(thresh=0.1, coefficients=...))
    out = rollout(den, noise, context, solver=unipc(50), ...)

As coded for SkyReels-V2 (see ../shared/specs/ar_caching.md section 1.2): every chunk and CFG branch has its
own accumulator of the rescaled relative L1 change of `e0`; the first 5 calls of each chunk and its last call
are computed; a reused call adds the chunk's stored block-stack residual and the head runs with the current
time embedding. Skipped calls leave the chunk's K/V as they were (stale), which in `last_step` K/V mode
means the K/V of the last computed call. The published thresholds are 0.1 (slow) and 0.15 (fast) for
SkyReels-V2 with TeaCache's Wan2.1-1.3B ret-steps polynomial; for other models fit the polynomial with
`experiments.teacache.calibrate`.

Differences from the paper's setting: our rollout denoises one chunk at a time (synchronous diffusion
forcing), so "per-chunk state" is reset at each chunk boundary rather than kept for several chunks in
flight. The MAGI-style variant (patch-embedding metric, latent-delta reuse) is not implemented yet.
"""

from __future__ import annotations

from experiments.teacache import WAN21_COEFFICIENTS
from vidaccel.residual_cache import ResidualCacheConfig, residual_cache
from vidaccel.transforms import Denoiser

WARMUP = 5                    # calls of each chunk always computed (the code's ret_steps; the paper says m = 4)
SKYREELS_THRESH = {"slow": 0.1, "fast": 0.15}


def flowcache_config(thresh: float, coefficients=WAN21_COEFFICIENTS[("1.3b", True)], *,
                     warmup: int = WARMUP) -> ResidualCacheConfig:
    """FlowCache-SkyReels: e0 indicator, rescaled, per-chunk warm-up and forced last call."""
    return ResidualCacheConfig(thresh, coefficients, indicator="e0", warmup=warmup, cutoff=-1, scope="chunk")


def flowcache(den: Denoiser, cfg: ResidualCacheConfig) -> Denoiser:
    """FlowCache as a transform of an AR chunk denoiser (`models.ar.rollout.chunk_denoiser`)."""
    if cfg.scope != "chunk":
        raise ValueError("FlowCache's state is per chunk; its config must have scope='chunk'")
    return residual_cache(den, cfg, name="flowcache")
