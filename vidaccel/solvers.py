"""Flow-matching samplers as pure solvers: shifted sigma schedules, Euler and UniPC.

Each solver equals a diffusers scheduler (0.42.1) driven the way `WanPipeline` drives it:
- `euler(N, shift)` = `FlowMatchEulerDiscreteScheduler(shift=shift)`;
- `unipc(N, shift)` = `UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction",
  flow_shift=shift)` with its defaults: order 2, `bh2`, predict x0, lower-order final step, final sigma 0 —
  the scheduler config of the Wan2.1-Diffusers checkpoints.

Flow convention: x_t = (1 - sigma) x0 + sigma noise, the model predicts v = noise - x0 and is fed
`timesteps[i]` (the diffusers values: float32 sigma*1000 for Euler, int64 truncation for UniPC).

A `Solver` is static (hashable, so it can be a jit static argument): host-side schedule plus a per-step
table of scalar coefficients computed once in float64 from the float32 sigmas diffusers uses. `init(x)`
makes the state pytree and `step(state, i, x, v)` advances; `i` may be traced (inside `lax.scan`), and
may be one index per latent frame (diffusion forcing: every frame at its own point of its own schedule,
see `Solver.step`). Arithmetic on latents is fp32; outputs keep the input dtype.

Default shift 3.0 is the Wan2.1-Diffusers scheduler config (diffusers' docs: "The default value is 3.0 for
Wan"); the diffusers classes themselves default to 1.0, Wan's generate.py uses 5.0 for T2V and SkyReels-V2
DF uses 8.0.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from vidaccel.checks import bool_arg, float_arg, int_arg

__all__ = ["Solver", "SolverState", "euler", "unipc", "shift_sigmas", "euler_schedule", "unipc_schedule"]

DEFAULT_SHIFT = 3.0
NUM_TRAIN_TIMESTEPS = 1000


# ---------------------------------------------------------------- schedules

def shift_sigmas(sigmas: np.ndarray, shift: float) -> np.ndarray:
    """The flow-matching time shift sigma' = s sigma / (1 + (s - 1) sigma), in the array's dtype."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def euler_schedule(steps: int, shift: float = DEFAULT_SHIFT,
                   num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> tuple[np.ndarray, np.ndarray]:
    """(sigmas (N+1,) float32, timesteps (N,) float32) of `FlowMatchEulerDiscreteScheduler(shift=s)`.

    diffusers shifts the training sigmas in float32 at construction, spaces N timesteps between the
    shifted extremes in float64, then shifts again (so the last sigma is shifted twice), and rounds to
    float32; timesteps = float32 sigma * T; a final sigma 0 is appended.
    """
    steps = int_arg("steps", steps, 1)
    shift = float_arg("shift", shift, low=0.0, low_open=True)
    T = int_arg("num_train_timesteps", num_train_timesteps, 1)
    train = np.linspace(1, T, T, dtype=np.float32)[::-1] / np.float32(T)
    ends = train[[0, -1]]
    ends = np.float32(shift) * ends / (np.float32(1) + np.float32(shift - 1) * ends)
    sigma_max, sigma_min = float(ends[0]), float(ends[1])
    t = np.linspace(sigma_max * T, sigma_min * T, steps)
    sigmas = shift_sigmas(t / T, shift).astype(np.float32)
    timesteps = sigmas * np.float32(T)
    return np.concatenate([sigmas, np.zeros(1, np.float32)]), timesteps


def unipc_schedule(steps: int, shift: float = DEFAULT_SHIFT,
                   num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> tuple[np.ndarray, np.ndarray]:
    """(sigmas (N+1,) float32, timesteps (N,) int64) of the flow-sigma `UniPCMultistepScheduler`.

    Base sigmas linspace(1, 1/T, N+1)[:-1] in float64, shifted; a first sigma within 1e-6 of 1 is lowered
    by 1e-6 (diffusers: avoids log(0)); timesteps = int64(sigma * T) from the float64 sigmas (truncation);
    sigmas rounded to float32 with a final 0 appended.
    """
    steps = int_arg("steps", steps, 1)
    shift = float_arg("shift", shift, low=0.0, low_open=True)
    T = int_arg("num_train_timesteps", num_train_timesteps, 1)
    sig = shift_sigmas(np.linspace(1, 1 / T, steps + 1)[:-1], shift)
    if abs(sig[0] - 1) < 1e-6:
        sig[0] -= 1e-6
    timesteps = (sig * T).astype(np.int64)
    return np.concatenate([sig, [0.0]]).astype(np.float32), timesteps


# ---------------------------------------------------------------- UniPC coefficients

def _unipc_orders(steps: int, order: int) -> list[int]:
    # warm-up (lower_order_nums) and lower_order_final, as diffusers' step() computes this_order
    return [min(order, steps - k, k + 1) for k in range(steps)]


def _unipc_update(lam: np.ndarray, alpha: np.ndarray, sig: np.ndarray, t: int, s0: int, hist: list[int],
                  corrector: bool):
    """Scalars of one UniP (corrector=False) or UniC (True) B(h)=expm1 (bh2) update, predicting x0.

    Returns (x coefficient, m0 coefficient alpha_t*h_phi_1, alpha_t*B_h, [rho_i / r_i per older output],
    rho on the new output (UniC only)); the update is
    x_t = cx x - cm m0 - cb (sum_i w_i (m_i - m0) [+ w_t (m_t - m0)]).
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        h = lam[t] - lam[s0]
        hh = -h
        h_phi_1 = np.expm1(hh)
        B_h = np.expm1(hh)
        rks = np.array([(lam[si] - lam[s0]) / h for si in hist] + [1.0])
        q = len(rks)
        R = np.stack([rks ** j for j in range(q)])
        b = []
        h_phi_k = h_phi_1 / hh - 1
        fact = 1
        for j in range(1, q + 1):
            b.append(h_phi_k * fact / B_h)
            fact *= j + 1
            h_phi_k = h_phi_k / hh - 1 / fact
        b = np.array(b)
        if corrector:
            rhos = np.array([0.5]) if q == 1 else np.linalg.solve(R, b)
            w_hist, w_t = list(rhos[:-1] / rks[:-1]), float(rhos[-1])
        else:
            if q == 1:
                rhos = np.zeros(0)
            elif q == 2:
                rhos = np.array([0.5])
            else:
                rhos = np.linalg.solve(R[:-1, :-1], b[:-1])
            w_hist, w_t = list(rhos / rks[:-1]), 0.0
        cx = sig[t] / sig[s0]
    return cx, alpha[t] * h_phi_1, alpha[t] * B_h, w_hist, w_t


def _unipc_table(sigmas: np.ndarray, order: int, disable_corrector: tuple[int, ...]) -> np.ndarray:
    """(N, 6 + 2 (order-1) + 3) float64 table; columns in `_unipc_columns(order)` order."""
    N = len(sigmas) - 1
    sig = sigmas.astype(np.float64)
    alpha = 1 - sig
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sig)
    orders = _unipc_orders(N, order)
    cols = _unipc_columns(order)
    table = np.zeros((N, cols["width"]), np.float64)
    for k in range(N):
        row = table[k]
        row[cols["sigma"]] = sig[k]
        if k > 0 and (k - 1) not in disable_corrector:
            q = orders[k - 1]
            cx, cm, cb, w_hist, w_t = _unipc_update(lam, alpha, sig, k, k - 1,
                                                    [k - 1 - j for j in range(1, q)], corrector=True)
            row[cols["corr"]] = 1.0
            row[cols["cx"]], row[cols["cm"]], row[cols["cb"]], row[cols["ct"]] = cx, cm, cb, w_t
            for j, w in enumerate(w_hist):
                row[cols["ch"] + j] = w
        q = orders[k]
        px, pm, pb, w_hist, _ = _unipc_update(lam, alpha, sig, k + 1, k, [k - j for j in range(1, q)],
                                              corrector=False)
        row[cols["px"]], row[cols["pm"]], row[cols["pb"]] = px, pm, pb
        for j, w in enumerate(w_hist):
            row[cols["ph"] + j] = w
    return table


def _unipc_columns(order: int) -> dict[str, int]:
    names = ["sigma", "corr", "cx", "cm", "cb", "ct"]
    cols = {n: j for j, n in enumerate(names)}
    cols["ch"] = len(names)
    cols["px"] = cols["ch"] + order - 1
    cols["pm"], cols["pb"], cols["ph"] = cols["px"] + 1, cols["px"] + 2, cols["px"] + 3
    cols["width"] = cols["ph"] + order - 1
    return cols


# ---------------------------------------------------------------- solver

@struct.dataclass
class SolverState:
    """Per-run solver state (fp32, shapes fixed by `Solver.init`). Empty (None leaves) for Euler.

    last_sample: UniPC's corrected latent of the previous step (diffusers' `last_sample`).
    history: (order, *x.shape) UniPC x0 predictions, newest first (diffusers' `model_outputs` reversed).
    """

    last_sample: jax.Array | None = None
    history: jax.Array | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class Solver:
    """A flow-matching solver: host schedule + pure `init`/`step`. Hashable, static under jit.

    sigmas: (N+1,) float64 holding diffusers' float32 sigmas, last 0. timesteps: (N,) the model timesteps
    diffusers feeds the transformer (float32 for Euler, int64 for UniPC). options: the settings beyond
    (name, num_steps, shift), as sorted (key, value) pairs. table: per-step scalar coefficients.
    """

    name: str
    num_steps: int
    shift: float
    sigmas: np.ndarray
    timesteps: np.ndarray
    options: tuple[tuple[str, Any], ...] = ()
    table: np.ndarray = dataclasses.field(default=None, repr=False)

    def __post_init__(self):
        for a in (self.sigmas, self.timesteps, self.table):
            a.setflags(write=False)

    def _key(self):
        return (self.name, self.num_steps, self.shift, self.options)

    def __hash__(self) -> int:
        return hash(self._key())

    def __eq__(self, other) -> bool:
        return isinstance(other, Solver) and self._key() == other._key()

    @property
    def order(self) -> int:
        return dict(self.options).get("solver_order", 1)

    def init(self, x: jax.Array) -> SolverState:
        """State for latents shaped like `x` (any shape; (B, F, H, W, C) for per-frame stepping)."""
        if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
            raise TypeError(f"x must be a floating array, got dtype {jnp.result_type(x)}")
        if self.name == "euler":
            return SolverState()
        shape = jnp.shape(x)
        return SolverState(last_sample=jnp.zeros(shape, jnp.float32),
                           history=jnp.zeros((self.order, *shape), jnp.float32))

    def step(self, state: SolverState, i, x: jax.Array, velocity: jax.Array, *,
             update: jax.Array | None = None) -> tuple[jax.Array, SolverState]:
        """Advance x from sigmas[i] to sigmas[i+1] with the model's velocity at (x, timesteps[i]).

        i: int32 step index, traced or concrete; or, for diffusion forcing, an int array (F,) with one step
        index per latent frame, x and velocity then shaped (B, F, H, W, C) — frame f advances from
        sigmas[i[f]] with its own history, exactly as if it had its own scheduler (SkyReels-V2 keeps one
        UniPC scheduler per latent frame). update: optional bool, scalar or (F,): frames where it is False
        keep x and their state unchanged (their i is then ignored and may be out of range). A concrete
        index outside [0, N) is a ValueError; a traced one yields NaN rather than a silently clamped step.
        Returns (x_next in x's dtype, new state).
        """
        x = jnp.asarray(x)
        velocity = jnp.asarray(velocity)
        for nm, a in (("x", x), ("velocity", velocity)):
            if not jnp.issubdtype(a.dtype, jnp.floating):
                raise TypeError(f"{nm} must be a floating array, got dtype {a.dtype}")
        if velocity.shape != x.shape:
            raise ValueError(f"velocity shape {velocity.shape} != x shape {x.shape}")
        i = self._check_index(i, check_range=update is None)
        frames = None
        if i.ndim == 1:
            frames = i.shape[0]
        if update is not None:
            update = jnp.asarray(update)
            if update.dtype != jnp.bool_:
                raise TypeError(f"update must be a bool array, got dtype {update.dtype}")
            if update.ndim > 1 or (frames is not None and update.ndim == 1 and update.shape[0] != frames):
                raise ValueError(f"update must be a scalar or shaped (F,) like i; got {update.shape} "
                                 f"with i {i.shape}")
            if update.ndim == 1:
                frames = update.shape[0]
        if frames is not None and (x.ndim != 5 or x.shape[1] != frames):
            raise ValueError(f"per-frame stepping needs x shaped (B, F, H, W, C) with F = {frames}; "
                             f"got {x.shape}")
        bshape = (1, frames, 1, 1, 1) if frames is not None else ()
        u = None if update is None else update.reshape(bshape if update.ndim else ())
        if u is not None and i.ndim == 0 and frames is not None:
            i = jnp.broadcast_to(i, (frames,))
        coef = self._gather(i, update, bshape if i.ndim else ())
        if self.name == "euler":
            x_next = (x.astype(jnp.float32) + coef(0) * velocity.astype(jnp.float32)).astype(x.dtype)
            return (x_next if u is None else jnp.where(u, x_next, x)), state
        return self._unipc_step(state, coef, x, velocity, u)

    # -- internals

    def _check_index(self, i, check_range: bool) -> jax.Array:
        """i as int32 (scalar or (F,)); a concrete i is range-checked when every frame is updated."""
        if not isinstance(i, jax.core.Tracer):
            arr = np.asarray(i)
            if not np.issubdtype(arr.dtype, np.integer):
                raise TypeError(f"step index i must be an integer, got dtype {arr.dtype}")
            if check_range and arr.ndim <= 1 and arr.size and (arr.min() < 0 or arr.max() >= self.num_steps):
                raise ValueError(f"step index i={arr.tolist()} is out of range [0, {self.num_steps}) for "
                                 f"{self.name} with {self.num_steps} steps")
        i = jnp.asarray(i)
        if not jnp.issubdtype(i.dtype, jnp.integer):
            raise TypeError(f"step index i must be an integer, got dtype {i.dtype}")
        if i.ndim > 1:
            raise ValueError(f"step index i must be a scalar or shaped (F,), got shape {i.shape}")
        return i.astype(jnp.int32)

    def _gather(self, i: jax.Array, update: jax.Array | None, bshape: tuple[int, ...]):
        """Rows of the coefficient table at i (NaN where i is out of range and the frame is updated)."""
        if update is not None:  # masked-out frames may carry any index: keep it in range for them
            i = jnp.where(update, i, jnp.clip(i, 0, self.num_steps - 1))
        table = jnp.asarray(self.table, jnp.float32)
        rows = jnp.take(table, i, axis=0, mode="fill", fill_value=jnp.nan)
        return lambda col: rows[..., col].reshape(bshape)

    def _unipc_step(self, state: SolverState, coef, x, velocity, u):
        if state.history is None or state.history.shape != (self.order, *x.shape):
            got = None if state.history is None else state.history.shape
            raise ValueError(f"UniPC state history has shape {got}; expected {(self.order, *x.shape)} "
                             "(make the state with this solver's init(x))")
        c = _unipc_columns(self.order)
        p = self.order
        xf, vf = x.astype(jnp.float32), velocity.astype(jnp.float32)
        hist, last = state.history, state.last_sample
        m = xf - coef(c["sigma"]) * vf  # x0 prediction (flow): x - sigma v
        m1 = hist[0]
        corr = coef(c["ct"]) * (m - m1)
        for j in range(1, p):
            corr = coef(c["ch"] + j - 1) * (hist[j] - m1) + corr
        corrected = coef(c["cx"]) * last - coef(c["cm"]) * m1 - coef(c["cb"]) * corr
        use_corr = coef(c["corr"]) > 0
        xc = jnp.where(use_corr, corrected, xf)
        pred = jnp.zeros_like(m)
        for j in range(1, p):
            pred = pred + coef(c["ph"] + j - 1) * (hist[j - 1] - m)
        x_next = coef(c["px"]) * xc - coef(c["pm"]) * m - coef(c["pb"]) * pred
        out = x_next.astype(x.dtype)
        new_last = xc
        if dict(self.options)["last_sample_aliasing"]:
            new_last = jnp.where(use_corr, xc, out.astype(jnp.float32))
        new_hist = jnp.concatenate([m[None], hist[:-1]], axis=0)
        if u is not None:
            out = jnp.where(u, out, x)
            new_last = jnp.where(u, new_last, last)
            new_hist = jnp.where(u[None], new_hist, hist)
        return out, SolverState(last_sample=new_last, history=new_hist)


# ---------------------------------------------------------------- constructors

def euler(steps: int, shift: float = DEFAULT_SHIFT, *,
          num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> Solver:
    """Flow-matching Euler: x_{i+1} = x_i + (sigma_{i+1} - sigma_i) v_i.

    Equals diffusers' `FlowMatchEulerDiscreteScheduler(shift=shift, num_train_timesteps=...)` (deterministic:
    no dynamic shifting, shift_terminal, Karras/exponential/beta sigmas or stochastic sampling).
    """
    sigmas, timesteps = euler_schedule(steps, shift, num_train_timesteps)
    dt = (sigmas[1:] - sigmas[:-1]).astype(np.float32)  # float32 difference, as torch computes it
    return Solver("euler", int(steps), float(shift), sigmas.astype(np.float64), timesteps,
                  (("num_train_timesteps", int(num_train_timesteps)),), dt.astype(np.float64)[:, None])


def unipc(steps: int, shift: float = DEFAULT_SHIFT, *, solver_order: int = 2, solver_type: str = "bh2",
          lower_order_final: bool = True, disable_corrector: Iterable[int] = (),
          num_train_timesteps: int = NUM_TRAIN_TIMESTEPS, last_sample_aliasing: bool = False) -> Solver:
    """UniPC (UniP predictor + UniC corrector, x0 prediction) for flow-matching models.

    Equals diffusers' `UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction",
    flow_shift=shift, solver_order=..., disable_corrector=..., num_train_timesteps=...)` with predict_x0,
    final_sigmas_type "zero", no thresholding, as `WanPipeline` runs it (`set_begin_index(0)`).

    solver_order: 1, 2 (Wan) or 3. The first steps warm up from order 1 and the last step is order 1.
    solver_type: only "bh2"; diffusers' "bh1" turns the final step (sigma 0) into NaN.
    lower_order_final: must stay True for order >= 2; with False diffusers' final step is non-finite.
    disable_corrector: step indices j whose UniC correction (applied at the start of step j+1) is skipped.
    last_sample_aliasing: reproduce diffusers' / SkyReels-V2's diffusion-forcing loop, which writes each
    frame's step output in place into the latents it passed as `sample`: where the corrector did not run
    (the first step, disabled steps) the scheduler's `last_sample` is that view, so the next corrector
    starts from the new latent instead of the old one. False (default) is the plain scheduler semantics.
    """
    order = int_arg("solver_order", solver_order, 1, 3)
    if solver_type != "bh2":
        raise ValueError(f"solver_type must be 'bh2', got {solver_type!r}: diffusers' 'bh1' yields NaN at the "
                         "final step to sigma 0 (B(h) = h is infinite there)")
    bool_arg("lower_order_final", lower_order_final)
    if not lower_order_final and order > 1:
        raise ValueError(f"lower_order_final=False with solver_order={order} is not supported: the final "
                         "multistep update to sigma 0 divides by an infinite log-SNR step (diffusers returns -inf)")
    last_sample_aliasing = bool_arg("last_sample_aliasing", last_sample_aliasing)
    steps = int_arg("steps", steps, 1)
    disabled = []
    for j in disable_corrector:
        j = int_arg("disable_corrector entry", j, 0)
        if j > steps - 2:
            raise ValueError(f"disable_corrector entry {j} is out of range: the corrector after step j runs "
                             f"only for j in [0, {steps - 2}] with steps={steps}")
        disabled.append(j)
    disabled = tuple(sorted(set(disabled)))
    sigmas, timesteps = unipc_schedule(steps, shift, num_train_timesteps)
    if not np.all(np.diff(sigmas.astype(np.float64)) < 0):
        raise ValueError(f"unipc(steps={steps}, shift={shift}, num_train_timesteps={num_train_timesteps}) gives "
                         "repeated float32 sigmas; UniPC needs strictly decreasing sigmas (use fewer steps)")
    table = _unipc_table(sigmas, order, disabled)
    if not np.all(np.isfinite(table)):
        raise ValueError(f"unipc(steps={steps}, shift={shift}) has non-finite update coefficients")
    options = (("disable_corrector", disabled), ("last_sample_aliasing", last_sample_aliasing),
               ("num_train_timesteps", int(num_train_timesteps)), ("solver_order", order))
    return Solver("unipc", steps, float(shift), sigmas.astype(np.float64), timesteps, options, table)
