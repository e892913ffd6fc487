"""Differentiable studies of cache policies (issue 18) on the embedded shapes models.

The relaxation machinery is `vidaccel.relaxed`; this package holds the studies: `study` (t2v setup, loss,
learning under a budget with optax, hard evaluation, sensitivity, gradient memory), `transfer` (prompts,
step counts, video lengths), `ar` (the sensitivity map per (chunk, step) on AR rollouts at FlowCache's
decisions) and the command `python -m experiments.cache_policy` writing results/cache_policy/. See
docs/cache_policies.md.
"""

from experiments.cache_policy.ar import ARSetup, ar_sensitivity, flowcache_rule, make_ar_setup
from experiments.cache_policy.study import (
    POLICIES,
    Learned,
    Setup,
    Split,
    calibrate,
    evaluate,
    evaluate_teacache,
    grad_memory,
    learn_policy,
    make_setup,
    rel_mse,
    sensitivity,
    teacache_rule,
    teacache_schedule,
    uniform_schedule,
)

__all__ = ["ARSetup", "ar_sensitivity", "flowcache_rule", "make_ar_setup", "POLICIES", "Learned", "Setup", "Split",
           "calibrate", "evaluate", "evaluate_teacache", "grad_memory",
           "learn_policy", "make_setup", "rel_mse", "sensitivity", "teacache_rule", "teacache_schedule",
           "uniform_schedule"]
