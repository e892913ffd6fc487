"""Differentiable studies of cache policies (issue 18) on the embedded shapes t2v model.

The relaxation machinery is `vidaccel.relaxed`; this package holds the studies: `study` (setup, loss,
learning under a budget with optax, hard evaluation, sensitivity, gradient memory), `transfer` (prompts,
step counts, video lengths) and the command `python -m experiments.cache_policy` writing
results/cache_policy/. See docs/cache_policies.md.
"""

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

__all__ = ["POLICIES", "Learned", "Setup", "Split", "calibrate", "evaluate", "evaluate_teacache", "grad_memory",
           "learn_policy", "make_setup", "rel_mse", "sensitivity", "teacache_rule", "teacache_schedule",
           "uniform_schedule"]
