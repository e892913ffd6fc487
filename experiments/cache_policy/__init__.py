"""Differentiable studies of cache policies (issue 18) on the embedded shapes models.

The relaxation machinery is `vidaccel.relaxed`; this package holds the studies: `study` (t2v setup, loss,
learning under a budget with optax, hard evaluation, sensitivity, gradient memory), `transfer` (prompts,
step counts, video lengths), `ar` (the AR setup, on which learning and evaluation run rollouts against
FlowCache, and the sensitivity map per (chunk, step) at FlowCache's decisions), `heads` / `heads_study`
(XAttention's per-head thresholds relaxed and learned), `token_rule` / `tokens` (MotionCache's token selection
relaxed and learned), `layers` (per-layer reuse schedules learned) and the command
`python -m experiments.cache_policy` writing results/cache_policy/. See docs/cache_policies.md.
"""

from experiments.cache_policy.ar import ARSetup, ar_sensitivity, flowcache_rule, make_ar_setup
from experiments.cache_policy.study import (
    BUDGET_TOLERANCE,
    LEARNING_RATES,
    POLICIES,
    Learned,
    Setup,
    Split,
    calibrate,
    evaluate,
    evaluate_teacache,
    evaluate_uniform,
    grad_memory,
    learn_policy,
    make_setup,
    rel_mse,
    sensitivity,
    teacache_rule,
    teacache_schedule,
    threshold_schedules,
    uniform_schedule,
)

__all__ = ["ARSetup", "ar_sensitivity", "flowcache_rule", "make_ar_setup", "BUDGET_TOLERANCE", "LEARNING_RATES",
           "POLICIES", "Learned", "Setup", "Split", "calibrate", "evaluate", "evaluate_teacache", "evaluate_uniform",
           "grad_memory", "learn_policy", "make_setup", "rel_mse", "sensitivity", "teacache_rule",
           "teacache_schedule", "threshold_schedules", "uniform_schedule"]
