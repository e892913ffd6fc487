"""Every cache in diffusion forcing's asynchronous execution, by method name: what an experiment calls.

    out = df_run("flowcache", model, noise, ctx, solver=unipc(50, 8.0), thresh=0.1, ar_step=5,
                 guidance=6.0, negative_context=neg)
    den, execution = df_method("motioncache", model, thresh=0.1, window_frames=25)

| method | denoiser | execution |
|---|---|---|
| "vanilla" | `df_window_denoiser`: the whole window every row (SkyReels-V2's vanilla) | window |
| "vanilla_chunks" | `df_chunk_denoiser`: updating chunks only, block-causal, stale K/V (no caching) | chunks |
| "teacache" | TeaCache (ret-steps rule: e0, 5 warm-up rows) over the window: one decision per row | window |
| "flowcache" | FlowCache-SkyReels: per (chunk, branch) e0 rule, warm-up 5, last step forced | chunks |
| "flowcache_magi" | FlowCache-MAGI: per (chunk, branch) patch-embedding rule, latent reuse (needs `solver`) | chunks |
| "motioncache" | MotionCache (SkyReels code defaults): per-token rule, partial forwards | chunks |

`kv_chunks` (per-chunk methods) adds FlowCache's KV compression with a budget of that many chunks
(`kv_compression`, MAGI's count: history and chunks in flight). `coefficients` default to TeaCache's
Wan2.1-1.3B ret-steps polynomial, as the papers' code; pass a calibrated one (and its `max_change`, the top
of the fitted range) for another model. Denoisers are memoized on their arguments, so repeated runs of one
method and threshold (several prompts) reuse one compilation (`df_sample` compiles per denoiser object).
"""

from __future__ import annotations

import functools

from experiments.flowcache.caching import flowcache, flowcache_config, flowcache_magi_config
from experiments.flowcache.compression import kv_compression
from experiments.motioncache import MotionCacheConfig, motioncache
from experiments.teacache import WAN21_COEFFICIENTS, teacache, teacache_config
from models.ar.diffusion_forcing import df_sample
from models.ar.window import df_chunk_denoiser, df_window_denoiser
from models.wan.transformer import WanTransformer
from vidaccel.checks import choice_arg, float_arg, optional_int_arg
from vidaccel.sampling import SampleOutput
from vidaccel.transforms import Denoiser

DF_METHODS = ("vanilla", "vanilla_chunks", "teacache", "flowcache", "flowcache_magi", "motioncache")
_RET = WAN21_COEFFICIENTS[("1.3b", True)]


def df_method(method: str, model: WanTransformer, *, window_frames: int, thresh: float = 0.0,
              coefficients=_RET, max_change: float | None = None, solver=None) -> tuple[Denoiser, str]:
    """(denoiser, execution) of `method` (one of DF_METHODS) over `model`; `window_frames` = the frames of a
    window (the per-chunk buffer's length); `coefficients` and `max_change` are the e0 rules' polynomial and
    its valid range (TeaCache, FlowCache-SkyReels, MotionCache)."""
    choice_arg("method", method, DF_METHODS)
    if not isinstance(model, WanTransformer):
        raise TypeError(f"df_method needs a WanTransformer, got {type(model).__name__}")
    thresh = float_arg("thresh", thresh, low=0.0)
    coefficients = None if coefficients is None else tuple(float(c) for c in coefficients)
    return _method(method, model, window_frames, thresh, coefficients, max_change, solver)


@functools.lru_cache(maxsize=64)
def _method(method, model, window_frames, thresh, coefficients, max_change, solver) -> tuple[Denoiser, str]:
    if method in ("vanilla", "teacache"):
        den = df_window_denoiser(model)
        if method == "teacache":
            den = teacache(den, teacache_config(thresh, coefficients, use_ret_steps=True, max_change=max_change))
        return den, "window"
    den = df_chunk_denoiser(model, window_frames)
    if method == "flowcache":
        den = flowcache(den, flowcache_config(thresh, coefficients, max_change=max_change))
    elif method == "flowcache_magi":
        if solver is None:
            raise ValueError("flowcache_magi reuses latent displacements: pass the sampling solver (solver=...)")
        den = flowcache(den, flowcache_magi_config(thresh), solver=solver)
    elif method == "motioncache":
        den = motioncache(den, MotionCacheConfig(thresh=thresh, coefficients=coefficients, max_change=max_change))
    return den, "chunks"


def df_run(method: str, model: WanTransformer, noise, context, *, solver, thresh: float = 0.0, coefficients=_RET,
           max_change: float | None = None, kv_chunks: int | None = None, window_frames: int | None = None,
           **df_kwargs) -> SampleOutput:
    """`df_sample` with `method`'s denoiser and execution. window_frames: the long-video window (with
    `overlap_frames` in df_kwargs) or None for one window over the whole video; kv_chunks: KV compression
    budget in chunks (per-chunk methods only). Other keyword arguments go to `df_sample`."""
    optional_int_arg("kv_chunks", kv_chunks, 2)
    fw = noise.shape[1] if window_frames is None or df_kwargs.get("overlap_frames") is None else window_frames
    den, execution = df_method(method, model, window_frames=fw, thresh=thresh, coefficients=coefficients,
                               max_change=max_change, solver=solver)
    if kv_chunks is not None:
        if execution != "chunks":
            raise ValueError(f"kv_chunks compresses the per-chunk K/V buffer; method {method!r} runs whole windows")
        df_kwargs["kv_compression"] = kv_compression(kv_chunks)
    return df_sample(den, noise, context, solver=solver, execution=execution, window_frames=window_frames,
                     **df_kwargs)


__all__ = ["DF_METHODS", "df_method", "df_run"]
