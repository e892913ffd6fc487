"""HASTE (arXiv 2605.14513): Temporal Mask Reuse and Error-guided Budgeted Calibration on top of XAttention
or SVG2. The paper's full text is not public; this is the formulation proposed in
`../shared/specs/sparse_attention.md` section 4, every choice a config field (docs/sparse_attention.md).

    den = sparse_attention(wan_denoiser(model), haste(xattention(cfg_x), HasteConfig(thresholds="ebc.json")))
    table = calibrate(model, svg2(cfg_s), context, negative, EBCConfig())      # offline, then table.save(path)
    python -m experiments.haste calibrate --base xattention --out results/sparse/ebc_xattention.json

* TMR (per layer, heads and batch together, per CFG branch): the state keeps an anchor step, the block-mean
  pooled Q and K of that step and the plan (mask; for SVG2 labels, permutations and ranges too). At each
  sparse call the drift of the pooled logits against the anchor, ||S_t - S_a||_F / ||S_a||_F with
  S = mean_block(Q) mean_block(K)^T / sqrt(d), is taken per (batch, head) and aggregated (max by default);
  while it is below `epsilon` and fewer than `max_interval` steps passed since the anchor, the mask
  prediction is skipped by `lax.cond` and the stored plan reused; otherwise it runs and becomes the anchor.
  The decision is one per layer because a skip must be a scalar `cond` to skip work.
* EBC: offline, per head h = (layer, head) and candidate threshold p, measure the density rho_h(p) and the
  model-output error e_h(p) = mean ||v(head h sparse at p) - v(dense)||^2 / ||v(dense)||^2 of the guided
  velocity on calibration prompts at a few sparse timesteps (one head perturbed at a time, all others
  dense); then pick p_h minimising sum_h e_h(p_h) subject to mean_h rho_h(p_h) <= budget (exact DP over the
  Pareto front of partial choices, or a Lagrangian with bisection). The budget defaults to the density the shared
  baseline threshold reaches on the same measurements, so the comparison is at equal compute.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from experiments import RESULTS_ROOT
from vidaccel.sparse_attention import AttnContext, AttnSpec, Policy, PredictStats, find_sparse_state, sparse_attention

DRIFTS = ("logits", "qk")
TRIGGERS = ("max", "mean")
SOLVERS = ("dp", "lagrangian")


# ------------------------------------------------------------------------------------------ TMR
@dataclasses.dataclass(frozen=True)
class TMRConfig:
    """Temporal Mask Reuse. Values are ours (HASTE publishes none); see docs/sparse_attention.md.

    epsilon: reuse while the drift is below it (0.1). max_interval: R_max, reuse only while
    step - anchor_step < R_max (4: at most 3 reused steps per anchor). drift: "logits" (pooled-logit
    relative change) or "qk" (max of the pooled Q and K relative changes). pool_block: tokens per pooled
    block (128, XAttention's block). trigger: aggregate of the per-(batch, head) drifts that decides:
    "max" (any head over epsilon recomputes) or "mean".
    """

    epsilon: float = 0.1
    max_interval: int = 4
    drift: str = "logits"
    pool_block: int = 128
    trigger: str = "max"

    def __post_init__(self):
        if isinstance(self.epsilon, bool) or not isinstance(self.epsilon, (int, float)) or not self.epsilon >= 0:
            raise ValueError(f"TMRConfig.epsilon={self.epsilon!r} is invalid: a number >= 0")
        for name in ("max_interval", "pool_block"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"TMRConfig.{name}={v!r} is invalid: an int >= 1")
        if self.drift not in DRIFTS:
            raise ValueError(f"TMRConfig.drift={self.drift!r} is invalid; allowed: {DRIFTS}")
        if self.trigger not in TRIGGERS:
            raise ValueError(f"TMRConfig.trigger={self.trigger!r} is invalid; allowed: {TRIGGERS}")


@struct.dataclass
class TMRState:
    """TMR's per-layer state around the base policy's (leading layer axis once stacked)."""

    base: Any                # the base policy's state
    plan: Any                # the anchor's plan
    q_anchor: jax.Array      # (B, H, nb, D) block-mean pooled Q at the anchor step
    k_anchor: jax.Array
    anchor_step: jax.Array   # () int32
    has_anchor: jax.Array    # () bool
    drift: jax.Array         # () float32, the last aggregated drift (diagnostic)


def pool_blocks(x: jax.Array, block: int) -> jax.Array:
    """Mean over consecutive token blocks: (B, N, H, D) -> (B, H, ceil(N/block), D) (last block partial)."""
    b, n, h, d = x.shape
    nb = -(-n // block)
    xp = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, nb * block - n), (0, 0), (0, 0)))
    sums = xp.reshape(b, nb, block, h, d).sum(2)
    counts = np.minimum(block, n - np.arange(nb) * block).astype(np.float32)
    return jnp.swapaxes(sums / counts[None, :, None, None], 1, 2)


def _rel(a, b):
    num = jnp.sqrt(jnp.sum(jnp.square(a - b), axis=(-2, -1)))
    return num / jnp.maximum(jnp.sqrt(jnp.sum(jnp.square(b), axis=(-2, -1))), 1e-12)


def drift(q_pooled, k_pooled, q_anchor, k_anchor, kind: str = "logits") -> jax.Array:
    """Per-(batch, head) drift (B, H) of pooled Q, K (B, H, nb, D) against the anchor's."""
    if kind == "qk":
        return jnp.maximum(_rel(q_pooled, q_anchor), _rel(k_pooled, k_anchor))
    scale = 1.0 / math.sqrt(q_pooled.shape[-1])
    s_t = jnp.einsum("bhid,bhjd->bhij", q_pooled, k_pooled, precision="highest") * scale
    s_a = jnp.einsum("bhid,bhjd->bhij", q_anchor, k_anchor, precision="highest") * scale
    return _rel(s_t, s_a)


def reuse_decision(cfg: TMRConfig, drifts, has_anchor, step, anchor_step):
    """(reuse?, aggregated drift): reuse iff an anchor exists, agg(drifts) < epsilon and step - anchor < R_max."""
    agg = jnp.max(drifts) if cfg.trigger == "max" else jnp.mean(drifts)
    reuse = has_anchor & (agg < cfg.epsilon) & (step - anchor_step < cfg.max_interval)
    return reuse, jnp.where(has_anchor, agg, jnp.inf).astype(jnp.float32)


def temporal_mask_reuse(policy: Policy, cfg: TMRConfig = TMRConfig()) -> Policy:
    """Wrap a policy's mask prediction with TMR (`lax.cond`: a reused step runs no prediction at all)."""
    if not isinstance(cfg, TMRConfig):
        raise TypeError(f"temporal_mask_reuse needs a TMRConfig, got {type(cfg).__name__}")

    def init(spec: AttnSpec) -> TMRState:
        base = policy.init(spec)
        qk = jax.ShapeDtypeStruct((spec.batch, spec.tokens, spec.heads, spec.head_dim), spec.dtype)
        base0 = jax.tree.map(lambda x: x[0], base)
        ctx = AttnContext(jnp.int32(0), jnp.int32(0), jnp.ones((spec.heads,), jnp.float32), spec)
        plan = jax.eval_shape(lambda q, k: policy.predict(q, k, base0, ctx)[0], qk, qk)
        lz = lambda s: jnp.zeros((spec.layers,) + s.shape, s.dtype)  # noqa: E731
        nb = -(-spec.tokens // cfg.pool_block)
        anchor = jnp.zeros((spec.layers, spec.batch, spec.heads, nb, spec.head_dim), jnp.float32)
        return TMRState(base, jax.tree.map(lz, plan), anchor, anchor, jnp.zeros((spec.layers,), jnp.int32),
                        jnp.zeros((spec.layers,), bool), jnp.full((spec.layers,), jnp.inf, jnp.float32))

    def predict(q, k, st: TMRState, ctx: AttnContext):
        b, n, h, d = q.shape
        qp, kp = pool_blocks(q, cfg.pool_block), pool_blocks(k, cfg.pool_block)
        reuse, agg = reuse_decision(cfg, drift(qp, kp, st.q_anchor, st.k_anchor, cfg.drift), st.has_anchor,
                                    ctx.step, st.anchor_step)
        nb = qp.shape[2]
        check = (2.0 * n * d + (4.0 * nb * nb * d if cfg.drift == "logits" else 4.0 * nb * d)) * b * h

        def keep(_):
            return st.plan, st.base, PredictStats(jnp.int32(0), jnp.int32(1), jnp.float32(0), jnp.float32(0))

        def fresh(_):
            return policy.predict(q, k, st.base, ctx)

        plan, base, stats = jax.lax.cond(reuse, keep, fresh, None)
        new = TMRState(base, plan, jnp.where(reuse, st.q_anchor, qp), jnp.where(reuse, st.k_anchor, kp),
                       jnp.where(reuse, st.anchor_step, ctx.step).astype(jnp.int32), jnp.bool_(True), agg)
        return plan, new, stats.replace(check_flops=stats.check_flops + check)

    return dataclasses.replace(policy, name=f"{policy.name}+tmr", init=init, predict=predict)


# ------------------------------------------------------------------------------------------ EBC solver
def _check_problem(err, dens):
    err, dens = np.asarray(err, np.float64), np.asarray(dens, np.float64)
    if err.ndim != 2 or err.shape != dens.shape or err.size == 0:
        raise ValueError(f"errors and densities must be matching (heads, candidates) arrays; got {err.shape} "
                         f"and {dens.shape}")
    if not (np.all(np.isfinite(err)) and np.all(np.isfinite(dens))):
        raise ValueError("errors and densities must be finite")
    return err, dens


def _check_budget(budget, dens):
    if isinstance(budget, bool) or not isinstance(budget, (int, float, np.floating)) or not np.isfinite(budget):
        raise ValueError(f"budget={budget!r} is invalid: a finite mean density")
    floor = dens.min(axis=1).mean()
    if budget < floor - 1e-12:
        raise ValueError(f"budget={budget} is below the least achievable mean density {floor:.6g} "
                         "(every head at its sparsest candidate)")


def solve_dp(err, dens, budget: float, max_states: int = 1_000_000) -> np.ndarray:
    """Exact multiple-choice knapsack: choice (heads,) minimising sum err s.t. mean dens <= budget.

    Dynamic programming over the Pareto front of (total density, total error) of the heads seen so far:
    dominated partial choices and those already over budget are dropped, so the result is the exact optimum
    (ties prefer the lower density). `max_states` bounds the front (ValueError beyond it; use
    `solve_lagrangian` for very many heads).
    """
    err, dens = _check_problem(err, dens)
    _check_budget(budget, dens)
    m, p = err.shape
    cap = budget * m * (1 + 1e-9) + 1e-12
    front_d, front_e = np.zeros(1), np.zeros(1)
    parents, picks = [], []
    for i in range(m):
        d = (front_d[:, None] + dens[i][None]).ravel()
        e = (front_e[:, None] + err[i][None]).ravel()
        ok = d <= cap
        idx = np.flatnonzero(ok)
        order = idx[np.lexsort((e[idx], d[idx]))]            # by density, then error
        best = np.minimum.accumulate(e[order])
        keep = np.ones(len(order), bool)
        keep[1:] = e[order][1:] < best[:-1]                  # strictly better than every sparser state
        sel = order[keep]
        if len(sel) > max_states:
            raise ValueError(f"the Pareto front grew to {len(sel)} states (max_states={max_states}); use the "
                             "lagrangian solver")
        parents.append(sel // p)
        picks.append(sel % p)
        front_d, front_e = d[sel], e[sel]
    k = int(np.argmin(front_e))                              # fronts are sorted by density: lowest on ties
    out = np.zeros(m, np.int64)
    for i in range(m - 1, -1, -1):
        out[i] = picks[i][k]
        k = int(parents[i][k])
    return out


def _lagrange_choice(err, dens, lam):
    cost = err + lam * dens
    best = cost.min(axis=1, keepdims=True)
    tie = np.isclose(cost, best, rtol=0, atol=1e-15)
    return np.argmin(np.where(tie, dens, np.inf), axis=1)       # among ties, the sparsest


def solve_lagrangian(err, dens, budget: float, iters: int = 100) -> np.ndarray:
    """Lagrangian relaxation with bisection on lambda: p_h = argmin e_h + lambda rho_h, the smallest lambda
    whose mean density meets the budget. Feasible; optimal for the density it reaches when the choices lie
    on each head's lower convex hull (otherwise it can leave budget unused; use `solve_dp`)."""
    err, dens = _check_problem(err, dens)
    _check_budget(budget, dens)
    mean = lambda lam: dens[np.arange(len(dens)), _lagrange_choice(err, dens, lam)].mean()  # noqa: E731
    if mean(0.0) <= budget + 1e-12:
        return _lagrange_choice(err, dens, 0.0)
    lo, hi = 0.0, 1.0
    while mean(hi) > budget + 1e-12:
        lo, hi = hi, hi * 2.0
        if hi > 1e300:
            raise ValueError(f"budget={budget} not reachable by the Lagrangian")
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if mean(mid) <= budget + 1e-12:
            hi = mid
        else:
            lo = mid
    return _lagrange_choice(err, dens, hi)


def solve_budget(err, dens, budget: float, solver: str = "dp") -> np.ndarray:
    """Per-head candidate indices under a mean-density budget with the named solver."""
    if solver == "dp":
        return solve_dp(err, dens, budget)
    if solver == "lagrangian":
        return solve_lagrangian(err, dens, budget)
    raise ValueError(f"solver={solver!r} is invalid; allowed: {SOLVERS}")


# ------------------------------------------------------------------------------------------ EBC calibration
@dataclasses.dataclass(frozen=True)
class EBCConfig:
    """Error-guided Budgeted Calibration. Values are ours (HASTE publishes none).

    candidates: the threshold grid P (spec section 4). budget: mean density over heads, None = the density
    the shared `reference_threshold` reaches on the calibration measurements. solver: "dp" (exact) or
    "lagrangian". positions: calibration timesteps as fractions of the sparse part
    of the schedule (after the dense warm-up). guidance: CFG scale of the measured (guided) velocity.
    """

    candidates: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 1.0)
    budget: float | None = None
    reference_threshold: float = 0.9
    solver: str = "dp"
    positions: tuple[float, ...] = (0.1, 0.4, 0.7)
    guidance: float = 5.0

    def __post_init__(self):
        c = tuple(float(x) for x in self.candidates)
        if not c or any(not 0 <= x <= 1 for x in c) or len(set(c)) != len(c):
            raise ValueError(f"EBCConfig.candidates={self.candidates!r} is invalid: distinct numbers in [0, 1]")
        object.__setattr__(self, "candidates", c)
        if self.budget is not None and not 0 < float(self.budget) <= 1:
            raise ValueError(f"EBCConfig.budget={self.budget!r} is invalid: a mean density in (0, 1] or None")
        if self.budget is None and float(self.reference_threshold) not in c:
            raise ValueError(f"EBCConfig.reference_threshold={self.reference_threshold!r} must be one of the "
                             f"candidates {c} when budget is None")
        if self.solver not in SOLVERS:
            raise ValueError(f"EBCConfig.solver={self.solver!r} is invalid; allowed: {SOLVERS}")
        pos = tuple(float(x) for x in self.positions)
        if not pos or any(not 0 <= x < 1 for x in pos):
            raise ValueError(f"EBCConfig.positions={self.positions!r} is invalid: fractions in [0, 1)")
        object.__setattr__(self, "positions", pos)
        if not float(self.guidance) >= 1:
            raise ValueError(f"EBCConfig.guidance={self.guidance!r} is invalid: a CFG scale >= 1")


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


def dense_trajectory(model, noise, context, negative, solver, guidance):
    """Latents before every step (steps, B, ...) of a dense guided run (the calibration inputs)."""
    from vidaccel.sampling import guided_velocity, init_branches
    from vidaccel.transforms import DenoiseSpec
    from models.wan.denoiser import wan_denoiser

    den = wan_denoiser(model)
    spec = DenoiseSpec(jax.ShapeDtypeStruct(noise.shape, noise.dtype),
                       jax.ShapeDtypeStruct(context.shape, context.dtype), solver.num_steps)

    @jax.jit
    def run(params, noise, context, negative):
        ts = jnp.asarray(solver.timesteps, jnp.float32)
        dstate = init_branches(den, spec, True)

        def step(carry, i):
            x, ss, ds = carry
            t = jnp.broadcast_to(ts[i], (x.shape[0],))
            v, ds = guided_velocity(den, True, params, ds, x, t, context, negative, guidance)
            xn, ss = solver.step(ss, i, x, v)
            return (xn, ss, ds), x

        _, xs = jax.lax.scan(step, (noise, solver.init(noise), dstate), jnp.arange(solver.num_steps))
        return xs

    return run(den.params, noise, context, negative)


def measure(model, policy: Policy, noise, context, negative, cfg: EBCConfig = EBCConfig(), *, solver=None,
            log=print) -> tuple[np.ndarray, np.ndarray, dict]:
    """EBC's offline measurements: errors and densities (L, H, P), and metadata.

    One head (l, h) runs sparse at candidate p while every other head keeps all blocks (threshold 1), at
    each calibration step of a dense trajectory; the error is the relative squared error of the guided
    velocity per prompt, averaged over prompts and steps; the density is that head's own.
    """
    from vidaccel.solvers import unipc
    from vidaccel.transforms import DenoiseSpec
    from models.wan.denoiser import wan_denoiser

    solver = solver or unipc(50)
    guidance = float(cfg.guidance)
    xs = dense_trajectory(model, noise, context, negative, solver, guidance)
    den = sparse_attention(wan_denoiser(model), policy)
    n = noise.shape[0]
    x2 = jnp.concatenate([noise, noise])
    c2 = jnp.concatenate([context, negative])
    spec = DenoiseSpec(jax.ShapeDtypeStruct(x2.shape, x2.dtype), jax.ShapeDtypeStruct(c2.shape, c2.dtype),
                       solver.num_steps)
    state0 = den.init(spec)
    sp = find_sparse_state(state0)
    L, H = sp.thresholds.shape
    steps = calibration_steps(solver.num_steps, int(policy.dense_steps(solver.num_steps)), cfg.positions)
    cands = np.asarray(cfg.candidates, np.float32)
    P = len(cands)
    tables = np.ones((L, H, P, L, H), np.float32)
    for l in range(L):
        for h in range(H):
            tables[l, h, :, l, h] = cands
    tables = jnp.asarray(tables.reshape(L * H * P, L, H))

    def guided(v):
        return v[n:] + guidance * (v[:n] - v[n:])

    dense = wan_denoiser(model)
    dense_state = dense.init(spec)

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


def calibrate(model, policy: Policy, context, negative, cfg: EBCConfig = EBCConfig(), *, noise=None, seed: int = 0,
              solver=None, log=print) -> EBCTable:
    """Measure (see `measure`) and solve the budgeted table; `noise` defaults to the shapes-world noise."""
    if noise is None:
        from models.shapes.pretrained import latent_noise
        noise = latent_noise(context.shape[0], seed)
    err, dens, meta = measure(model, policy, noise, context, negative, cfg, solver=solver, log=log)
    if cfg.budget is None:
        budget = float(dens[..., cfg.candidates.index(float(cfg.reference_threshold))].mean())
        meta["budget_from"] = f"shared threshold {cfg.reference_threshold}"
    else:
        budget = float(cfg.budget)
    table = EBCTable(np.zeros(err.shape[:2], np.float32), cfg.candidates, err, dens, budget, cfg.solver, meta)
    return table.resolve(budget, cfg.solver)


# ------------------------------------------------------------------------------------------ HASTE
@dataclasses.dataclass(frozen=True)
class HasteConfig:
    """HASTE = base policy + TMR (None = off) + EBC thresholds (an `EBCTable`, its JSON path, or a
    (layers, heads) table; None = the base policy's shared threshold)."""

    tmr: TMRConfig | None = TMRConfig()
    thresholds: Any = None

    def __post_init__(self):
        if self.tmr is not None and not isinstance(self.tmr, TMRConfig):
            raise ValueError(f"HasteConfig.tmr={self.tmr!r} is invalid: a TMRConfig or None")
        t = self.thresholds
        if isinstance(t, (str, Path)):
            t = load_ebc_table(t)
        if isinstance(t, EBCTable):
            t = t.thresholds
        if t is not None:
            a = np.asarray(t, np.float64)
            if a.ndim != 2 or not np.all(np.isfinite(a)) or np.any(a < 0) or np.any(a > 1):
                raise ValueError(f"HasteConfig.thresholds is invalid: a (layers, heads) table in [0, 1], an "
                                 f"EBCTable or its JSON path; got shape {a.shape}")
            t = tuple(tuple(r) for r in a.tolist())
        object.__setattr__(self, "thresholds", t)


def haste(policy: Policy, cfg: HasteConfig = HasteConfig()) -> Policy:
    """HASTE on top of a base policy (XAttention or SVG2): EBC's per-head thresholds, then TMR."""
    if not isinstance(policy, Policy):
        raise TypeError(f"haste needs a base Policy (xattention(...) or svg2(...)), got {type(policy).__name__}")
    if not isinstance(cfg, HasteConfig):
        raise TypeError(f"haste needs a HasteConfig, got {type(cfg).__name__}")
    out = policy
    if cfg.thresholds is not None:
        out = dataclasses.replace(out, name=f"{out.name}+ebc", thresholds=cfg.thresholds)
    if cfg.tmr is not None:
        out = temporal_mask_reuse(out, cfg.tmr)
    return out


__all__ = ["TMRConfig", "TMRState", "pool_blocks", "drift", "reuse_decision", "temporal_mask_reuse",
           "solve_dp", "solve_lagrangian", "solve_budget", "EBCConfig", "EBCTable", "load_ebc_table",
           "calibration_steps", "dense_trajectory", "measure", "calibrate", "HasteConfig", "haste"]


# ------------------------------------------------------------------------------------------ CLI
def default_implementation() -> str:
    """How sparse attention runs by default: the Pallas kernel on GPU; elsewhere the plain-jnp gather path,
    which computes only the selected work (the kernels would run in the slow Pallas interpreter)."""
    return "kernel" if jax.default_backend() == "gpu" else "gather"


def base_policy(name: str, threshold: float | None = None, implementation: str = "reference") -> Policy:
    """The shapes-model setting of a base method ("xattention" or "svg2"), optionally at a shared threshold.
    `implementation` defaults to the jnp reference (masked dense; EBC calibration uses it)."""
    from experiments.svg2 import svg2, svg2_shapes
    from experiments.xattention import xattention, xattention_shapes

    if name == "xattention":
        kw = {} if threshold is None else {"threshold": threshold}
        return xattention(xattention_shapes(implementation=implementation, **kw))
    if name == "svg2":
        kw = {} if threshold is None else {"top_p": threshold}
        return svg2(svg2_shapes(implementation=implementation, **kw))
    raise ValueError(f"unknown base method {name!r}; allowed: xattention, svg2")


SHAPES_TMR = TMRConfig(pool_block=32)        # 512 tokens -> 16 pooled blocks (Wan 720p: 591 blocks of 128)
DEFAULT_EBC_PATHS = {"xattention": RESULTS_ROOT / "sparse" / "ebc_xattention.json",
                     "svg2": RESULTS_ROOT / "sparse" / "ebc_svg2.json"}


def haste_shapes(model, base: str = "xattention", *, ebc="default", tmr: TMRConfig | None = SHAPES_TMR,
                 implementation: str | None = None):
    """HASTE on the shapes model as a Denoiser: the base's shapes setting, TMR, and the EBC table at `ebc`
    ("default": `results/sparse/ebc_<base>.json` when that file exists, else the shared threshold; None: off).
    `implementation` None = `default_implementation()`: the Pallas kernel on GPU, the gather path elsewhere."""
    from models.wan.denoiser import wan_denoiser

    if implementation is None:
        implementation = default_implementation()
    if isinstance(ebc, str) and ebc == "default":
        ebc = DEFAULT_EBC_PATHS[base] if DEFAULT_EBC_PATHS.get(base, Path("/nonexistent")).exists() else None
    return sparse_attention(wan_denoiser(model), haste(base_policy(base, implementation=implementation),
                                                       HasteConfig(tmr=tmr, thresholds=ebc)))


def calibrate_shapes(base: str, *, prompts: int = 4, steps: int = 50, cfg: EBCConfig = EBCConfig(), seed: int = 1,
                     model=None, log=print) -> EBCTable:
    """EBC on the embedded text-to-video model: `prompts` training-split prompts (disjoint from the held-out
    evaluation prompts), UniPC `steps`, CFG `cfg.guidance`, jnp reference attention."""
    from models.shapes import encode_prompts, sample_prompts
    from models.shapes.pretrained import latent_noise, load_shapes_model, training_info
    from vidaccel.solvers import unipc

    model = model or load_shapes_model("t2v")
    texts = sample_prompts(prompts, seed, "train")
    ctx = jnp.asarray(encode_prompts(texts))
    table = calibrate(model, base_policy(base), ctx, jnp.zeros_like(ctx), cfg, noise=latent_noise(prompts, seed),
                      solver=unipc(steps), log=log)
    table.meta.update(base=base, prompts=texts, seed=seed, model_steps=training_info("t2v").get("steps"),
                      config=dataclasses.asdict(cfg))
    return table


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m experiments.haste", description="HASTE's EBC calibration tool")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("calibrate", help="measure per-head errors/densities and solve the budgeted table")
    c.add_argument("--base", choices=["xattention", "svg2"], required=True)
    c.add_argument("--prompts", type=int, default=4, help="calibration prompts (train split; default %(default)s)")
    c.add_argument("--steps", type=int, default=50, help="sampler steps of the trajectory (default %(default)s)")
    c.add_argument("--positions", default="0.1,0.4,0.7", help="calibration steps as fractions of the sparse steps")
    c.add_argument("--budget", type=float, default=None, help="mean density budget (default: the shared threshold's)")
    c.add_argument("--reference", type=float, default=0.9, help="shared threshold defining the default budget")
    c.add_argument("--solver", choices=SOLVERS, default="dp")
    c.add_argument("--seed", type=int, default=1)
    c.add_argument("--out", default=None, help="JSON path (default results/sparse/ebc_<base>.json)")
    a = p.parse_args(argv)
    cfg = EBCConfig(budget=a.budget, reference_threshold=a.reference, solver=a.solver,
                    positions=tuple(float(x) for x in a.positions.split(",")))
    table = calibrate_shapes(a.base, prompts=a.prompts, steps=a.steps, cfg=cfg, seed=a.seed)
    out = Path(a.out or f"results/sparse/ebc_{a.base}.json")
    table.save(out)
    pred = table.predicted()
    print(f"budget {table.budget:.4f}: table error {pred['table']['error']:.4g} at density "
          f"{pred['table']['density']:.4f}; shared {a.reference}: error "
          f"{pred[f'shared_{a.reference:g}']['error']:.4g}; wrote {out}")


if __name__ == "__main__":
    main()
