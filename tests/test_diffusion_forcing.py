"""df_sample: the diffusion-forcing loop over the timestep matrix equals diffusers' SkyReels-V2 loop (recorded
with a fixed analytic velocity field), equals sample() when synchronous, and counts one call per row."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.ar.diffusion_forcing import df_sample
from models.wan import init_transformer, wan_tiny
from models.wan.denoiser import DenseState, wan_denoiser
from tests.test_solvers import DATA, META, cl, max_rel, velocity
from vidaccel.sampling import sample
from vidaccel.solvers import unipc
from vidaccel.transforms import Denoiser, Work, total_work


def field_denoiser() -> Denoiser:
    """The fixture's velocity field as a Denoiser: sees the row's window of frames and its per-frame t."""
    def apply(params, state, x, t, context):
        return velocity(x, t[0]), state.replace(work=state.work.add(calls=1))
    return Denoiser(init=lambda spec: DenseState(Work.zero()), apply=apply, name="field")


@pytest.mark.parametrize("case", sorted(META["df_cases"]))
def test_equals_diffusers_diffusion_forcing_loop(case):
    """Cases cover blocks of 1 and 2 frames, ar_step 0/2/3, a clean prefix frame and a sliding window."""
    spec = META["df_cases"][case]
    ref = cl(DATA[f"df_{case}_inplace_x"])                     # (rows + 1, B, F, H, W, C)
    noise = jnp.asarray(ref[0])
    n_pre = spec["num_pre_ready"]
    prefix = jnp.asarray(cl(DATA[f"df_{case}_prefix"]))[:, :n_pre] if n_pre else None
    ctx = jnp.zeros((noise.shape[0], 1, 1))
    out = df_sample(field_denoiser(), noise, ctx, solver=unipc(spec["steps"], spec["shift"], last_sample_aliasing=True),
                    ar_step=spec["ar_step"], causal_block_size=spec["causal_block_size"],
                    window_frames=spec["base"], prefix=prefix)
    assert max_rel(np.asarray(out.latents)[None], ref[-1:]) <= 1e-5
    assert int(out.state.work.calls) == ref.shape[0] - 1         # one model call per matrix row


def test_synchronous_equals_sample_with_the_real_model():
    """ar_step 0: every frame shares each step, so per-frame t and per-frame stepping reduce to sample()."""
    model = init_transformer(wan_tiny(num_layers=2), seed=1)
    model.proj_out.kernel.set_value(jax.random.normal(jax.random.key(2), model.proj_out.kernel.shape) * 0.3)
    k = jax.random.split(jax.random.key(0), 2)
    noise, ctx = jax.random.normal(k[0], (2, 4, 4, 4, 4)), jax.random.normal(k[1], (2, 3, 16))
    neg = jnp.zeros_like(ctx)
    solver = unipc(5, 3.0)
    ref = sample(wan_denoiser(model), None, noise, ctx, solver=solver, guidance=4.0, negative_context=neg)
    out = df_sample(model, noise, ctx, solver=solver, ar_step=0, causal_block_size=1, guidance=4.0,
                    negative_context=neg)
    rel = float(jnp.linalg.norm(out.latents - ref.latents) / jnp.linalg.norm(ref.latents))
    assert rel <= 1e-5
    assert total_work(out.state) == total_work(ref.state)


def test_asynchronous_blocks_really_lag():
    """ar_step > 0 with a block-causal model: the first block finishes before the last one, and the result
    differs from the synchronous run (the staggering is not a no-op)."""
    model = init_transformer(wan_tiny(num_layers=1, num_frame_per_block=2), seed=3)
    model.proj_out.kernel.set_value(jax.random.normal(jax.random.key(4), model.proj_out.kernel.shape) * 0.3)
    noise, ctx = jax.random.normal(jax.random.key(5), (1, 4, 4, 4, 4)), jnp.ones((1, 2, 16))
    solver = unipc(4, 3.0)
    sync = df_sample(model, noise, ctx, solver=solver, ar_step=0)
    lag = df_sample(model, noise, ctx, solver=solver, ar_step=2)
    assert int(lag.state.work.calls) == 4 + 2 and int(sync.state.work.calls) == 4
    assert float(jnp.abs(lag.latents - sync.latents).max()) > 1e-3


def test_errors():
    model = init_transformer(wan_tiny(num_layers=1, num_frame_per_block=2), seed=0)
    noise, ctx = jnp.ones((1, 4, 4, 4, 4)), jnp.ones((1, 2, 16))
    with pytest.raises(TypeError, match="WanTransformer or a Denoiser"):
        df_sample("model", noise, ctx, solver=unipc(2))
    with pytest.raises(ValueError, match="channels-last"):
        df_sample(model, noise[0], ctx, solver=unipc(2))
    with pytest.raises(ValueError, match="multiple of"):
        df_sample(model, noise[:, :3], ctx, solver=unipc(2))
    with pytest.raises(ValueError, match="prefix must be"):
        df_sample(model, noise, ctx, solver=unipc(2), prefix=jnp.ones((1, 2, 4, 4, 3)))
    with pytest.raises(ValueError, match="negative_context"):
        df_sample(model, noise, ctx, solver=unipc(2), guidance=3.0)

