"""Shared by the relaxed-policy tests: the gradient check of a relaxed sampler's loss with respect to its policy,
a recorder of a hard residual cache's per-call decisions, and the tiny AR model they run on."""

import jax
import jax.numpy as jnp
from flax import struct
from jax.test_util import check_grads

from models.wan import init_transformer, wan_tiny
from vidaccel import relaxed as R
from vidaccel.residual_cache import ResidualCacheState
from vidaccel.transforms import find_state, wrap_denoiser


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


@struct.dataclass
class CallRecord:
    """Which calls a wrapped residual cache (TeaCache / FlowCache) computed: its own counter after every call."""

    inner: object
    seen: jax.Array
    count: jax.Array


def recording(den, **wrap):
    """`den` with a record of its per-call decisions (`CallRecord.seen`, 1 = computed), read from the
    `ResidualCacheState` counter inside; `wrap` goes to `wrap_denoiser` (e.g. `stages=None, commit=den.commit`)."""
    def init(spec):
        return CallRecord(den.init(spec), jnp.zeros((spec.num_steps * spec.num_chunks,), jnp.int32),
                          jnp.zeros((), jnp.int32))

    def apply(params, state, x, t, context):
        v, inner = den.apply(params, state.inner, x, t, context)
        now = find_state(inner, ResidualCacheState).computed
        before = find_state(state.inner, ResidualCacheState).computed
        return v, CallRecord(inner, state.seen.at[state.count].set(now - before), state.count + 1)

    return wrap_denoiser(den, init=init, apply=apply, name="record", **wrap)


def tiny_ar(chunks: int, frames_per_block: int = 2, batch: int = 1):
    """A tiny random block-causal model (2 layers, a non-trivial output head), noise for `chunks` chunks and a
    text context: (model, x (batch, chunks * frames_per_block, 4, 4, 4), context (batch, 3, 16))."""
    m = init_transformer(wan_tiny(num_frame_per_block=frames_per_block, num_layers=2), seed=5)
    m.proj_out.kernel.set_value(jax.random.normal(jax.random.key(7), m.proj_out.kernel.shape) * 0.3)
    k = jax.random.split(jax.random.key(11), 2)
    return (m, jax.random.normal(k[0], (batch, chunks * frames_per_block, 4, 4, 4)),
            jax.random.normal(k[1], (batch, 3, 16)))
