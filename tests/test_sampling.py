"""sample(): one jitted scan with CFG equals the diffusers pipeline loop; counters; errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.wan import init_transformer, load_transformer, wan_tiny
from vidaccel.sampling import sample
from vidaccel.solvers import euler, unipc
from models.wan.denoiser import wan_denoiser
from tests.wan_fixtures import FIXTURES, rel_l2


def test_sample_matches_diffusers_pipeline_loop():
    """UniPC (flow shift 3, 6 steps) + CFG 5.0 on the tiny model vs diffusers' scheduler + model loop."""
    ref = np.load(FIXTURES / "a" / "sampling.npz")
    model = load_transformer(FIXTURES / "a" / "model")
    den = wan_denoiser(model)
    solver = unipc(int(ref["steps"]), shift=float(ref["shift"]))
    np.testing.assert_allclose(solver.timesteps, ref["timesteps"], rtol=1e-6)
    cl = lambda a: jnp.asarray(a).transpose(0, 2, 3, 4, 1) if a.ndim == 5 else jnp.asarray(a)
    out = sample(den, den.params, cl(ref["noise"]), cl(ref["cond"]), solver=solver,
                 guidance=float(ref["guidance"]), negative_context=cl(ref["uncond"]))
    assert rel_l2(out.latents, cl(ref["out"])) <= 1e-4
    steps = int(ref["steps"])
    for branch in ("cond", "uncond"):
        work = getattr(out.state, branch).work
        assert int(work.calls) == steps and int(work.block_passes) == steps
        assert int(work.token_layers) == steps * (3 * 3 * 5) * model.cfg.num_layers


def test_sample_without_guidance_equals_python_loop():
    model = init_transformer(wan_tiny(), seed=3)
    model.proj_out.kernel.set_value(jax.random.normal(jax.random.key(1), model.proj_out.kernel.shape) * 0.1)
    den = wan_denoiser(model)
    noise = jax.random.normal(jax.random.key(0), (1, 2, 4, 4, 4))
    ctx = jax.random.normal(jax.random.key(2), (1, 3, 16))
    solver = euler(4, shift=3.0)
    out = sample(den, den.params, noise, ctx, solver=solver, progress=True)
    x, st = noise, solver.init(noise)
    for i in range(4):
        v = model(x, jnp.full((1,), solver.timesteps[i], jnp.float32), ctx)
        x, st = solver.step(st, jnp.int32(i), x, v)
    np.testing.assert_allclose(out.latents, x, rtol=1e-5, atol=1e-5)
    assert int(out.state.work.calls) == 4


def test_sample_errors():
    model = init_transformer(wan_tiny())
    den = wan_denoiser(model)
    noise = jnp.ones((1, 2, 4, 4, 4))
    ctx = jnp.ones((1, 3, 16))
    with pytest.raises(ValueError, match="needs negative_context"):
        sample(den, den.params, noise, ctx, solver=euler(2), guidance=5.0)
    with pytest.raises(ValueError, match="negative_context shape"):
        sample(den, den.params, noise, ctx, solver=euler(2), guidance=5.0, negative_context=jnp.ones((1, 4, 16)))
    with pytest.raises(ValueError, match="non-finite"):
        sample(den, den.params, noise.at[0, 0, 0, 0, 0].set(jnp.nan), ctx, solver=euler(2))
    with pytest.raises(ValueError, match=r"\(B, F, H, W, C\)"):
        sample(den, den.params, jnp.ones((1, 4, 4, 4)), ctx, solver=euler(2))
