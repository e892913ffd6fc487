"""Shared by the relaxed-policy tests: the gradient check of a relaxed sampler's loss with respect to its policy."""

import jax
import jax.numpy as jnp
from jax.test_util import check_grads

from vidaccel import relaxed as R


def check_policy_gradients(run, p0) -> None:
    """`check_grads` (reverse mode, central differences of step 0.05 in float32, 3% tolerance) of
    loss(policy) = mean(latents^2) + compute fraction, where `run(params)` is a relaxed sampler's output for
    `p0` with that policy; and a check that the loss depends on the policy at all (else the test proves nothing)."""
    def loss(pol):
        out = run(p0.replace(policy=pol))
        return jnp.mean(jnp.square(out.latents)) + R.compute_fraction(out.state)

    f = jax.jit(loss)
    check_grads(f, (p0.policy,), order=1, modes=("rev",), eps=0.05, atol=2e-3, rtol=3e-2)
    up = jax.tree.map(lambda v: v + 0.05, p0.policy)
    assert abs(float(f(up)) - float(f(p0.policy))) > 1e-4, "the loss does not depend on the policy"
