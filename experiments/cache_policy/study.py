"""The pieces of the cache-policy studies on the embedded shapes t2v model: prompts and dense targets, the
fidelity loss, learning a relaxed policy under a compute budget with optax, hard evaluation on held-out
prompts, the sensitivity map and the memory of the gradient.

    setup = make_setup(steps=20)
    cal = calibrate(setup)                                       # TeaCache at this step count (train prompts)
    res = learn_policy(setup, "schedule", 0.5, calibration=cal)  # straight-through + Lagrangian dual ascent
    ev = evaluate(setup, res.den_hard, res.params_hard)          # hard decisions, held-out prompts, counters
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.harness import video_fidelity
from experiments.teacache import calibrate_teacache, teacache, teacache_config
from models.shapes import LATENT_FRAMES, decode_latents, encode_prompts, sample_prompts
from models.shapes.pretrained import latent_noise, load_shapes_model
from models.wan.denoiser import wan_denoiser
from vidaccel.checks import choice_arg, int_arg
from vidaccel.relaxed import (
    PolicyNetRule,
    RelaxedParams,
    ScheduleRule,
    ThresholdRule,
    check_budget,
    check_temperature,
    compute_fraction,
    relaxed_cache,
    relaxed_params,
    relaxed_sample,
    top_k_schedule,
)
from vidaccel.residual_cache import choose_threshold, rescale, schedule
from vidaccel.sampling import sample
from vidaccel.solvers import unipc
from vidaccel.transforms import total_work

POLICIES = ("threshold", "schedule", "net")
FD_STEP = 0.02       # gate step of the sensitivity study's finite-difference check


@dataclasses.dataclass
class Split:
    """Prompts, their noise and text embeddings, and the dense run's final latents."""

    prompts: list[str]
    noise: jax.Array
    context: jax.Array
    dense: jax.Array


@dataclasses.dataclass
class Setup:
    model: object
    base: object
    solver: object
    guidance: float
    train: Split
    heldout: Split


def _split(base, solver, guidance, n: int, seed: int, which: str, frames: int) -> Split:
    prompts = sample_prompts(n, seed, which)
    ctx = jnp.asarray(encode_prompts(prompts))
    noise = latent_noise(n, seed + (0 if which == "train" else 500), frames)
    dense = sample(base, None, noise, ctx, solver=solver, guidance=guidance, negative_context=jnp.zeros_like(ctx))
    return Split(prompts, noise, ctx, dense.latents)


def make_setup(*, steps: int = 20, train_prompts: int = 2, heldout_prompts: int = 4, guidance: float = 5.0,
               seed: int = 0, frames: int = LATENT_FRAMES, model=None) -> Setup:
    """The committed shapes t2v model, UniPC `steps`, CFG `guidance`, videos of `frames` latent frames;
    training-split and held-out prompts (disjoint by construction of the shapes world) with their dense
    final latents. A prompt's noise depends on its index and `seed`, not on the batch."""
    int_arg("steps", steps, minimum=4)
    int_arg("frames", frames, minimum=1)
    model = load_shapes_model("t2v") if model is None else model
    base, solver = wan_denoiser(model), unipc(steps)
    return Setup(model, base, solver, guidance,
                 _split(base, solver, guidance, train_prompts, seed, "train", frames),
                 _split(base, solver, guidance, heldout_prompts, seed, "heldout", frames))


def rel_mse(x, ref) -> jax.Array:
    """mean (x - ref)^2 / mean ref^2 of final latents."""
    return jnp.mean(jnp.square(x - ref)) / jnp.mean(jnp.square(ref))


def calibrate(setup: Setup, log=print) -> dict:
    """TeaCache calibrated on the setup's training prompts at its step count (`calibrate_teacache`, the
    recipe of `experiments.shapes_presets.calibrate_shapes_teacache`): coefficients, max_change and the
    recorded per-call indicator changes (branches, calls)."""
    tr = setup.train
    log(f"TeaCache: calibrating on {len(tr.prompts)} training prompts at {setup.solver.num_steps} steps")
    cal = calibrate_teacache(setup.base, tr.noise, tr.context, solver=setup.solver, indicator="e0",
                             guidance=setup.guidance, negative_context=jnp.zeros_like(tr.context))
    return {"coefficients": list(cal.coefficients), "max_change": cal.input_max,
            "input_change": np.asarray(cal.input_change), "fit_relative_error": cal.fit_relative_error}


MAX_CHANGE_MARGIN = 1e-3


def teacache_rule(cal: dict, budget: float):
    """The calibrated TeaCache config whose replayed schedule computes the fraction of calls closest to
    `budget`, and that fraction. max_change is the fitted range's top plus `MAX_CHANGE_MARGIN` (relative): at
    exactly the top, round-off in another batch's change of the same timesteps can force a call."""
    base = teacache_config(1.0, cal["coefficients"], max_change=cal["max_change"] * (1 + MAX_CHANGE_MARGIN))
    thresh, frac = choose_threshold(base, np.asarray(cal["input_change"]), len(cal["input_change"][0]), budget)
    return dataclasses.replace(base, thresh=thresh), frac


def teacache_schedule(cal: dict, cfg) -> np.ndarray:
    """(calls,) bool: the calls TeaCache `cfg` computes (replayed on the calibration's changes, branch 0)."""
    return schedule(cfg, np.asarray(cal["input_change"])[:1], len(cal["input_change"][0]))[0]


# ------------------------------------------------------------------------------------------------ learning
@dataclasses.dataclass
class Learned:
    kind: str
    budget: float
    policy: dict
    den_hard: object
    params_hard: RelaxedParams
    history: list[dict]
    seconds: float


def learn_policy(setup: Setup, kind: str, budget: float, *, calibration: dict, iters: int = 12, lr: float | None = None,
                 temperature: float = 0.5, dual_lr: float = 20.0, remat: bool = False, log=print) -> Learned:
    """Learn a `kind` policy on the training prompts ("threshold": TeaCache's threshold; "schedule":
    per-step logits; "net": the `PolicyNetRule` network over TeaCache's indicators): minimise log(rel_mse of
    final latents vs dense) + lam (compute - budget) with Adam, straight-through gates (the forward pass is
    the hard decision, so `compute` is the counted fraction), and dual ascent on lam >= 0. All start from the
    calibrated TeaCache at `budget`. The policy kept is the iterate with the lowest training error among those
    within the budget (the forward pass is hard, so that is the hard policy's training error); `iters`
    updates, `iters + 1` evaluations. The hard version: the threshold and the network as they are; the
    schedule's top round(budget * steps) logits (`top_k_schedule`). `remat`: rematerialise each step (less
    memory, one more forward per step; not needed at the shapes model's size)."""
    choice_arg("kind", kind, POLICIES)
    budget = check_budget(budget)
    temperature = check_temperature(temperature)
    cfg, _ = teacache_rule(calibration, budget)
    steps = setup.solver.num_steps
    if kind in ("threshold", "net"):
        rule = ThresholdRule(cfg) if kind == "threshold" else PolicyNetRule(cfg)
        lr = 0.05 if lr is None else lr
    else:
        init = np.where(teacache_schedule(calibration, cfg), 1.0, -1.0)
        rule = ScheduleRule(steps, init=tuple(float(v) for v in init))
        lr = 0.3 if lr is None else lr
    den = relaxed_cache(setup.base, rule, mode="straight_through")
    tr = setup.train
    neg = jnp.zeros_like(tr.context)

    def objective(policy, lam, temp):
        p = RelaxedParams(den.params.model, policy, temp, rule)
        out = relaxed_sample(den, p, tr.noise, tr.context, solver=setup.solver, guidance=setup.guidance,
                             negative_context=neg, remat=remat)
        err = rel_mse(out.latents, tr.dense)
        frac = compute_fraction(out.state)
        return jnp.log(err) + lam * (frac - budget), (err, frac)

    grad_fn = jax.jit(jax.value_and_grad(objective, has_aux=True))
    opt = optax.adam(lr)
    policy = rule.init_policy()
    state = opt.init(policy)
    lam, history, t0 = 0.0, [], time.perf_counter()
    best, best_err = policy, np.inf
    slack = 0.5 / (2 * steps)            # half a call of the two CFG branches: within the budget
    for it in range(iters + 1):
        (_, (err, frac)), g = grad_fn(policy, jnp.float32(lam), jnp.float32(temperature))
        err, frac = float(err), float(frac)
        history.append({"iter": it, "rel_mse": err, "compute": frac, "lam": lam})
        log(f"  {kind} B={budget:.2f} iter {it:2d}: rel_mse {err:.3e} compute {frac:.3f} lam {lam:.2f}")
        if frac <= budget + slack and err < best_err:
            best, best_err = policy, err
        if it == iters:
            break
        updates, state = opt.update(g, state, policy)
        policy = optax.apply_updates(policy, updates)
        lam = max(0.0, lam + dual_lr * (frac - budget))
    seconds = time.perf_counter() - t0
    policy = best
    hard_policy = top_k_schedule(rule, policy, budget) if kind == "schedule" else policy
    den_hard = relaxed_cache(setup.base, rule, mode="hard")
    return Learned(kind, budget, {k: np.asarray(v) for k, v in policy.items()}, den_hard,
                   relaxed_params(den_hard, hard_policy), history, seconds)


# ------------------------------------------------------------------------------------------------ evaluation
def uniform_schedule(steps: int, budget: float) -> np.ndarray:
    """round(budget * steps) computed calls spread evenly, the first included, as +-1 logits."""
    k = max(1, round(budget * steps))
    keep = np.unique(np.round(np.linspace(0, steps - 1, k)).astype(int))
    out = -np.ones(steps, np.float32)
    out[keep] = 1.0
    return out


def evaluate(setup: Setup, den, params=None, *, split: str = "heldout", relaxed: bool = True) -> dict:
    """Hard run of `den` on a split's prompts: PSNR / SSIM of the decoded videos against the dense run's, the
    relative MSE of the latents, and the compute counted by the denoiser's own counters (block-stack passes
    / calls)."""
    sp = getattr(setup, split)
    neg = jnp.zeros_like(sp.context)
    if relaxed:
        run = jax.jit(lambda p: relaxed_sample(den, p, sp.noise, sp.context, solver=setup.solver,
                                               guidance=setup.guidance, negative_context=neg, remat=False))
        out = run(params)
    else:
        out = sample(den, None, sp.noise, sp.context, solver=setup.solver, guidance=setup.guidance,
                     negative_context=neg)
    work = total_work(out.state)
    fid = video_fidelity(decode_latents(np.asarray(out.latents), uint8=True),
                         decode_latents(np.asarray(sp.dense), uint8=True))
    return {"psnr": fid["psnr"], "ssim": fid["ssim"], "rel_mse": float(rel_mse(out.latents, sp.dense)),
            "compute": work["block_passes"] / work["calls"], "block_passes": work["block_passes"],
            "calls": work["calls"]}


def evaluate_teacache(setup: Setup, cfg, split: str = "heldout") -> dict:
    """The real TeaCache transform (`experiments.teacache.teacache`, lax.cond) with `cfg`, evaluated like
    `evaluate`."""
    return evaluate(setup, teacache(setup.base, cfg), split=split, relaxed=False)


# ------------------------------------------------------------------------------------------------ sensitivity
def sensitivity(setup: Setup, calibration: dict, budget: float = 0.5) -> dict:
    """d log(rel_mse of final latents) / d g_i for every step i, at the calibrated TeaCache's decisions at
    `budget` (gates exactly 0 or 1, the gate values themselves as parameters), on the training prompts;
    beside TeaCache's indicator (rescaled e0 change per step) and the one-at-a-time measured effect of
    flipping each step (computing a reused step, reusing a computed one)."""
    cfg, frac = teacache_rule(calibration, budget)
    sched = teacache_schedule(calibration, cfg)
    steps = setup.solver.num_steps
    rule = ScheduleRule(steps, parametrization="gates")
    den = relaxed_cache(setup.base, rule, mode="soft")
    tr = setup.train
    neg = jnp.zeros_like(tr.context)

    def log_err(gates):
        p = RelaxedParams(den.params.model, {"gates": gates}, jnp.float32(1.0), rule)
        out = relaxed_sample(den, p, tr.noise, tr.context, solver=setup.solver, guidance=setup.guidance,
                             negative_context=neg)
        return jnp.log(rel_mse(out.latents, tr.dense))

    g0 = jnp.asarray(sched, jnp.float32)
    value, grad = jax.jit(jax.value_and_grad(log_err))(g0)
    f = jax.jit(log_err)
    flipped = []
    for i in range(steps):
        gi = g0.at[i].set(1.0 - g0[i])
        flipped.append(float(f(gi)) - float(value) if i > 0 else 0.0)
    fd = {}          # one-sided differences (gates stay in [0, 1]) at the 3 largest gradients: checks the gradient
    for i in np.argsort(-np.abs(np.asarray(grad)))[:3]:
        h = FD_STEP if sched[i] == 0 else -FD_STEP
        fd[int(i)] = {"gradient": float(grad[i]), "finite_difference": (float(f(g0.at[i].add(h))) - float(value)) / h}
    changes = np.asarray(calibration["input_change"])[0]
    indicator = np.asarray(rescale(tuple(calibration["coefficients"]), jnp.asarray(changes), calibration["max_change"]))
    return {"teacache_threshold": cfg.thresh, "teacache_fraction": frac, "teacache_schedule": sched.astype(int),
            "log_rel_mse": float(value), "gradient": np.asarray(grad), "flip_effect": np.asarray(flipped),
            "finite_difference_check": fd, "fd_step": FD_STEP,
            "indicator_change": changes, "indicator_rescaled": np.where(np.isfinite(indicator), indicator, np.nan)}


# ------------------------------------------------------------------------------------------------ memory
def grad_memory(setup: Setup, steps: int, *, remat) -> dict:
    """Compiled memory of the gradient (with respect to a per-step schedule) of the final-latent error
    through a `steps`-step sample of one prompt with CFG: XLA's memory_analysis of the compiled program
    (temporaries; arguments and outputs listed apart). Compiles, does not run."""
    solver = unipc(steps)
    rule = ScheduleRule(steps)
    den = relaxed_cache(setup.base, rule, mode="soft")
    tr = setup.train
    noise, ctx, ref = tr.noise[:1], tr.context[:1], tr.dense[:1]

    def loss(policy):
        p = RelaxedParams(den.params.model, policy, jnp.float32(1.0), rule)
        out = relaxed_sample(den, p, noise, ctx, solver=solver, guidance=setup.guidance,
                             negative_context=jnp.zeros_like(ctx), remat=remat)
        return rel_mse(out.latents, ref)

    t0 = time.perf_counter()
    mem = jax.jit(jax.grad(loss)).lower(rule.init_policy()).compile().memory_analysis()
    return {"steps": steps, "remat": remat, "temp_bytes": int(mem.temp_size_in_bytes),
            "argument_bytes": int(mem.argument_size_in_bytes), "output_bytes": int(mem.output_size_in_bytes),
            "peak_bytes": int(mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes),
            "compile_seconds": time.perf_counter() - t0}


def pareto_point(kind: str, budget: float, ev: dict, **extra) -> dict:
    return {"method": kind, "budget": budget, **ev, **extra}


def fmt_bytes(n: int) -> str:
    return f"{n / 2 ** 20:.1f} MiB"


def psnr_gain(a: dict, b: dict) -> float:
    return a["psnr"] - b["psnr"]

