"""experiments.cache_policy: budget-exact hardening of learned schedules and clear errors before any work
(the studies themselves run in the notebook test and in `python -m experiments.cache_policy`)."""

import jax.numpy as jnp
import numpy as np
import pytest

from experiments.cache_policy import learn_policy, uniform_schedule
from vidaccel.relaxed import ScheduleRule, hard_schedule, top_k_schedule


def test_top_k_schedule_spends_the_budget():
    rule = ScheduleRule(6)
    logits = {"logits": jnp.array([-5.0, 0.3, -0.2, 2.0, 0.1, -1.0])}
    assert hard_schedule(rule, logits).tolist() == [True, True, False, True, True, False]   # first call forced
    for budget, want in ((0.5, [0, 1, 3]), (1 / 6, [0]), (1.0, [0, 1, 2, 3, 4, 5])):
        got = hard_schedule(rule, top_k_schedule(rule, logits, budget))
        assert np.flatnonzero(got).tolist() == want, budget
    with pytest.raises(ValueError, match="budget must be > 0.0"):
        top_k_schedule(rule, logits, 0.0)


def test_uniform_schedule():
    assert np.flatnonzero(uniform_schedule(10, 0.4) > 0).tolist() == [0, 3, 6, 9]
    assert (uniform_schedule(20, 0.5) > 0).sum() == 10


@pytest.mark.parametrize(("kind", "budget", "temperature", "match"), [
    ("schedule", 0.0, 0.5, "budget must be > 0.0"),
    ("schedule", 1.5, 0.5, "budget must be <= 1.0"),
    ("threshold", 0.5, 0.0, "temperature must be > 0.0"),
    ("net", 1.5, 0.5, "budget must be <= 1.0"),
    ("net", 0.5, -0.1, "temperature must be > 0.0"),
    ("layers", 0.5, 0.5, "kind='layers' is not allowed"),
])
def test_learn_policy_errors(kind, budget, temperature, match):
    with pytest.raises(ValueError, match=match):
        learn_policy(None, kind, budget, calibration={}, temperature=temperature)
