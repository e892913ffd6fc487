"""HASTE's Error-guided Budgeted Calibration (EBC): measure what sparsifying each head costs, then solve a table.

Offline, per head h = (layer, head) and candidate threshold p, measure the density rho_h(p) and the
model-output error e_h(p) = mean ||v(head h sparse at p) - v(dense)||^2 / ||v(dense)||^2 of the guided
velocity on calibration prompts at a few sparse timesteps of a dense trajectory (one head perturbed at a
time, all others dense); then pick p_h minimising sum_h e_h(p_h) subject to mean_h rho_h(p_h) <= budget
(`experiments.haste.budget`). The budget defaults to the density the shared baseline threshold reaches on
the same measurements, so the comparison is at equal compute.

    table = calibrate_ebc(model, xattention(cfg_x), noise, context, negative, EBCConfig())
    table.save("ebc.json"); HasteConfig(thresholds="ebc.json")
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments.haste.budget import SOLVERS, solve_budget
from models.wan.denoiser import wan_denoiser
from vidaccel.checks import choice_arg, float_arg
from vidaccel.sampling import denoise_loop, init_branches
from vidaccel.solvers import unipc
from vidaccel.sparse_attention import Policy, find_sparse_state, sparse_attention
from vidaccel.transforms import DenoiseSpec


@dataclasses.dataclass(frozen=True)
class EBCConfig:
    """Error-guided Budgeted Calibration. Values are ours (HASTE publishes none).

    candidates: the threshold grid P (spec section 4). budget: mean density over heads, None = the density
    the shared `reference_threshold` reaches on the calibration measurements. solver: "dp" (exact) or
    "lagrangian". positions: calibration timesteps as fractions of the sparse part of the schedule (after
    the dense warm-up). guidance: CFG scale of the measured (guided) velocity.
    """

    candidates: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 1.0)
    budget: float | None = None
    reference_threshold: float = 0.9
    solver: str = "dp"
    positions: tuple[float, ...] = (0.1, 0.4, 0.7)
    guidance: float = 5.0

    def __post_init__(self):
        c = tuple(float_arg(f"EBCConfig.candidates[{i}]", x) for i, x in enumerate(self.candidates))
        if not c or any(not 0 <= x <= 1 for x in c) or len(set(c)) != len(c):
            raise ValueError(f"EBCConfig.candidates={self.candidates!r} is invalid: distinct numbers in [0, 1]")
        object.__setattr__(self, "candidates", c)
        if self.budget is not None:
            float_arg("EBCConfig.budget", self.budget, low=0, low_open=True, high=1)
        ref = float_arg("EBCConfig.reference_threshold", self.reference_threshold, low=0, high=1)
        if self.budget is None and ref not in c:
            raise ValueError(f"EBCConfig.reference_threshold={self.reference_threshold!r} must be one of the "
                             f"candidates {c} when budget is None")
        choice_arg("EBCConfig.solver", self.solver, SOLVERS)
        pos = tuple(float_arg(f"EBCConfig.positions[{i}]", x) for i, x in enumerate(self.positions))
        if not pos or any(not 0 <= x < 1 for x in pos):
            raise ValueError(f"EBCConfig.positions={self.positions!r} is invalid: fractions in [0, 1)")
        object.__setattr__(self, "positions", pos)
        float_arg("EBCConfig.guidance", self.guidance, low=1)


@dataclasses.dataclass
class EBCTable:
    """A calibrated per-(layer, head) threshold table and the measurements it was solved from."""

    thresholds: np.ndarray        # (L, H) chosen thresholds
    candidates: tuple[float, ...]
    errors: np.ndarray            # (L, H, P) e_h(p)
    densities: np.ndarray         # (L, H, P) rho_h(p)
    budget: float
    solver: str
    meta: dict = dataclasses.field(default_factory=dict)

    def predicted(self) -> dict:
        """Summed error and mean density of the chosen table, and of each shared threshold, on the measurements."""
        flat_e = self.errors.reshape(-1, len(self.candidates))
        flat_d = self.densities.reshape(-1, len(self.candidates))
        pick = np.argmin(np.abs(np.asarray(self.candidates)[None] - self.thresholds.reshape(-1, 1)), axis=1)
        rows = np.arange(len(pick))
        out = {"table": {"error": float(flat_e[rows, pick].sum()), "density": float(flat_d[rows, pick].mean())}}
        for j, c in enumerate(self.candidates):
            out[f"shared_{c:g}"] = {"error": float(flat_e[:, j].sum()), "density": float(flat_d[:, j].mean())}
        return out

    def to_json(self) -> dict:
        return {"thresholds": self.thresholds.tolist(), "candidates": list(self.candidates),
                "errors": self.errors.tolist(), "densities": self.densities.tolist(), "budget": self.budget,
                "solver": self.solver, "meta": self.meta, "predicted": self.predicted()}

    def save(self, path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1))

    def resolve(self, budget: float, solver: str | None = None) -> EBCTable:
        """The same measurements solved for another budget."""
        p = len(self.candidates)
        choice = solve_budget(self.errors.reshape(-1, p), self.densities.reshape(-1, p), budget, solver or self.solver)
        thr = np.asarray(self.candidates)[choice].reshape(self.thresholds.shape).astype(np.float32)
        return dataclasses.replace(self, thresholds=thr, budget=float(budget), solver=solver or self.solver)


def load_ebc_table(path) -> EBCTable:
    """Read an `EBCTable` saved by `EBCTable.save` (ValueError naming the file when malformed)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no EBC table at {path}; make one with `python -m experiments.haste calibrate`")
    try:
        d = json.loads(path.read_text())
        t = EBCTable(np.asarray(d["thresholds"], np.float32), tuple(d["candidates"]), np.asarray(d["errors"]),
                     np.asarray(d["densities"]), float(d["budget"]), d["solver"], d.get("meta", {}))
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not an EBC table: {e}") from e
    if t.thresholds.ndim != 2 or t.errors.shape != t.thresholds.shape + (len(t.candidates),):
        raise ValueError(f"{path}: thresholds {t.thresholds.shape} and errors {t.errors.shape} do not match")
    return t


def calibration_steps(num_steps: int, dense_steps: int, positions) -> list[int]:
    """Step indices at `positions` (fractions) of the sparse part [dense_steps, num_steps) of the schedule."""
    span = num_steps - dense_steps
    if span < 1:
        raise ValueError(f"no sparse steps to calibrate on: {dense_steps} dense steps of {num_steps}")
    return sorted({dense_steps + min(int(f * span), span - 1) for f in positions})


def dense_trajectory(model, noise, context, negative, solver, guidance: float) -> jax.Array:
    """Latents before every step (steps, B, ...) of a dense guided run (the calibration inputs)."""
    den = wan_denoiser(model)
    spec = DenoiseSpec(jax.ShapeDtypeStruct(noise.shape, noise.dtype),
                       jax.ShapeDtypeStruct(context.shape, context.dtype), solver.num_steps)

    @jax.jit
    def run(params, noise, context, negative):
        _, _, xs = denoise_loop(den, solver, True, params, noise, context, negative, guidance,
                                init_branches(den, spec, True), jnp.int32(0), trajectory=True)
        return xs

    return run(den.params, noise, context, negative)


def _perturbation_tables(layers: int, heads: int, candidates) -> jax.Array:
    """(L * H * P, L, H) threshold tables: all ones but head (l, h) at candidate p, in (l, h, p) order."""
    p = len(candidates)
    tables = np.ones((layers, heads, p, layers, heads), np.float32)
    for l in range(layers):
        for h in range(heads):
            tables[l, h, :, l, h] = candidates
    return jnp.asarray(tables.reshape(layers * heads * p, layers, heads))


def measure_ebc(model, policy: Policy, noise, context, negative, cfg: EBCConfig = EBCConfig(), *, solver=None,
                log=print) -> tuple[np.ndarray, np.ndarray, dict]:
    """EBC's offline measurements: errors and densities (L, H, P), and metadata.

    One head (l, h) runs sparse at candidate p while every other head keeps all blocks (threshold 1), at
    each calibration step of a dense trajectory; the error is the relative squared error of the guided
    velocity per prompt, averaged over prompts and steps; the density is that head's own. `solver`
    defaults to UniPC with 50 steps.
    """
    solver = solver or unipc(50)
    guidance = float(cfg.guidance)
    xs = dense_trajectory(model, noise, context, negative, solver, guidance)
    den = sparse_attention(wan_denoiser(model), policy)
    dense = wan_denoiser(model)
    n = noise.shape[0]
    x2 = jnp.concatenate([noise, noise])
    c2 = jnp.concatenate([context, negative])
    spec = DenoiseSpec(jax.ShapeDtypeStruct(x2.shape, x2.dtype), jax.ShapeDtypeStruct(c2.shape, c2.dtype),
                       solver.num_steps)
    state0, dense_state = den.init(spec), dense.init(spec)
    sp = find_sparse_state(state0)
    L, H = sp.thresholds.shape
    steps = calibration_steps(solver.num_steps, int(policy.dense_steps(solver.num_steps)), cfg.positions)
    P = len(cfg.candidates)
    tables = _perturbation_tables(L, H, np.asarray(cfg.candidates, np.float32))

    def guided(v):
        return v[n:] + guidance * (v[:n] - v[n:])

    @jax.jit
    def run(params, step, x, t, tables):
        st = state0.replace(step=step)        # the sparse state says "step s": past the dense warm-up
        ref = guided(dense.apply(params, dense_state, x, t, c2)[0])

        def one(thr):
            v, s = den.apply(params, st.replace(thresholds=thr), x, t, c2)
            e = jnp.sum(jnp.square(guided(v) - ref), axis=(1, 2, 3, 4)) / jnp.sum(jnp.square(ref), axis=(1, 2, 3, 4))
            return jnp.mean(e), s.counters.pairs

        return jax.lax.map(one, tables)

    err = np.zeros((L * H * P,))
    dens = np.zeros((L * H * P,))
    pairs_call = float(x2.shape[0]) * sp.spec.tokens ** 2
    rows, lh = np.arange(L * H * P), np.repeat(np.arange(L * H), P)
    t0 = time.perf_counter()
    for s in steps:
        x = jnp.concatenate([xs[s], xs[s]])
        t = jnp.full((x.shape[0],), solver.timesteps[s], jnp.float32)
        e, pairs = run(den.params, jnp.int32(s), x, t, tables)
        err += np.asarray(e, np.float64) / len(steps)
        dens += np.asarray(pairs, np.float64).reshape(L * H * P, L * H)[rows, lh] / pairs_call / len(steps)
        log(f"  EBC step {s}: {L * H * P} perturbed forwards ({time.perf_counter() - t0:.1f}s so far)")
    meta = {"policy": policy.name, "steps": steps, "num_steps": solver.num_steps, "prompts": int(n),
            "guidance": guidance, "seconds": round(time.perf_counter() - t0, 1)}
    return err.reshape(L, H, P), dens.reshape(L, H, P), meta


def calibrate_ebc(model, policy: Policy, noise, context, negative, cfg: EBCConfig = EBCConfig(), *, solver=None,
                  log=print) -> EBCTable:
    """Measure (see `measure_ebc`) and solve the budgeted table (budget `cfg.budget`, or by default the mean
    density of the shared `cfg.reference_threshold` on the same measurements)."""
    err, dens, meta = measure_ebc(model, policy, noise, context, negative, cfg, solver=solver, log=log)
    if cfg.budget is None:
        budget = float(dens[..., cfg.candidates.index(float(cfg.reference_threshold))].mean())
        meta["budget_from"] = f"shared threshold {cfg.reference_threshold}"
    else:
        budget = float(cfg.budget)
    table = EBCTable(np.zeros(err.shape[:2], np.float32), cfg.candidates, err, dens, budget, cfg.solver, meta)
    return table.resolve(budget, cfg.solver)


__all__ = ["EBCConfig", "EBCTable", "load_ebc_table", "calibration_steps", "dense_trajectory", "measure_ebc",
           "calibrate_ebc"]
