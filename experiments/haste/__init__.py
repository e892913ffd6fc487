"""HASTE (arXiv 2605.14513): Temporal Mask Reuse and Error-guided Budgeted Calibration on top of XAttention
or SVG2. The paper's full text is not public; this is the formulation proposed in
`../shared/specs/sparse_attention.md` section 4, every choice a config field (docs/sparse_attention.md).

    den = sparse_attention(wan_denoiser(model), haste(xattention(cfg_x), HasteConfig(thresholds="ebc.json")))
    table = calibrate_ebc(model, svg2(cfg_s), noise, context, negative, EBCConfig())   # offline; table.save(path)
    python -m experiments.haste calibrate --base xattention       # the shapes model's table (__main__.py)

One module per job: `tmr` (Temporal Mask Reuse, a policy wrapper run inside jit), `budget` (the per-head
choice under a density budget, numpy), `ebc` (EBC's measurements on a model, and its table files),
`compose` (HASTE = base + EBC table + TMR). The shapes-model presets are in `experiments.shapes_presets`.
"""

from experiments.haste.budget import SOLVERS, solve_budget, solve_dp, solve_lagrangian
from experiments.haste.compose import HasteConfig, haste
from experiments.haste.ebc import (
    EBCConfig,
    EBCTable,
    calibrate_ebc,
    calibration_steps,
    dense_trajectory,
    load_ebc_table,
    measure_ebc,
)
from experiments.haste.tmr import (
    DRIFTS,
    GRANULARITIES,
    TRIGGERS,
    TMRConfig,
    TMRState,
    drift,
    head_reuse_counts,
    pool_blocks,
    reuse_decision,
    reuse_decision_per_head,
    select_heads,
    temporal_mask_reuse,
)

__all__ = ["TMRConfig", "TMRState", "DRIFTS", "TRIGGERS", "GRANULARITIES", "temporal_mask_reuse", "pool_blocks",
           "drift", "reuse_decision", "reuse_decision_per_head", "select_heads", "head_reuse_counts", "SOLVERS",
           "solve_dp", "solve_lagrangian", "solve_budget", "EBCConfig", "EBCTable", "load_ebc_table",
           "calibration_steps", "dense_trajectory", "measure_ebc", "calibrate_ebc", "HasteConfig", "haste"]
