"""Cache policies on AR rollouts (issue 18) with the embedded shapes AR model: the setup (`make_ar_setup`, an
`ARSetup` with `chunks`, so that `calibrate`, `learn_policy` and `evaluate` of `study` run rollouts and FlowCache
is the baseline), and the sensitivity map d log(final error) / d g per (chunk, step) at FlowCache's decisions,
beside FlowCache's indicator.

    setup = make_ar_setup(steps=20, prompts=2, chunks=4)
    rep = ar_sensitivity(setup, budget=0.5)
    res = learn_policy(setup, "schedule", 0.5, calibration=calibrate(setup))   # per-chunk schedule

FlowCache (SkyReels variant: e0 indicator rescaled by a polynomial fitted on this rollout, warm-up of 5 calls
and forced last call per chunk, per-chunk accumulator) is calibrated on the setup's training prompts and its
threshold chosen for `budget` of the calls (`choose_threshold` on the replayed schedule). The gates of a
chunk-scope `ScheduleRule(parametrization="gates")` are set to its decisions; `relaxed_rollout` in soft mode
with those gates (exactly 0 or 1) is the FlowCache rollout, which is checked (final latents) before
differentiating.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from experiments.cache_policy.study import FD_STEP, Split, calibrate, make_split, rel_mse, teacache_rule
from experiments.flowcache import WARMUP, flowcache
from models.ar.rollout import RolloutConfig, chunk_denoiser, rollout
from models.shapes.pretrained import load_shapes_model
from vidaccel.checks import int_arg
from vidaccel.relaxed import RelaxedParams, ScheduleRule, relaxed_cache, relaxed_rollout
from vidaccel.residual_cache import rescale, schedule
from vidaccel.solvers import unipc

NUDGE = 1e-7         # relative change of the noise that measures how much the rollout amplifies rounding


@dataclasses.dataclass
class ARSetup:
    """The shapes AR model's chunk denoiser, its solver and rollout config, training prompts with their noise,
    text embeddings and the dense rollout's final latents (flat fields), and optionally held-out prompts
    (`heldout`). `train` and `calls` make it a `study.Setup` for `calibrate`, `learn_policy` and `evaluate`."""

    base: object
    solver: object
    guidance: float
    chunks: int
    prompts: list[str]
    noise: jax.Array
    context: jax.Array
    dense: jax.Array
    heldout: Split | None = None

    @property
    def train(self) -> Split:
        return Split(self.prompts, self.noise, self.context, self.dense)

    @property
    def calls(self) -> int:
        return self.solver.num_steps * self.chunks


def make_ar_setup(*, steps: int = 20, prompts: int = 2, chunks: int = 4, heldout_prompts: int = 0,
                  guidance: float = 5.0, seed: int = 0, window_chunks: int = 3, model=None) -> ARSetup:
    """The committed shapes AR model (`num_frame_per_block` latent frames per chunk), UniPC `steps`, CFG
    `guidance`, a rolling window of `window_chunks` (the training context, as experiments/cache_table.py),
    `prompts` training-split prompts and `chunks` chunks per video; `heldout_prompts` held-out prompts (seed +
    500 noise) with their dense rollouts in `heldout` (None when 0)."""
    int_arg("steps", steps, minimum=4)
    int_arg("prompts", prompts, minimum=1)
    int_arg("chunks", chunks, minimum=1)
    int_arg("heldout_prompts", heldout_prompts, minimum=0)
    model = load_shapes_model("ar") if model is None else model
    base = chunk_denoiser(model, RolloutConfig(window_chunks=window_chunks))
    solver = unipc(steps)
    frames = chunks * model.cfg.num_frame_per_block

    def split(n, which):
        return make_split(base, solver, guidance, n, seed, which, frames, chunks=chunks)

    tr = split(prompts, "train")
    return ARSetup(base, solver, guidance, chunks, tr.prompts, tr.noise, tr.context, tr.dense,
                   split(heldout_prompts, "heldout") if heldout_prompts else None)


def flowcache_rule(setup: ARSetup, budget: float, log=print):
    """FlowCache-SkyReels calibrated on the setup's training rollouts (`calibrate`): (config with the threshold
    that computes the fraction of calls closest to `budget`, that fraction, the recorded e0 changes (branches,
    calls))."""
    cal = calibrate(setup, log)
    cfg, frac = teacache_rule(cal, budget)
    return cfg, frac, cal["input_change"]


def ar_sensitivity(setup: ARSetup, budget: float = 0.5, *, flips: bool = True, log=print) -> dict:
    """d log(rel. MSE of the final latents vs dense) / d g per (chunk, step) at FlowCache's decisions for
    `budget`, beside its rescaled indicator; one-sided finite differences (gate steps `FD_STEP` and
    `FD_STEP` / 10, towards the inside of [0, 1]) at the 3 largest gradients; with `flips`, the measured
    effect of flipping each free call alone (not each chunk's first, which every scope-"chunk" schedule
    computes)."""
    steps, chunks = setup.solver.num_steps, setup.chunks
    cfg, frac, changes = flowcache_rule(setup, budget, log)
    sched = schedule(cfg, changes[:1], steps)[0]
    neg = jnp.zeros_like(setup.context)
    ref = rollout(flowcache(setup.base, cfg), setup.noise, setup.context, solver=setup.solver,
                  guidance=setup.guidance, negative_context=neg)
    rule = ScheduleRule(chunks * steps, parametrization="gates", scope="chunk")
    den = relaxed_cache(setup.base, rule, mode="soft")

    def run(gates):
        p = RelaxedParams(den.params.model, {"gates": gates}, jnp.float32(1.0), rule)
        return relaxed_rollout(den, p, setup.noise, setup.context, solver=setup.solver, guidance=setup.guidance,
                               negative_context=neg)

    def log_err(gates):
        return jnp.log(rel_mse(run(gates).latents, setup.dense))

    g0 = jnp.asarray(sched, jnp.float32)
    parity = float(jnp.max(jnp.abs(jax.jit(run)(g0).latents - ref.latents)))
    nudged = rollout(setup.base, setup.noise * (1 + NUDGE), setup.context, solver=setup.solver,
                     guidance=setup.guidance, negative_context=neg).latents
    amplification = float(jnp.max(jnp.abs(nudged - setup.dense)))
    log(f"relaxed rollout at FlowCache's gates vs the FlowCache rollout: max |diff| {parity:.2e} (the dense rollout "
        f"moves by {amplification:.2e} when the noise is scaled by 1 + {NUDGE:g})")
    value, grad = jax.jit(jax.value_and_grad(log_err))(g0)
    grad = np.asarray(grad)
    log(f"log rel. MSE {float(value):.3f} at {sched.mean():.3f} compute")
    f = jax.jit(log_err)
    fd = {}
    for i in np.argsort(-np.abs(grad))[:3]:
        sign = 1.0 if sched[i] == 0 else -1.0
        fd[int(i)] = {"gradient": float(grad[i]),
                      **{f"finite_difference_{h:g}": (float(f(g0.at[i].add(sign * h))) - float(value)) / (sign * h)
                         for h in (FD_STEP, FD_STEP / 10)}}
    flipped = np.full(chunks * steps, np.nan)
    if flips:
        for i in range(chunks * steps):
            if i % steps:
                flipped[i] = float(f(g0.at[i].set(1.0 - g0[i]))) - float(value)
        log("flips measured")
    ind = np.asarray(rescale(cfg.coefficients, jnp.asarray(changes[0]), cfg.max_change))
    return {"steps": steps, "chunks": chunks, "prompts": setup.prompts, "guidance": setup.guidance,
            "warmup": WARMUP, "flowcache_threshold": cfg.thresh, "flowcache_fraction": frac,
            "flowcache_coefficients": list(cfg.coefficients), "max_change": cfg.max_change,
            "flowcache_schedule": sched.astype(int).reshape(chunks, steps),
            "parity_max_abs_diff": parity, "nudge": NUDGE, "nudged_dense_max_abs_diff": amplification,
            "log_rel_mse": float(value),
            "rel_mse_flowcache": float(rel_mse(ref.latents, setup.dense)),
            "gradient": grad.reshape(chunks, steps), "flip_effect": flipped.reshape(chunks, steps),
            "finite_difference_check": {f"chunk {i // steps} step {i % steps}": v for i, v in fd.items()},
            "fd_steps": [FD_STEP, FD_STEP / 10], "indicator_change": changes[0].reshape(chunks, steps),
            "indicator_rescaled": np.where(np.isfinite(ind), ind, np.nan).reshape(chunks, steps)}


__all__ = ["ARSetup", "make_ar_setup", "flowcache_rule", "ar_sensitivity"]
