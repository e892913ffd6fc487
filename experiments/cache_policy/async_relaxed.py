"""FlowCache's rule relaxed in diffusion forcing's asynchronous execution (issue 18): a learnable threshold for
the per-(chunk in flight, CFG branch) caches of `df_sample(..., execution="chunks")`.

    den = relaxed_flowcache_df(model, window_frames=F, thresh=0.1, mode="soft")
    out = df_sample(den, noise, ctx, solver=unipc(20), ar_step=2, execution="chunks", params=p)
    jax.grad(lambda pol: loss(df_sample(den, ..., params=p.replace(policy=pol))))(p.policy)

It is `relaxed_cache(df_chunk_denoiser(model, F), ThresholdRule(flowcache_config(thresh)))`: `df_sample`
keeps one state per chunk slot (and branch), so every chunk in flight has its own accumulator gate
g = gate((acc + delta - thresh) / thresh), forced calls (warm-up 5, the chunk's last) and relaxed accumulator
(1 - g)(acc + delta), as the hard FlowCache of `experiments.flowcache.async_df.df_method("flowcache")`. One
thing the chunk execution adds: a forwarded chunk writes its K/V into the window buffer that later chunks
attend to, and a skipped one leaves it stale; so the relaxed form also gates that write,
buffer = g * fresh + (1 - g) * old (exactly the hard buffer at g in {0, 1}). In "hard" mode skipped chunks
are not forwarded at all (`lax.cond`). Expected compute: `df_compute_fraction(out.state)` (sum of g over the
calls of every chunk slot and branch, divided by those calls: differentiable; `hard=True` counts decisions);
`vidaccel.relaxed.compute_fraction` does not apply here (the output stacks the slots' states).

`python -m experiments.cache_policy.async_relaxed` (`learn_async_threshold`, ~10 min on 2 loaded cores) learns
the threshold under budgets 0.5 and 0.7 on 2 training prompts of the shapes AR model and compares it with the
calibrated rule on 3 held-out prompts -> results/cache_policy/pareto_async.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.cache_policy.study import BUDGET_TOLERANCE, Split, learn_under_budget, rel_mse
from experiments.flowcache import WARMUP, flowcache_config
from experiments.flowcache.async_df import df_run
from experiments.harness import machine, markdown_table, video_fidelity, write_results
from experiments.teacache import WAN21_COEFFICIENTS
from models.ar.diffusion_forcing import df_sample, df_work
from models.ar.window import DFState, df_chunk_denoiser, df_state_of
from models.shapes import decode_latents, encode_prompts, sample_prompts
from models.shapes.pretrained import latent_noise, load_shapes_model
from vidaccel.checks import choice_arg, int_arg
from vidaccel.relaxed import MODES, RelaxedParams, RelaxedState, ThresholdRule, check_budget, relaxed_cache
from vidaccel.solvers import unipc
from vidaccel.transforms import Denoiser, branch_states, find_state, replace_state, wrap_denoiser

_RET = WAN21_COEFFICIENTS[("1.3b", True)]


def relaxed_flowcache_df(model, *, window_frames: int, thresh: float, coefficients=_RET,
                         max_change: float | None = None, warmup: int = WARMUP,
                         mode: str = "straight_through") -> Denoiser:
    """The relaxed FlowCache-SkyReels chunk denoiser for `df_sample(..., execution="chunks")` (see the module
    docstring). thresh (> 0): the initial threshold (policy {"log_thresh": ()}); coefficients, max_change,
    warmup: the e0 rule's, as `df_method("flowcache", ...)`; mode: "soft", "straight_through" or "hard"."""
    choice_arg("mode", mode, MODES)
    rule = ThresholdRule(flowcache_config(thresh, coefficients, warmup=warmup, max_change=max_change))
    rel = relaxed_cache(df_chunk_denoiser(model, window_frames), rule, mode=mode)
    if mode == "hard":
        return rel

    def apply(params, state, x, t, context):
        out, new = rel.apply(params, state, x, t, context)
        g = new.gates[jnp.minimum(state.count, state.calls - 1)]
        old, fresh = df_state_of(state).kv, df_state_of(new).kv

        def mix(a, b):
            gd = g.astype(a.dtype)
            return gd * a + (1 - gd) * b

        # frames: the chunk's positions, the same in every write after its first (forced) call
        kv = fresh.replace(k=mix(fresh.k, old.k), v=mix(fresh.v, old.v))
        return out, replace_state(new, DFState, lambda d: d.replace(kv=kv))

    return wrap_denoiser(rel, init=rel.init, apply=apply, name=f"relaxed[FlowCache-DF,{mode}]",
                         stages=rel.stages, commit=rel.commit)


def df_compute_fraction(state, *, hard: bool = False) -> jax.Array:
    """Expected (or, with `hard`, counted) block-stack passes of a relaxed `df_sample(..., execution="chunks")`
    run as a fraction of its calls, over every window, chunk slot and CFG branch (the output state stacks the
    slots' states, each of which counts its own calls); differentiable when not `hard`."""
    states = [find_state(s, RelaxedState, ": not a relaxed_flowcache_df run's state") for s in branch_states(state)]
    done = sum(jnp.sum(s.computed if hard else s.expected) for s in states)
    return done / sum(jnp.sum(s.count) for s in states).astype(jnp.float32)


# ------------------------------------------------------------------------------------------------ study
@dataclasses.dataclass
class AsyncSetup:
    """The shapes AR model in diffusion forcing's asynchronous chunk execution: UniPC `steps`, `ar_step`, CFG,
    one window of `chunks` chunks; training and held-out prompts with the dense chunk run's latents
    (`df_run("vanilla_chunks")`: the same execution with nothing cached)."""

    model: object
    solver: object
    ar_step: int
    guidance: float
    chunks: int
    train: Split
    heldout: Split

    def run(self, den, params, split: str):
        sp = getattr(self, split)
        return df_sample(den, sp.noise, sp.context, params=params, solver=self.solver, ar_step=self.ar_step,
                         execution="chunks", guidance=self.guidance, negative_context=jnp.zeros_like(sp.context),
                         check_finite=False)


def make_async_setup(*, steps: int = 20, ar_step: int = 2, chunks: int = 4, prompts: int = 2,
                     heldout_prompts: int = 3, guidance: float = 5.0, seed: int = 0) -> AsyncSetup:
    """`AsyncSetup` of the committed shapes AR model; held-out noise is seed + 500 (as `study.make_split`)."""
    for name, v, low in (("steps", steps, WARMUP + 2), ("ar_step", ar_step, 1), ("chunks", chunks, 2),
                         ("prompts", prompts, 1), ("heldout_prompts", heldout_prompts, 1)):
        int_arg(name, v, minimum=low)
    model = load_shapes_model("ar")
    solver = unipc(steps)
    frames = chunks * model.cfg.num_frame_per_block

    def split(n, which):
        names = sample_prompts(n, seed, which)
        ctx = jnp.asarray(encode_prompts(names))
        noise = latent_noise(n, seed + (0 if which == "train" else 500), frames)
        dense = df_run("vanilla_chunks", model, noise, ctx, solver=solver, ar_step=ar_step, guidance=guidance,
                       negative_context=jnp.zeros_like(ctx)).latents
        return Split(names, noise, ctx, dense)

    return AsyncSetup(model, solver, ar_step, guidance, chunks, split(prompts, "train"),
                      split(heldout_prompts, "heldout"))


def counted(state) -> dict:
    """Compute of a hard run from the chunk denoisers' own work counters (block passes / calls) beside the
    relaxed state's count of hard decisions."""
    work = df_work(state)
    return {"compute": work["block_passes"] / work["calls"],
            "decisions": float(df_compute_fraction(state, hard=True)), **work}


def learn_async_threshold(setup: AsyncSetup, budgets=(0.5, 0.7), *, iters: int = 5, lr: float = 0.1,
                          grid: int = 40, log=print) -> dict:
    """FlowCache-SkyReels (raw e0 indicator, warm-up 5, forced last call) in the asynchronous execution:
    the calibrated rule (threshold whose hard run on the training prompts counts the compute closest to each
    budget, from `grid` thresholds log-spaced over 0.02-2, the scale of the raw e0 change; the geometric middle
    of the thresholds reaching that compute), then its threshold learned under the budget with
    `learn_under_budget` (soft mode on the training prompts, Adam + dual ascent, start = the calibrated
    threshold); both evaluated with hard decisions on the held-out prompts, plus the calibrated rule's whole
    front there."""
    budgets = [check_budget(b) for b in budgets]
    kw = dict(window_frames=setup.chunks * setup.model.cfg.num_frame_per_block, thresh=1.0, coefficients=None)
    soft = relaxed_flowcache_df(setup.model, mode="soft", **kw)
    hard = relaxed_flowcache_df(setup.model, mode="hard", **kw)
    rule, model_params = soft.params.rule, soft.params.model

    def params(policy, temp=1.0):
        return RelaxedParams(model_params, policy, jnp.float32(temp), rule)

    hard_fns = {sp: jax.jit(lambda pol, sp=sp: setup.run(hard, params(pol), sp)) for sp in ("train", "heldout")}

    def hard_point(log_thresh, split):
        out = hard_fns[split]({"log_thresh": jnp.float32(log_thresh)})
        dense = getattr(setup, split).dense
        point = {"threshold": math.exp(float(log_thresh)), "rel_mse": float(rel_mse(out.latents, dense)),
                 **counted(out.state)}
        if split == "heldout":       # fidelity of the decoded videos, as every Pareto study reports it
            fid = video_fidelity(decode_latents(np.asarray(out.latents), uint8=True),
                                 decode_latents(np.asarray(dense), uint8=True))
            point |= {"psnr": round(fid["psnr"], 2), "ssim": round(fid["ssim"], 4)}
        return point

    t0 = time.perf_counter()
    thresholds = np.geomspace(0.02, 2.0, grid)
    front = {sp: [hard_point(math.log(t), sp) for t in thresholds] for sp in ("train", "heldout")}
    log(f"calibrated rule's front on {grid} thresholds (train + held-out): {time.perf_counter() - t0:.0f} s")

    def objective(policy, lam, temp):
        out = setup.run(soft, params(policy, temp), "train")
        err, frac = rel_mse(out.latents, setup.train.dense), df_compute_fraction(out.state)
        return jnp.log(err) + lam * (frac - budget), (err, frac)

    def hard_eval(policy):
        p = hard_point(policy["log_thresh"], "train")
        return p["rel_mse"], p["compute"], {"threshold": p["threshold"]}

    results = []
    for budget in budgets:
        dist = [abs(p["compute"] - budget) for p in front["train"]]
        best = min(dist)
        ties = [i for i, d in enumerate(dist) if d == best]
        cal_t = float(np.exp(np.mean(np.log(thresholds[ties]))))        # geometric middle of the closest
        start = {"log_thresh": jnp.float32(math.log(cal_t))}
        learned, it, history, seconds = learn_under_budget(
            objective, hard_eval, start, budget, iters=iters, lr=lr, temperature=1.0, final_temperature=0.05,
            label="async threshold", log=log)
        cal, lrn = hard_point(math.log(cal_t), "heldout"), hard_point(learned["log_thresh"], "heldout")
        results.append({"budget": budget, "calibrated": cal, "learned": lrn, "kept_iterate": it,
                        "learn_seconds": seconds, "history": history,
                        "calibrated_train_compute": front["train"][ties[0]]["compute"],
                        "learned_within_budget_heldout": abs(lrn["compute"] - budget) <= BUDGET_TOLERANCE})
        log(f"B={budget:.2f} held-out: calibrated rel_mse {cal['rel_mse']:.3e} at {cal['compute']:.3f}; learned "
            f"{lrn['rel_mse']:.3e} at {lrn['compute']:.3f}")
    return {"steps": setup.solver.num_steps, "ar_step": setup.ar_step, "chunks": setup.chunks,
            "guidance": setup.guidance, "warmup": WARMUP, "indicator": "e0, raw relative L1 (no polynomial)",
            "train_prompts": setup.train.prompts, "heldout_prompts": setup.heldout.prompts,
            "iters": iters, "lr": lr, "budget_tolerance": BUDGET_TOLERANCE, "front": front, "results": results}


def markdown(rep: dict) -> str:
    """pareto_async.md: the learned and calibrated points on held-out prompts and the calibrated front."""
    rows = []
    for r in rep["results"]:
        for kind in ("calibrated", "learned"):
            p = r[kind]
            rows.append({"budget": f"{r['budget']:.2f}", "policy": kind, "threshold": f"{p['threshold']:.4g}",
                         "compute": f"{p['compute']:.3f}", "PSNR": p["psnr"], "SSIM": p["ssim"],
                         "rel_mse": f"{p['rel_mse']:.3e}"})
    cols = {k: k for k in ("budget", "policy", "threshold", "compute", "PSNR", "SSIM", "rel_mse")}
    seen, front = set(), []
    for p in rep["front"]["heldout"]:
        if p["compute"] not in seen:
            seen.add(p["compute"])
            front.append({"compute": f"{p['compute']:.3f}", "PSNR": p["psnr"], "rel_mse": f"{p['rel_mse']:.3e}",
                          "threshold": f"{p['threshold']:.4g}"})
    same = [p["compute"] for p in rep["front"]["train"]] == [p["compute"] for p in rep["front"]["heldout"]]
    return "\n".join([
        "# Learned FlowCache threshold in diffusion forcing's asynchronous execution (issue 18)", "",
        f"Shapes AR model, one window of {rep['chunks']} chunks, UniPC {rep['steps']}, ar_step {rep['ar_step']}, "
        f"CFG {rep['guidance']}; FlowCache-SkyReels per (chunk, branch), {rep['indicator']}, warm-up "
        f"{rep['warmup']}, last call forced. Calibrated: the grid threshold whose hard run on the "
        f"{len(rep['train_prompts'])} training prompts counts the compute closest to the budget. Learned: "
        f"`learn_under_budget` ({rep['iters']} soft updates, lr {rep['lr']}) from it. Held-out: "
        f"{len(rep['heldout_prompts'])} prompts, hard decisions; compute = block passes / calls from the "
        "counters; PSNR / SSIM of the decoded videos and rel_mse of the final latents vs the uncached chunk run.", "",
        markdown_table(rows, cols), "",
        f"Counted compute equal on training and held-out prompts at every grid threshold: {same} (the e0 "
        "indicator depends on the timestep only). Learning kept iterate(s) "
        f"{[r['kept_iterate'] for r in rep['results']]} (0 = the calibrated start); run {rep.get('seconds', 0):.0f} s.",
        "",
        "Calibrated rule's front on the held-out prompts (each distinct compute over the threshold grid, at the "
        "smallest threshold reaching it):", "",
        markdown_table(front, {k: k for k in ("compute", "PSNR", "rel_mse", "threshold")}), "",
        f"Machine: {machine()}.", ""])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m experiments.cache_policy.async_relaxed",
                                description=__doc__.split("\n")[0])
    p.add_argument("--out", default="results/cache_policy", help="output folder (default %(default)s)")
    out = p.parse_args(argv).out
    t0 = time.perf_counter()
    setup = make_async_setup()
    rep = learn_async_threshold(setup)
    rep["seconds"] = time.perf_counter() - t0
    for p in write_results(out, "pareto_async", rep, markdown(rep)):
        print("wrote", p)


if __name__ == "__main__":
    main()


__all__ = ["relaxed_flowcache_df", "df_compute_fraction", "AsyncSetup", "make_async_setup", "counted",
           "learn_async_threshold", "markdown", "main"]
