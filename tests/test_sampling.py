"""sample(): one jitted scan with CFG equals the diffusers pipeline loop; counters; errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.ar.diffusion_forcing import df_sample
from models.ar.rollout import rollout
from models.wan import init_transformer, load_transformer, wan_tiny
from models.wan.denoiser import wan_denoiser
from tests.wan_fixtures import FIXTURES, rel_l2
from vidaccel.sampling import sample
from vidaccel.solvers import euler, unipc


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


def _samplers():
    """sample, the AR rollout and diffusion forcing, each as f(noise, ctx, **kw) on a tiny model."""
    den = wan_denoiser(init_transformer(wan_tiny()))
    ar = init_transformer(wan_tiny(num_frame_per_block=2))
    return {"sample": lambda noise, ctx, **kw: sample(den, den.params, noise, ctx, **kw),
            "rollout": lambda noise, ctx, **kw: rollout(ar, noise, ctx, **kw),
            "df_sample": lambda noise, ctx, **kw: df_sample(ar, noise, ctx, **kw)}


@pytest.mark.parametrize("name", ["sample", "rollout", "df_sample"])
def test_every_sampler_refuses_a_step_count_for_a_solver(name):
    """`solver=50` (a step count where a Solver is expected) used to fail deep inside with an AttributeError
    ('int' object has no attribute 'num_steps'); every sampler now says what a solver is."""
    run = _samplers()[name]
    noise, ctx = jnp.ones((1, 2, 4, 4, 4)), jnp.ones((1, 3, 16))
    with pytest.raises(TypeError, match=r"solver must be a Solver \(vidaccel.solvers.unipc\(steps\) or euler"):
        run(noise, ctx, solver=50)


@pytest.mark.parametrize("name", ["sample", "rollout", "df_sample"])
@pytest.mark.parametrize("guidance", [float("nan"), float("inf"), -float("inf"), np.float32("nan")])
def test_every_sampler_refuses_non_finite_guidance(name, guidance):
    """guidance=nan or inf used to run and return latents that were all NaN, without a word; every sampler
    now refuses it before compiling (a non-number is a TypeError)."""
    run = _samplers()[name]
    noise, ctx = jnp.ones((1, 2, 4, 4, 4)), jnp.ones((1, 3, 16))
    with pytest.raises(ValueError, match="guidance must be finite"):
        run(noise, ctx, solver=euler(2), guidance=guidance, negative_context=ctx * 0)
    with pytest.raises(TypeError, match="guidance must be a real number, got '5'"):
        run(noise, ctx, solver=euler(2), guidance="5", negative_context=ctx * 0)
