"""The budgeted choice behind HASTE's EBC: one candidate threshold per head, least summed error under a mean
density budget (a multiple-choice knapsack). Pure numpy; the measurements come from `experiments.haste.ebc`.
"""

from __future__ import annotations

import numpy as np

from vidaccel.checks import choice_arg, float_arg

SOLVERS = ("dp", "lagrangian")


def _check_problem(err, dens):
    err, dens = np.asarray(err, np.float64), np.asarray(dens, np.float64)
    if err.ndim != 2 or err.shape != dens.shape or err.size == 0:
        raise ValueError(f"errors and densities must be matching (heads, candidates) arrays; got {err.shape} "
                         f"and {dens.shape}")
    if not (np.all(np.isfinite(err)) and np.all(np.isfinite(dens))):
        raise ValueError("errors and densities must be finite")
    return err, dens


def _check_budget(budget, dens):
    budget = float_arg("budget", budget)
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
        idx = np.flatnonzero(d <= cap)
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
    rows = np.arange(len(dens))
    mean = lambda lam: dens[rows, _lagrange_choice(err, dens, lam)].mean()
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
    """Per-head candidate indices under a mean-density budget with the named solver (one of `SOLVERS`)."""
    choice_arg("solver", solver, SOLVERS)
    return solve_dp(err, dens, budget) if solver == "dp" else solve_lagrangian(err, dens, budget)


__all__ = ["SOLVERS", "solve_dp", "solve_lagrangian", "solve_budget"]
