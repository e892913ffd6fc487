"""The pieces of the cache-policy studies on the embedded shapes models: prompts and dense targets, the
fidelity loss, learning a relaxed policy under a compute budget with optax, hard evaluation on held-out
prompts, the sensitivity map and the memory of the gradient. A `Setup` is a t2v one (`make_setup`: sampling,
TeaCache is the calibrated baseline) or an AR one (`experiments.cache_policy.ar.make_ar_setup`: rollouts of
`chunks` chunks, FlowCache is the baseline); learning and evaluation take either.

    setup = make_setup(steps=20)
    cal = calibrate(setup)                                       # TeaCache at this step count (train prompts)
    res = learn_policy(setup, "schedule", 0.5, calibration=cal)  # annealed soft gates + Lagrangian dual ascent
    ev = evaluate(setup, res.den_hard, res.params_hard)          # hard decisions, held-out prompts, counters
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.flowcache import flowcache, flowcache_config
from experiments.harness import video_fidelity
from experiments.teacache import calibrate_teacache, teacache, teacache_config
from models.ar.rollout import rollout
from models.shapes import LATENT_FRAMES, decode_latents, encode_prompts, sample_prompts
from models.shapes.pretrained import latent_noise, load_shapes_model
from models.wan.denoiser import wan_denoiser
from vidaccel.checks import choice_arg, float_arg, int_arg
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
    relaxed_rollout,
    relaxed_sample,
    top_k_schedule,
)
from vidaccel.residual_cache import choose_threshold, rescale, schedule
from vidaccel.sampling import sample
from vidaccel.solvers import unipc
from vidaccel.transforms import branch_states, total_work

POLICIES = ("threshold", "schedule", "net")
LEARNING_RATES = {"threshold": 0.05, "schedule": 0.25, "net": 0.05}   # Adam step per policy kind (see learn_policy)
LEARN_MODES = ("soft", "straight_through")
BUDGET_TOLERANCE = 0.02          # the B% +- 2%: a hard policy holds its budget when |compute - B| <= 0.02
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
    """A model's staged denoiser, solver and CFG scale, and its training and held-out splits. `chunks` = 0: t2v
    sampling (`sample` / `relaxed_sample`); > 0: AR rollouts of that many chunks (`rollout` /
    `relaxed_rollout`, `base` a chunk denoiser)."""

    model: object
    base: object
    solver: object
    guidance: float
    train: Split
    heldout: Split | None
    chunks: int = 0

    @property
    def calls(self) -> int:
        """Calls per CFG branch of one run (steps, x chunks on AR setups)."""
        return self.solver.num_steps * max(self.chunks, 1)


def dense_run(den, solver, guidance, noise, context, *, chunks: int = 0):
    """The output of (non-relaxed) denoiser `den`: `sample`, or `rollout` when `chunks`; negative context zeros."""
    neg = jnp.zeros_like(context)
    if chunks:
        return rollout(den, noise, context, solver=solver, guidance=guidance, negative_context=neg)
    return sample(den, None, noise, context, solver=solver, guidance=guidance, negative_context=neg)


def make_split(base, solver, guidance, n: int, seed: int, which: str, frames: int, *, chunks: int = 0) -> Split:
    """`n` prompts of split `which` with noise of `frames` latent frames (seed + 500 for held-out) and the
    dense run's final latents."""
    prompts = sample_prompts(n, seed, which)
    ctx = jnp.asarray(encode_prompts(prompts))
    noise = latent_noise(n, seed + (0 if which == "train" else 500), frames)
    return Split(prompts, noise, ctx, dense_run(base, solver, guidance, noise, ctx, chunks=chunks).latents)


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
                 make_split(base, solver, guidance, train_prompts, seed, "train", frames),
                 make_split(base, solver, guidance, heldout_prompts, seed, "heldout", frames))


def rel_mse(x, ref) -> jax.Array:
    """mean (x - ref)^2 / mean ref^2 of final latents."""
    return jnp.mean(jnp.square(x - ref)) / jnp.mean(jnp.square(ref))


def baseline_name(setup: Setup) -> str:
    return "FlowCache" if setup.chunks else "TeaCache"


def calibrate(setup: Setup, log=print) -> dict:
    """The setup's calibrated baseline on its training prompts at its step count (`calibrate_teacache`, the
    recipe of `experiments.shapes_presets.calibrate_shapes_teacache`): TeaCache (t2v) or FlowCache-SkyReels (AR,
    per-chunk scope). Returns its config at threshold 1 ("config"), coefficients, max_change, the recorded
    per-call indicator changes (branches, calls) and the calls per scope ("scope_calls")."""
    tr = setup.train
    log(f"{baseline_name(setup)}: calibrating on {len(tr.prompts)} training prompts at {setup.solver.num_steps} "
        "steps" + (f" x {setup.chunks} chunks" if setup.chunks else ""))
    cal = calibrate_teacache(setup.base, tr.noise, tr.context, solver=setup.solver, indicator="e0",
                             guidance=setup.guidance, negative_context=jnp.zeros_like(tr.context))
    make = flowcache_config if setup.chunks else teacache_config
    cfg = make(1.0, cal.coefficients, max_change=cal.input_max * (1 + MAX_CHANGE_MARGIN))
    changes = np.asarray(cal.input_change)
    return {"config": cfg, "coefficients": list(cal.coefficients), "max_change": cal.input_max,
            "input_change": changes, "fit_relative_error": cal.fit_relative_error,
            "scope_calls": setup.solver.num_steps if setup.chunks else changes.shape[1]}


MAX_CHANGE_MARGIN = 1e-3


def teacache_rule(cal: dict, budget: float):
    """The calibrated baseline's config (TeaCache; FlowCache on AR setups) whose replayed schedule computes the
    fraction of calls closest to `budget`, and that fraction. max_change is the fitted range's top plus
    `MAX_CHANGE_MARGIN` (relative): at exactly the top, round-off in another batch's change of the same
    timesteps can force a call."""
    thresh, frac = choose_threshold(cal["config"], cal["input_change"], cal["scope_calls"], budget)
    return dataclasses.replace(cal["config"], thresh=thresh), frac


def teacache_schedule(cal: dict, cfg) -> np.ndarray:
    """(calls,) bool: the calls the baseline `cfg` computes (replayed on the calibration's changes, branch 0;
    chunk-major on AR setups)."""
    return schedule(cfg, np.asarray(cal["input_change"])[:1], cal["scope_calls"])[0]


def threshold_schedules(cal: dict, budget: float, *, grid: int = 200, tolerance: float = BUDGET_TOLERANCE) -> dict:
    """Every distinct hard schedule the baseline's rule reaches on the calibration's recorded changes over a log
    grid of thresholds (0.01x to 100x the budget's), and those within `tolerance` of `budget`: how much room a
    learned threshold has (the e0 indicator depends on the timestep only, so one threshold is one schedule)."""
    cfg, _ = teacache_rule(cal, budget)
    seen = {}
    for th in np.geomspace(cfg.thresh * 1e-2, cfg.thresh * 1e2, grid):
        s = teacache_schedule(cal, dataclasses.replace(cfg, thresh=float(th)))
        seen.setdefault(s.tobytes(), s)
    fracs = [float(s.mean()) for s in seen.values()]
    return {"distinct": len(seen), "within_budget": sum(abs(f - budget) <= tolerance for f in fracs)}


def relaxed_run(setup: Setup, den, params, split: str = "train", *, remat=False, sp: Split | None = None):
    """`relaxed_sample` (t2v) or `relaxed_rollout` (AR) of relaxed `den` on a split's prompts."""
    sp = getattr(setup, split) if sp is None else sp
    run = relaxed_rollout if setup.chunks else relaxed_sample
    return run(den, params, sp.noise, sp.context, solver=setup.solver, guidance=setup.guidance,
               negative_context=jnp.zeros_like(sp.context), remat=remat)


# ------------------------------------------------------------------------------------------------ learning
@dataclasses.dataclass
class Learned:
    """A learned policy: the kept iterate (`policy`, its index `best_iter`), its hard denoiser and params
    (`den_hard`, `params_hard`: the schedule's top round(budget x calls) logits), every iterate's record."""

    kind: str
    budget: float
    policy: dict
    den_hard: object
    params_hard: RelaxedParams
    history: list[dict]
    seconds: float
    best_iter: int = 0


def policy_rule(setup: Setup, kind: str, cal: dict, budget: float):
    """The relaxed rule of a policy `kind` started at the calibrated baseline for `budget`: its threshold
    ("threshold"), its margin ("net", `PolicyNetRule`), or its replayed schedule as logits +-1 ("schedule",
    scope "chunk" on AR setups)."""
    cfg, _ = teacache_rule(cal, budget)
    if kind == "threshold":
        return ThresholdRule(cfg)
    if kind == "net":
        return PolicyNetRule(cfg)
    init = np.where(teacache_schedule(cal, cfg), 1.0, -1.0)
    return ScheduleRule(setup.calls, init=tuple(float(v) for v in init), scope=cfg.scope)


def harden(setup: Setup, rule, policy, budget: float) -> dict:
    """The hard version of a learned policy: a schedule's top round(budget x calls) logits (each chunk's first
    call forced on AR setups, `top_k_schedule`); a threshold or network as it is."""
    if not isinstance(rule, ScheduleRule):
        return policy
    return top_k_schedule(rule, policy, budget, setup.solver.num_steps if rule.scope == "chunk" else None)


def learn_under_budget(objective, hard_eval, policy, budget: float, *, iters: int, lr: float, temperature: float,
                       final_temperature: float, dual_lr: float = 10.0, project=None,
                       compute_name: str = "hard_compute", label: str = "",
                       log=print) -> tuple[object, int, list[dict], float]:
    """The learning protocol every study shares (thresholds, schedules, networks, head tables, token thresholds).

    Adam (`lr`) on `objective(policy, lam, T) -> (loss, (soft rel_mse, expected compute))`, with T annealed
    geometrically from `temperature` to `final_temperature` over the `iters` updates and dual ascent
    lam <- max(0, lam + dual_lr (expected - budget)); `project(policy)` (e.g. a clip) follows every update.
    Every iterate, the start included, is evaluated by `hard_eval(policy) -> (hard rel_mse, counted compute,
    extra record fields)`; the kept policy is the one with the lowest hard error among those whose counted
    compute is within `BUDGET_TOLERANCE` of the budget (the start when none is). Returns (kept policy, its
    iterate, one record per iterate, seconds); the records name the counted compute `compute_name`.
    """
    grad_fn = jax.jit(jax.value_and_grad(objective, has_aux=True))
    temps = np.geomspace(temperature, final_temperature, max(iters, 1))
    opt = optax.adam(lr)
    state = opt.init(policy)
    lam, history, t0 = 0.0, [], time.perf_counter()
    best, best_err, best_iter = policy, np.inf, 0
    for it in range(iters + 1):
        herr, hcompute, extra = hard_eval(policy)
        rec = {"iter": it, "hard_rel_mse": herr, compute_name: hcompute, **extra,
               "admissible": abs(hcompute - budget) <= BUDGET_TOLERANCE}
        if rec["admissible"] and herr < best_err:
            best, best_err, best_iter = policy, herr, it
        if it < iters:
            temp = float(temps[it])
            (loss, (err, frac)), g = grad_fn(policy, jnp.float32(lam), jnp.float32(temp))
            rec |= {"temperature": temp, "loss": float(loss), "rel_mse": float(err), "expected": float(frac),
                    "lam": lam}
            updates, state = opt.update(g, state, policy)
            policy = optax.apply_updates(policy, updates)
            policy = policy if project is None else project(policy)
            lam = max(0.0, lam + dual_lr * (float(frac) - budget))
        history.append(rec)
        soft = (f"soft T {rec['temperature']:.3f}: loss {rec['loss']:+.3f} rel_mse {rec['rel_mse']:.3e} expected "
                f"{rec['expected']:.3f} lam {rec['lam']:.2f} | ") if "loss" in rec else ""
        log(f"  {label} B={budget:.2f} iter {it:2d}: {soft}hard rel_mse {herr:.3e} {compute_name} {hcompute:.3f}")
    seconds = time.perf_counter() - t0
    within = sum(h["admissible"] for h in history)
    kept, start = history[best_iter]["hard_rel_mse"], history[0]["hard_rel_mse"]
    log(f"  {label} B={budget:.2f}: kept iterate {best_iter} (hard train rel_mse {kept:.3e}; start {start:.3e}; "
        f"{within} of {iters + 1} iterates within the budget) after {seconds:.0f} s")
    return best, best_iter, history, seconds


def learn_policy(setup: Setup, kind: str, budget: float, *, calibration: dict, iters: int = 12,
                 lr: float | None = None, temperature: float = 1.0, final_temperature: float = 0.05,
                 mode: str = "soft", dual_lr: float = 10.0, remat: bool = False, log=print) -> Learned:
    """Learn a `kind` policy on the training prompts ("threshold": the baseline's threshold; "schedule": one logit
    per call; "net": the `PolicyNetRule` network over the baseline's indicators), started at the calibrated
    baseline at `budget` (`policy_rule`).

    Loss: log(rel_mse of final latents vs dense) + lam (expected compute - budget), Adam (lr per kind:
    `LEARNING_RATES`), dual ascent lam <- max(0, lam + dual_lr (expected - budget)). `mode` "soft": both
    sides of each gate are mixed, sigmoid(margin / T), with T annealed geometrically from `temperature` to
    `final_temperature` over the iterations (hard decisions in the limit); "straight_through": the forward
    pass is hard. Every iterate is also run with HARD decisions on the training prompts (its hard version,
    `harden`), and the kept policy is the one with the lowest hard training error among those whose counted
    compute is within `BUDGET_TOLERANCE` of the budget (the start when none is); the start (the baseline) is
    iterate 0, so the kept policy is never worse than it on the training prompts. `iters` updates, `iters + 1`
    hard evaluations.
    `remat`: rematerialise each step (less memory, one more forward per step)."""
    choice_arg("kind", kind, POLICIES)
    budget = check_budget(budget)
    temperature = check_temperature(temperature)
    final_temperature = float_arg("final_temperature", final_temperature, low=0.0, low_open=True)
    choice_arg("mode", mode, LEARN_MODES)
    iters = int_arg("iters", iters, minimum=0)
    rule = policy_rule(setup, kind, calibration, budget)
    lr = LEARNING_RATES[kind] if lr is None else float_arg("lr", lr, low=0.0, low_open=True)
    den = relaxed_cache(setup.base, rule, mode=mode)
    den_hard = relaxed_cache(setup.base, rule, mode="hard")
    dense = setup.train.dense

    def objective(policy, lam, temp):
        out = relaxed_run(setup, den, RelaxedParams(den.params.model, policy, temp, rule), remat=remat)
        err, frac = rel_mse(out.latents, dense), compute_fraction(out.state)
        return jnp.log(err) + lam * (frac - budget), (err, frac)

    def hard_run(policy):
        out = relaxed_run(setup, den_hard, RelaxedParams(den.params.model, policy, jnp.float32(1.0), rule))
        return rel_mse(out.latents, dense), out.state

    hard_fn = jax.jit(hard_run)

    def hard_eval(policy):
        herr, hstate = hard_fn(harden(setup, rule, policy, budget))
        return float(herr), counted_compute(setup, hstate)["compute"], {}

    best, best_iter, history, seconds = learn_under_budget(
        objective, hard_eval, rule.init_policy(), budget, iters=iters, lr=lr, temperature=temperature,
        final_temperature=final_temperature, dual_lr=dual_lr, label=kind, log=log)
    hard_policy = harden(setup, rule, best, budget)
    return Learned(kind, budget, {k: np.asarray(v) for k, v in best.items()}, den_hard,
                   relaxed_params(den_hard, hard_policy), history, seconds, best_iter)


# ------------------------------------------------------------------------------------------------ evaluation
def uniform_schedule(steps: int, budget: float, chunks: int = 0) -> np.ndarray:
    """round(budget * steps) computed calls spread evenly, the first included, as +-1 logits; with `chunks`,
    the same in every chunk (chunk-major)."""
    k = max(1, round(budget * steps))
    keep = np.unique(np.round(np.linspace(0, steps - 1, k)).astype(int))
    out = -np.ones(steps, np.float32)
    out[keep] = 1.0
    return np.tile(out, max(chunks, 1))


def evaluate_uniform(setup: Setup, budget: float, split: str = "heldout") -> dict:
    """`uniform_schedule` at `budget`, evaluated like `evaluate`."""
    rule = ScheduleRule(setup.calls, scope="chunk" if setup.chunks else "video")
    den = relaxed_cache(setup.base, rule, mode="hard")
    logits = uniform_schedule(setup.solver.num_steps, budget, setup.chunks)
    return evaluate(setup, den, relaxed_params(den, {"logits": logits}), split=split)


def counted_compute(setup: Setup, state) -> dict:
    """The compute of a run from the denoisers' own counters (`total_work`, summed over CFG branches): block-stack
    passes and calls, and "compute" = passes / calls of the denoising calls. On AR setups each chunk's commit
    (the clean pass that writes its K/V, the same in every method and in the dense rollout) counts one call
    and one pass; "compute" leaves these out (passes - commits) / (calls - commits), the fraction a budget
    bounds, and "compute_with_commits" keeps them (the fraction of the dense rollout's passes)."""
    work = total_work(state)
    commits = setup.chunks * len(branch_states(state))
    bp, calls = work["block_passes"], work["calls"]
    return {"compute": (bp - commits) / (calls - commits), "compute_with_commits": bp / calls,
            "block_passes": bp, "calls": calls}


def evaluate(setup: Setup, den, params=None, *, split: str = "heldout", relaxed: bool = True) -> dict:
    """Hard run of `den` on a split's prompts: PSNR / SSIM of the decoded videos against the dense run's, the
    relative MSE of the latents, and the compute counted by the denoiser's own counters (`counted_compute`)."""
    sp = getattr(setup, split)
    if relaxed:
        out = jax.jit(lambda p: relaxed_run(setup, den, p, split))(params)
    else:
        out = dense_run(den, setup.solver, setup.guidance, sp.noise, sp.context, chunks=setup.chunks)
    counted = counted_compute(setup, out.state)
    fid = video_fidelity(decode_latents(np.asarray(out.latents), uint8=True),
                         decode_latents(np.asarray(sp.dense), uint8=True))
    res = {"psnr": fid["psnr"], "ssim": fid["ssim"], "rel_mse": float(rel_mse(out.latents, sp.dense)), **counted}
    if relaxed:     # what the relaxed denoiser's hard decisions count (a layer gate is part of a pass)
        res["relaxed_compute"] = float(compute_fraction(out.state, hard=True))
    return res


def evaluate_teacache(setup: Setup, cfg, split: str = "heldout") -> dict:
    """The real baseline transform (`experiments.teacache.teacache`, or `experiments.flowcache.flowcache` on AR
    setups; lax.cond) with `cfg`, evaluated like `evaluate`."""
    method = flowcache if setup.chunks else teacache
    return evaluate(setup, method(setup.base, cfg), split=split, relaxed=False)


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

