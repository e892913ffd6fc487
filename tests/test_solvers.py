"""Euler and UniPC solvers equal diffusers' schedulers (0.42.1): schedules, whole trajectories, per-frame use.

Fixtures: tests/fixtures/schedulers (scripts/fixtures/make_schedulers.py). The diffusers schedulers were
driven by a fixed nonlinear velocity field v = tanh(W x + b + a mean_F(x) + c t/1000) from stored noise;
here the same field drives our solvers inside one jitted `lax.scan` with a traced step index.

Parity bound (fp32): for every step k, max|x_k - x_k_ref| <= 1e-5 * max|x_k_ref|  (measured: <= 7e-7).
Sigmas and model timesteps are compared for exact equality (values and dtype).
"""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vidaccel.solvers import Solver, SolverState, euler, euler_schedule, shift_sigmas, unipc, unipc_schedule

FIX = Path(__file__).parent / "fixtures" / "schedulers"
META = json.loads((FIX / "meta.json").read_text())
DATA = np.load(FIX / "schedulers.npz")
RTOL = 1e-5
W, B, C, A = (jnp.asarray(DATA[k]) for k in ("W", "b", "c", "a"))


def cl(a):
    """torch (B, C, F, H, W) [with leading axes] -> channels-last (B, F, H, W, C)."""
    a = np.asarray(a)
    return np.moveaxis(a, -4, -1)


def velocity(x, t, frame_weights=None):
    """The fixture's field on channels-last x; t scalar or (F,); mean over frames (optionally a window)."""
    tt = jnp.asarray(t, jnp.float32) / 1000
    if tt.ndim == 1:
        tt = tt.reshape(1, -1, 1, 1, 1)
    if frame_weights is None:
        mean = x.mean(axis=1, keepdims=True)
    else:
        w = frame_weights.reshape(1, -1, 1, 1, 1).astype(x.dtype)
        mean = (x * w).sum(axis=1, keepdims=True) / w.sum()
    return jnp.tanh(jnp.einsum("oc,bfhwc->bfhwo", W, x) + B + A * mean + C * tt)


def run_scan(solver: Solver, x0):
    """All N steps in one jitted lax.scan; returns x_1..x_N stacked."""
    ts = jnp.asarray(solver.timesteps, jnp.float32)

    def body(carry, i):
        x, st = carry
        x, st = solver.step(st, i, x, velocity(x, ts[i]))
        return (x, st), x

    f = jax.jit(lambda x: jax.lax.scan(body, (x, solver.init(x)), jnp.arange(solver.num_steps, dtype=jnp.int32))[1])
    return np.asarray(f(jnp.asarray(x0)))


def max_rel(out, ref) -> float:
    """max over steps of max|out_k - ref_k| / max|ref_k|."""
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return max(float(np.abs(o - r).max() / np.abs(r).max()) for o, r in zip(out, ref, strict=True))


def check_schedule(solver: Solver, key: str):
    ref_s, ref_t = DATA[key + "_sigmas"], DATA[key + "_timesteps"]
    assert solver.sigmas.dtype == np.float64 and solver.sigmas[-1] == 0
    np.testing.assert_array_equal(solver.sigmas, ref_s.astype(np.float64))
    assert solver.timesteps.dtype == ref_t.dtype
    np.testing.assert_array_equal(solver.timesteps, ref_t)


def test_fixture_provenance():
    assert META["diffusers"] == "0.42.1" and META["torch"].startswith("2.13.0")


@pytest.mark.parametrize("name", ["euler", "unipc"])
def test_schedules_equal_diffusers(name):
    make = {"euler": euler, "unipc": unipc}[name]
    for n in META["grid_steps"]:
        for s in META["grid_shifts"]:
            check_schedule(make(n, s), f"grid_{name}_n{n}_s{s:g}")


@pytest.mark.parametrize("name", ["euler", "unipc"])
@pytest.mark.parametrize("steps", META["traj_steps"])
@pytest.mark.parametrize("shift", META["traj_shifts"])
def test_trajectory_equals_diffusers(name, steps, shift):
    key = f"{name}_n{steps}_s{shift:g}"
    solver = {"euler": euler, "unipc": unipc}[name](steps, shift)
    check_schedule(solver, key)
    ref = cl(DATA[key + "_x"])
    out = run_scan(solver, ref[0])
    assert out.shape == ref[1:].shape and out.dtype == np.float32
    assert max_rel(out, ref[1:]) <= RTOL


@pytest.mark.parametrize("case", sorted(META["unipc_option_cases"]))
def test_unipc_options_equal_diffusers(case):
    spec = META["unipc_option_cases"][case]
    solver = unipc(spec["steps"], spec["shift"], **spec["kwargs"])
    key = f"opt_unipc_{case}"
    check_schedule(solver, key)
    ref = cl(DATA[key + "_x"])
    assert max_rel(run_scan(solver, ref[0]), ref[1:]) <= RTOL


def test_euler_options_equal_diffusers():
    spec = META["euler_option_cases"]["t500"]
    solver = euler(spec["steps"], spec["shift"], **spec["kwargs"])
    check_schedule(solver, "opt_euler_t500")
    ref = cl(DATA["opt_euler_t500_x"])
    assert max_rel(run_scan(solver, ref[0]), ref[1:]) <= RTOL


def test_option_cases_are_distinct():
    """The option fixtures are not all the same trajectory (each option changes the result)."""
    finals = {c: DATA[f"opt_unipc_{c}_x"][-1] for c in ("order1", "order3", "nocorr")}
    base = cl(DATA["opt_unipc_order1_x"])[0]
    default = run_scan(unipc(10, 5.0), base)[-1]
    for c, f in finals.items():
        assert np.abs(cl(f) - default).max() > 1e-4, c


def test_settings_diffusers_breaks_are_refused():
    """diffusers' bh1 and lower_order_final=False end non-finite with the zero final sigma; we refuse them."""
    broken = META["unipc_broken_cases"]
    assert not broken["bh1"]["final_finite"] and not broken["no_lower_order_final"]["final_finite"]
    with pytest.raises(ValueError, match="solver_type must be 'bh2'"):
        unipc(5, 3.0, solver_type="bh1")
    with pytest.raises(ValueError, match="lower_order_final=False with solver_order=2"):
        unipc(5, 3.0, lower_order_final=False)
    unipc(5, 3.0, solver_order=1, lower_order_final=False)  # order 1 has no multistep final update


@pytest.mark.parametrize("case", sorted(META["df_cases"]))
@pytest.mark.parametrize("mode", ["inplace", "copied"])
def test_per_frame_stepping_equals_diffusion_forcing_loop(case, mode):
    """One UniPC scheduler per latent frame, driven by the DF step matrix (SkyReels-V2 pipeline loop).

    'inplace' is diffusers' own loop (step output written into the latents view it passed, which aliases
    the scheduler's last_sample after uncorrected steps) = last_sample_aliasing=True; 'copied' is the plain
    per-frame scheduler semantics = the default.
    """
    spec = META["df_cases"][case]
    solver = unipc(spec["steps"], spec["shift"], last_sample_aliasing=(mode == "inplace"))
    ref = cl(DATA[f"df_{case}_{mode}_x"])
    step_index = jnp.asarray(DATA[f"df_{case}_step_index"] - 1, jnp.int32)  # -1: not started, N: done
    update = jnp.asarray(DATA[f"df_{case}_update_mask"])
    tmat = jnp.asarray(DATA[f"df_{case}_step_matrix"], jnp.float32)
    valid = jnp.asarray(DATA[f"df_{case}_valid_interval"])
    F = ref.shape[2]

    def body(carry, r):
        x, st = carry
        frames = jnp.arange(F)
        window = (frames >= valid[r, 0]) & (frames < valid[r, 1])
        v = velocity(x, tmat[r], window)
        x, st = solver.step(st, step_index[r], x, v, update=update[r] & window)
        return (x, st), x

    f = jax.jit(lambda x: jax.lax.scan(body, (x, solver.init(x)), jnp.arange(step_index.shape[0]))[1])
    out = np.asarray(f(jnp.asarray(ref[0])))
    assert max_rel(out, ref[1:]) <= RTOL
    other = cl(DATA[f"df_{case}_{'copied' if mode == 'inplace' else 'inplace'}_x"])[-1]
    assert np.abs(other - ref[-1]).max() > 1e-3 * np.abs(ref[-1]).max()  # the aliasing really matters


@pytest.mark.parametrize("make", [euler, unipc])
def test_per_frame_equals_separate_runs(make):
    """Frames at different steps, (F,) indices: each frame evolves as its own scalar-index run."""
    solver = make(6, 5.0)
    key = jax.random.key(0)
    x = jax.random.normal(key, (2, 3, 2, 2, 4))
    offsets = np.array([0, 2, 1])  # frame f starts at row offsets[f]
    rows = 6 + offsets.max()
    st = solver.init(x)
    xs = x
    for r in range(rows):
        i = r - offsets
        upd = (i >= 0) & (i < 6)
        v = jnp.sin(3 * xs) + 0.1 * r
        xs, st = solver.step(st, jnp.asarray(i, jnp.int32), xs, v, update=jnp.asarray(upd))
    for f in range(3):
        xf = x[:, f:f + 1]
        sf = solver.init(xf)
        for k in range(6):
            v = jnp.sin(3 * xf) + 0.1 * (k + offsets[f])
            xf, sf = solver.step(sf, k, xf, v)
        np.testing.assert_allclose(xs[:, f:f + 1], xf, rtol=1e-6, atol=1e-6)


def test_dtype_and_state_shapes():
    solver = unipc(4, 3.0)
    x = jax.random.normal(jax.random.key(1), (1, 2, 3, 3, 4)).astype(jnp.bfloat16)
    v = jax.random.normal(jax.random.key(2), x.shape).astype(jnp.bfloat16)
    st = solver.init(x)
    assert st.last_sample.dtype == jnp.float32 and st.history.shape == (2, *x.shape)
    out, st2 = solver.step(st, 0, x, v)
    assert out.dtype == jnp.bfloat16
    ref, _ = solver.step(solver.init(x.astype(jnp.float32)), 0, x.astype(jnp.float32), v.astype(jnp.float32))
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(ref.astype(jnp.bfloat16), np.float32))
    assert jax.tree.structure(st2) == jax.tree.structure(st)
    assert euler(3).init(x) == SolverState()


def test_traced_out_of_range_index_is_nan_not_clamped():
    solver = euler(3)
    x = jnp.ones((1, 2, 2, 2, 2))
    out, _ = jax.jit(lambda i: solver.step(solver.init(x), i, x, x))(jnp.int32(3))
    assert np.isnan(np.asarray(out)).all()
    out, _ = jax.jit(lambda i: solver.step(solver.init(x), i, x, x, update=jnp.array([True, False])))(
        jnp.array([1, 7], jnp.int32))
    assert np.isfinite(np.asarray(out)).all() and np.array_equal(out[:, 1], x[:, 1])


def test_hashable_static_and_readonly():
    a, b = unipc(5, 3.0), unipc(5, 3.0)
    assert a == b and hash(a) == hash(b)
    assert a != unipc(5, 5.0) and a != euler(5, 3.0) and a != unipc(5, 3.0, last_sample_aliasing=True)
    with pytest.raises(ValueError):
        a.sigmas[0] = 1.0
    traces = []

    def f(s, x):
        traces.append(s)
        return s.step(s.init(x), 0, x, x)[0]

    g = jax.jit(f, static_argnums=0)
    x = jnp.ones((1, 2, 2, 2, 2))
    g(a, x)
    g(b, x)  # equal solver: cache hit, no retrace
    g(euler(5, 3.0), x)
    assert len(traces) == 2


def test_schedule_helpers():
    s = np.array([1.0, 0.5, 0.25])
    np.testing.assert_allclose(shift_sigmas(s, 3.0), 3 * s / (1 + 2 * s))
    sig, ts = unipc_schedule(4, 5.0)
    assert sig.dtype == np.float32 and ts.dtype == np.int64 and sig[0] == np.float32(1 - 1e-6)
    sig, ts = euler_schedule(4, 5.0)
    assert sig.dtype == np.float32 and ts.dtype == np.float32 and ts[0] == 1000


def test_bad_arguments():
    for make in (euler, unipc):
        with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
            make(0)
        with pytest.raises(TypeError, match="steps must be an int"):
            make(2.5)
        with pytest.raises(TypeError, match="steps must be an int"):
            make(True)
        for bad in (0.0, -1.0, float("nan"), float("inf")):
            with pytest.raises(ValueError, match=r"shift must be (finite|> 0.0), got"):
                make(5, bad)
        with pytest.raises(TypeError, match="shift must be a real number"):
            make(5, "3")
        with pytest.raises(ValueError, match="num_train_timesteps must be >= 1"):
            make(5, num_train_timesteps=0)
        with pytest.raises(TypeError):
            make(5, bogus=1)
    with pytest.raises(ValueError, match="solver_order must be <= 3, got 4"):
        unipc(5, solver_order=4)
    with pytest.raises(ValueError, match="solver_order must be >= 1"):
        unipc(5, solver_order=0)
    with pytest.raises(ValueError, match="disable_corrector entry 4 is out of range"):
        unipc(5, disable_corrector=[4])
    with pytest.raises(ValueError, match="disable_corrector entry must be >= 0"):
        unipc(5, disable_corrector=[-1])
    with pytest.raises(TypeError, match="last_sample_aliasing must be True or False, got 1"):
        unipc(5, last_sample_aliasing=1)
    with pytest.raises(ValueError, match="strictly decreasing"):
        unipc(5, num_train_timesteps=1)


def test_bad_step_inputs():
    solver = unipc(4)
    x = jnp.ones((1, 3, 2, 2, 4))
    st = solver.init(x)
    with pytest.raises(ValueError, match="velocity shape"):
        solver.step(st, 0, x, jnp.ones((1, 3, 2, 2, 3)))
    with pytest.raises(TypeError, match="x must be a floating array"):
        solver.step(st, 0, x.astype(jnp.int32), x)
    with pytest.raises(TypeError, match="x must be a floating array"):
        solver.init(jnp.ones((2,), jnp.int32))
    with pytest.raises(TypeError, match="step index i must be an integer"):
        solver.step(st, 0.5, x, x)
    with pytest.raises(ValueError, match="scalar or shaped"):
        solver.step(st, jnp.zeros((3, 1), jnp.int32), x, x)
    with pytest.raises(ValueError, match=r"out of range \[0, 4\)"):
        solver.step(st, 4, x, x)
    with pytest.raises(ValueError, match=r"out of range \[0, 4\)"):
        solver.step(st, jnp.array([0, -1, 0]), x, x)
    with pytest.raises(ValueError, match="F = 2"):
        solver.step(st, jnp.zeros((2,), jnp.int32), x, x)
    with pytest.raises(ValueError, match="F = 3"):
        solver.step(solver.init(x[0]), jnp.zeros((3,), jnp.int32), x[0], x[0])
    with pytest.raises(TypeError, match="update must be a bool"):
        solver.step(st, 0, x, x, update=jnp.ones((3,)))
    with pytest.raises(ValueError, match="update must be a scalar or shaped"):
        solver.step(st, jnp.zeros((3,), jnp.int32), x, x, update=jnp.ones((2,), bool))
    with pytest.raises(ValueError, match="UniPC state history has shape"):
        solver.step(solver.init(x[:, :2]), 0, x, x)
    with pytest.raises(ValueError, match="UniPC state history has shape None"):
        solver.step(SolverState(), 0, x, x)
