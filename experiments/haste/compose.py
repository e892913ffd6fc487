"""HASTE put together: a base sparse-attention policy (XAttention or SVG2) with EBC's per-head thresholds,
wrapped by Temporal Mask Reuse.

    den = sparse_attention(wan_denoiser(model), haste(xattention(cfg_x), HasteConfig(thresholds="ebc.json")))
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from experiments.haste.ebc import EBCTable, load_ebc_table
from experiments.haste.tmr import TMRConfig, temporal_mask_reuse
from vidaccel.sparse_attention import Policy


@dataclasses.dataclass(frozen=True)
class HasteConfig:
    """HASTE = base policy + TMR (None = off) + EBC thresholds (an `EBCTable`, its JSON path, or a
    (layers, heads) table; None = the base policy's shared threshold)."""

    tmr: TMRConfig | None = TMRConfig()
    thresholds: Any = None

    def __post_init__(self):
        if self.tmr is not None and not isinstance(self.tmr, TMRConfig):
            raise ValueError(f"HasteConfig.tmr={self.tmr!r} is invalid: a TMRConfig or None")
        t = self.thresholds
        if isinstance(t, (str, Path)):
            t = load_ebc_table(t)
        if isinstance(t, EBCTable):
            t = t.thresholds
        if t is not None:
            a = np.asarray(t, np.float64)
            if a.ndim != 2 or not np.all(np.isfinite(a)) or np.any(a < 0) or np.any(a > 1):
                raise ValueError(f"HasteConfig.thresholds is invalid: a (layers, heads) table in [0, 1], an "
                                 f"EBCTable or its JSON path; got shape {a.shape}")
            t = tuple(tuple(r) for r in a.tolist())
        object.__setattr__(self, "thresholds", t)


def haste(policy: Policy, cfg: HasteConfig = HasteConfig()) -> Policy:
    """HASTE on top of a base policy (XAttention or SVG2): EBC's per-head thresholds, then TMR."""
    if not isinstance(policy, Policy):
        raise TypeError(f"haste needs a base Policy (xattention(...) or svg2(...)), got {type(policy).__name__}")
    if not isinstance(cfg, HasteConfig):
        raise TypeError(f"haste needs a HasteConfig, got {type(cfg).__name__}")
    out = policy
    if cfg.thresholds is not None:
        out = dataclasses.replace(out, name=f"{out.name}+ebc", thresholds=cfg.thresholds)
    if cfg.tmr is not None:
        out = temporal_mask_reuse(out, cfg.tmr)
    return out


__all__ = ["HasteConfig", "haste"]
