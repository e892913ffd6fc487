"""python -m experiments.cache_policy [memory|sensitivity|pareto|transfer|all] [--model t2v|ar] [--steps N] [--out DIR]

Differentiable studies of cache policies on the embedded shapes models (CPU; see docs/cache_policies.md):
- memory: compiled memory of the gradient through a 50-step sample vs a 1-step one, with and without
  per-step rematerialisation;
- sensitivity: d log(final error) / d(gate) per step at calibrated TeaCache's decisions, beside its indicator;
- pareto: policies learned under a budget (threshold, per-step schedule, policy network; --kinds) vs calibrated
  TeaCache and a uniform schedule, hard decisions on held-out prompts, compute counted by the transforms'
  counters, with the learning record (hard training error of every iterate);
- transfer: threshold, schedule and policy network learned at one budget (the last of --budgets), evaluated
  on held-out prompts, at --transfer-steps steps and at --transfer-frames latent frames (transfer.py).
With --model ar (the shapes AR model, --chunks chunks, FlowCache instead of TeaCache): sensitivity, d log(final
error) / d(gate) per (chunk, step) at FlowCache's decisions (ar.py) -> <out>/sensitivity_ar.*; pareto, per-chunk
schedule and threshold (scope "chunk") learned through `relaxed_rollout` vs calibrated FlowCache ->
<out>/pareto_ar.*.
Writes <out>/<study>.json, .md and .png (results/cache_policy/ by default). Three studies have commands of their
own: `python -m experiments.cache_policy.heads` (XAttention per-head thresholds vs HASTE's EBC),
`.tokens` (MotionCache's token threshold on AR rollouts) and `.layers` (per-layer attention reuse vs TeaCache).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from experiments.cache_policy.ar import ar_sensitivity, make_ar_setup
from experiments.cache_policy.study import (
    BUDGET_TOLERANCE,
    LEARNING_RATES,
    POLICIES,
    baseline_name,
    calibrate,
    evaluate,
    evaluate_teacache,
    evaluate_uniform,
    fmt_bytes,
    grad_memory,
    learn_policy,
    make_setup,
    sensitivity,
    teacache_rule,
    threshold_schedules,
)
from experiments.cache_policy.transfer import run_transfer
from experiments.harness import machine, markdown_table, plot_or_skip, pyplot, write_results

OUT = Path("results/cache_policy")
STUDIES = ("memory", "sensitivity", "pareto", "transfer")
AR_POLICIES = ("threshold", "schedule")


def run_memory(setup, out: Path, log=print) -> dict:
    rows = [grad_memory(setup, s, remat=r) for r in ("nested", "step", False) for s in (2, 50)]
    by = {(r["steps"], r["remat"]): r["peak_bytes"] for r in rows}
    ratios = {str(r): by[(50, r)] / by[(2, r)] for r in ("nested", "step", False)}
    report = {"rows": rows, "ratio_50_to_2": ratios, "machine": machine(),
              "what": "XLA memory_analysis of jit(grad) of the rel. MSE of final latents w.r.t. per-step schedule "
                      "logits (soft gates), 1 prompt, CFG 5, UniPC; peak = temporaries + arguments + outputs. "
                      "The reference is a 2-step sample (the first call is always computed, so a 1-step sample "
                      "has no gated call and a zero gradient)."}
    md = ["# Gradient memory through the sampler\n", report["what"] + "\n",
          markdown_table(rows, {"steps": "steps", "remat": lambda r: str(r["remat"]),
                                "temp": lambda r: fmt_bytes(r["temp_bytes"]),
                                "peak": lambda r: fmt_bytes(r["peak_bytes"])}),
          "\n50-step / 2-step peak: " + ", ".join(f"**{v:.1f}x** with remat={k}" for k, v in ratios.items())
          + ".\n"]
    write_results(out, "memory", report, "\n".join(md))
    log("memory: 50/2-step peak ratio " + ", ".join(f"{v:.1f}x (remat={k})" for k, v in ratios.items()))
    return report


def run_sensitivity(setup, cal, out: Path, log=print) -> dict:
    rep = sensitivity(setup, cal, 0.5)
    rep["steps"] = setup.solver.num_steps
    rows = [{"step": i, "teacache": int(rep["teacache_schedule"][i]), "indicator": rep["indicator_rescaled"][i],
             "grad": rep["gradient"][i], "flip": rep["flip_effect"][i]} for i in range(rep["steps"])]
    predicted = np.where(rep["teacache_schedule"] > 0, -1.0, 1.0) * rep["gradient"]   # first order, flip
    corr = float(np.corrcoef(predicted[1:], rep["flip_effect"][1:])[0, 1])             # step 0 is forced
    rep["corr_gradient_vs_flip"] = corr
    md = ["# Sensitivity of the final error to each step's decision\n",
          f"At calibrated TeaCache's decisions for 50% compute ({rep['steps']} steps, training prompts). "
          "grad = d log(rel. MSE) / d g_i (g = 1 computes); flip = measured change of log(rel. MSE) when only "
          f"step i's decision is flipped. Correlation of the first-order prediction of a flip (-grad at computed, "
          f"+grad at reused steps) with the measured flips, steps 1..: {corr:.2f}.\n",
          markdown_table(rows, {"step": "step", "TeaCache computes": "teacache",
                                "rescaled e0 change": lambda r: f"{r['indicator']:.4f}",
                                "d log err / d g": lambda r: f"{r['grad']:+.3f}",
                                "flip effect": lambda r: f"{r['flip']:+.3f}"}),
          f"\nGradient check (one-sided differences of step {rep['fd_step']} in the gate, at the 3 largest "
          "gradients): " + ", ".join(f"step {i}: {v['gradient']:+.3f} vs {v['finite_difference']:+.3f}"
                                     for i, v in rep["finite_difference_check"].items()) + ".\n"]
    write_results(out, "sensitivity", rep, "\n".join(md))
    plot_or_skip(_plot_sensitivity, rep, out / "sensitivity.png", log=log)
    return rep


def _plot_sensitivity(rep, path):
    plt = pyplot()
    fig, ax = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    i = np.arange(rep["steps"])
    ax[0].bar(i, rep["gradient"], color=["tab:blue" if c else "tab:gray" for c in rep["teacache_schedule"]])
    ax[0].set_ylabel("d log err / d g_i")
    ax[0].set_title("blue: TeaCache computes the step, gray: reuses")
    ax[1].plot(i[1:], rep["indicator_rescaled"][1:], "o-")
    ax[1].set_ylabel("TeaCache rescaled e0 change")
    ax[1].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_ar_sensitivity(setup, out: Path, budget: float = 0.5, flips: bool = True, log=print) -> dict:
    rep = ar_sensitivity(setup, budget, flips=flips, log=log)
    write_ar_sensitivity(rep, out, log)
    return rep


def write_ar_sensitivity(rep: dict, out: Path, log=print) -> None:
    """sensitivity_ar.{json,md,png} from `ar_sensitivity`'s report (adds the summary figures to it)."""
    rep = {k: np.asarray(rep[k]) if k in _AR_ARRAYS else v for k, v in rep.items()}
    steps, chunks = rep["steps"], rep["chunks"]
    sched, grad, flip = rep["flowcache_schedule"], rep["gradient"], rep["flip_effect"]
    free = np.arange(steps) > 0                                 # each chunk's first call is always computed
    predicted = np.where(sched > 0, -1.0, 1.0) * grad           # first-order prediction of a flip
    ok = free[None, :] & np.isfinite(flip)
    rep["corr_gradient_vs_flip"] = float(np.corrcoef(predicted[ok], flip[ok])[0, 1]) if ok.sum() > 2 else None
    ind = rep["indicator_rescaled"]
    fin = free[None, :] & np.isfinite(ind)
    rep["corr_abs_gradient_vs_indicator"] = float(np.corrcoef(np.abs(grad[fin]), ind[fin])[0, 1])
    per_chunk = [{"chunk": c, "computed": int(sched[c].sum()), "sum_abs_grad": float(np.abs(grad[c]).sum()),
                  "sum_abs_grad_reused": float(np.abs(grad[c][sched[c] == 0]).sum()),
                  "max_grad_step": int(np.argmax(np.abs(grad[c])))} for c in range(chunks)]
    rep["per_chunk"] = per_chunk
    fd_steps = rep["fd_steps"]
    rows = [{"chunk": c, "step": i, "fc": int(sched[c, i]), "ind": ind[c, i], "grad": grad[c, i], "flip": flip[c, i]}
            for c in range(chunks) for i in range(steps)]
    corr = rep["corr_gradient_vs_flip"]
    md = ["# Sensitivity of the final error to each (chunk, step) decision on AR rollouts\n",
          f"Shapes AR model, {chunks} chunks x {steps} UniPC steps, CFG {rep['guidance']}, {len(rep['prompts'])} "
          f"training prompts, rolling window of 3 chunks. FlowCache-SkyReels (per-chunk accumulator, warm-up "
          f"{rep['warmup']}, forced last call, e0 indicator with the polynomial fitted on this rollout) at threshold "
          f"{rep['flowcache_threshold']:.4g}, computing {rep['flowcache_fraction']:.3f} of the calls (rel. MSE "
          f"{rep['rel_mse_flowcache']:.3e} vs dense). grad = d log(rel. MSE of final latents) / d g (g = 1 "
          "computes) at FlowCache's gates, through `relaxed_rollout` (chunk-scope `ScheduleRule`, soft gates "
          f"exactly 0/1; its latents equal the FlowCache rollout's within {rep['parity_max_abs_diff']:.1e}, rounding "
          f"amplified along the rollout: scaling the noise by 1 + {rep['nudge']:g} moves the dense rollout's latents "
          f"by {rep['nudged_dense_max_abs_diff']:.1e}). "
          "flip = measured change of log(rel. MSE) when only that call's decision is flipped.\n",
          f"- correlation of the first-order prediction of a flip (-grad at computed, +grad at reused calls) with "
          f"the measured flips (calls 1.. of each chunk): {'-' if corr is None else f'{corr:.2f}'}",
          f"- correlation of |grad| with FlowCache's rescaled indicator (calls 1.. of each chunk): "
          f"{rep['corr_abs_gradient_vs_indicator']:.2f}",
          f"- gradient check (one-sided differences of steps {fd_steps[0]:g} / {fd_steps[1]:g} in the gate, 3 "
          "largest gradients): " + ", ".join(
              f"{k}: {v['gradient']:+.3f} vs {v[f'finite_difference_{fd_steps[0]:g}']:+.3f} / "
              f"{v[f'finite_difference_{fd_steps[1]:g}']:+.3f}" for k, v in rep["finite_difference_check"].items())
          + "\n",
          "Per chunk:\n",
          markdown_table(per_chunk, {"chunk": "chunk", "FlowCache computes": "computed",
                                     "sum of abs. grad": lambda r: f"{r['sum_abs_grad']:.3f}",
                                     "... at reused calls": lambda r: f"{r['sum_abs_grad_reused']:.3f}",
                                     "step of largest abs. grad": "max_grad_step"}),
          "\nPer call:\n",
          markdown_table(rows, {"chunk": "chunk", "step": "step", "FlowCache computes": "fc",
                                "rescaled e0 change": lambda r: f"{r['ind']:.4f}",
                                "d log err / d g": lambda r: f"{r['grad']:+.4f}",
                                "flip effect": lambda r: "-" if not np.isfinite(r["flip"]) else f"{r['flip']:+.3f}"})]
    write_results(out, "sensitivity_ar", rep, "\n".join(md))
    plot_or_skip(_plot_ar_sensitivity, rep, out / "sensitivity_ar.png", log=log)


_AR_ARRAYS = ("flowcache_schedule", "gradient", "flip_effect", "indicator_change", "indicator_rescaled")


def _plot_ar_sensitivity(rep, path):
    plt = pyplot()
    grad, sched, ind = rep["gradient"], rep["flowcache_schedule"], rep["indicator_rescaled"]
    fig, ax = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True)
    lim = float(np.nanmax(np.abs(grad))) or 1.0
    im = ax[0].imshow(grad, aspect="auto", cmap="coolwarm", vmin=-lim, vmax=lim)
    cy, cx = np.nonzero(sched == 0)
    ax[0].plot(cx, cy, "kx", ms=4, label="FlowCache reuses")
    ax[0].set_ylabel("chunk")
    ax[0].set_title("d log err / d g per (chunk, step)")
    ax[0].legend(loc="upper right", fontsize=7)
    fig.colorbar(im, ax=ax, shrink=0.6)
    for c in range(rep["chunks"]):
        ax[1].plot(np.arange(1, rep["steps"]), ind[c, 1:], "o-", ms=3, label=f"chunk {c}")
    ax[1].set_ylabel("FlowCache rescaled e0 change")
    ax[1].set_title("FlowCache's indicator (e0: a function of the timestep, the same in every chunk)", fontsize=9)
    ax[1].set_xlabel("step in chunk")
    ax[1].legend(fontsize=7)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_pareto(setup, cal, out: Path, budgets, iters: int, kinds=POLICIES, log=print) -> dict:
    """Learned policies of `kinds` vs the calibrated baseline (TeaCache; FlowCache on AR setups) and a uniform
    schedule at every budget, hard decisions on held-out prompts; writes <out>/pareto.* (pareto_ar.* on AR)."""
    base = baseline_name(setup)
    rows, learned, room = [], {}, {}
    for b in budgets:
        cfg, frac = teacache_rule(cal, b)
        room[b] = threshold_schedules(cal, b)
        log(f"B={b:.2f}: {base} threshold {cfg.thresh:.4g} computes {frac:.3f}; the threshold reaches "
            f"{room[b]['distinct']} distinct schedules, {room[b]['within_budget']} within the budget")
        rows.append({"method": f"{base} (calibrated)", "budget": b, **evaluate_teacache(setup, cfg)})
        rows.append({"method": "uniform schedule", "budget": b, **evaluate_uniform(setup, b)})
        for kind in kinds:
            res = learn_policy(setup, kind, b, calibration=cal, iters=iters, log=log)
            ev = evaluate(setup, res.den_hard, res.params_hard)
            tr = evaluate(setup, res.den_hard, res.params_hard, split="train")
            rows.append({"method": f"learned {kind}", "budget": b, **ev, "train_psnr": tr["psnr"],
                         "train_compute": tr["compute"], "train_seconds": res.seconds})
            hist = res.history
            learned[f"{kind}@{b}"] = {
                "policy": res.policy, "history": hist, "best_iter": res.best_iter,
                "hard_policy": {k: np.asarray(v) for k, v in res.params_hard.policy.items()},
                "start_hard_rel_mse": hist[0]["hard_rel_mse"], "kept_hard_rel_mse": hist[res.best_iter]["hard_rel_mse"],
                "min_hard_rel_mse_any": min(h["hard_rel_mse"] for h in hist),
                "first_loss": hist[0].get("loss"), "last_loss": hist[-2].get("loss") if len(hist) > 1 else None,
                "admissible_iters": sum(h["admissible"] for h in hist)}
        for r in rows:
            if r["budget"] == b:
                r["budget_holds"] = bool(abs(r["compute"] - b) <= BUDGET_TOLERANCE)
                log(f"  {r['method']:<24} B={b:.2f} compute {r['compute']:.3f} PSNR {r['psnr']:.2f}")
    for r in rows:
        r.pop("psnr_per_video", None)
    name = "pareto_ar" if setup.chunks else "pareto"
    report = {"model": "ar" if setup.chunks else "t2v", "steps": setup.solver.num_steps, "chunks": setup.chunks,
              "guidance": setup.guidance, "train_prompts": setup.train.prompts,
              "heldout_prompts": setup.heldout.prompts, "budgets": list(budgets), "iters": iters, "kinds": list(kinds),
              "tolerance": BUDGET_TOLERANCE, "learning_rates": {k: LEARNING_RATES[k] for k in kinds},
              "rows": rows, "learned": learned, "threshold_room": {str(k): v for k, v in room.items()},
              "machine": machine(), "fit_relative_error": cal["fit_relative_error"]}
    write_results(out, name, report, _pareto_markdown(report, base))
    plot_or_skip(_plot_pareto, report, out / f"{name}.png", log=log)
    return report


def _pareto_markdown(rep: dict, base: str) -> str:
    what = "AR model, " + f"{rep['chunks']} chunks x " if rep["chunks"] else "t2v model, "
    lr = ", ".join(f"{k} {v:g}" for k, v in rep["learning_rates"].items())
    md = [f"# Learned cache policies vs calibrated {base} (held-out prompts, hard decisions)\n",
          f"Shapes {what}UniPC {rep['steps']} steps, CFG {rep['guidance']}. Policies start at the calibrated "
          f"{base} for the budget and are learned on {len(rep['train_prompts'])} training prompts: {rep['iters']} "
          f"Adam iterations (lr {lr}) on log(rel. MSE of final latents vs dense) + lam (expected compute - B), "
          "soft gates with the temperature annealed geometrically 1 -> 0.05, dual ascent on lam. Every iterate's "
          "hard version (a schedule: its top round(B x calls) logits, each chunk's first call forced on AR) is "
          "run with hard decisions on the training prompts; the kept iterate has the lowest hard training error "
          "among those whose counted compute is "
          f"within {rep['tolerance']} of B (iterate 0 is the {base} start). Evaluated on "
          f"{len(rep['heldout_prompts'])} held-out prompts with hard decisions (`lax.cond`); compute = block-stack "
          "passes / calls from the counters" + (" of the denoising calls (each chunk's commit pass, the same in "
                                                 "every method, left out; with commits: the next column)"
                                                 if rep["chunks"] else "")
          + f"; holds: |compute - B| <= {rep['tolerance']}; PSNR / SSIM of decoded videos vs the dense run.\n",
          markdown_table(rep["rows"], {
              "method": "method", "budget": lambda r: f"{r['budget']:.2f}",
              "compute": lambda r: f"{r['compute']:.3f}",
              **({"with commits": lambda r: f"{r['compute_with_commits']:.3f}"} if rep["chunks"] else {}),
              "holds": lambda r: "yes" if r["budget_holds"] else "no",
              "PSNR": lambda r: f"{r['psnr']:.2f}", "SSIM": lambda r: f"{r['ssim']:.4f}",
              "rel. MSE": lambda r: f"{r['rel_mse']:.2e}",
              "train PSNR": lambda r: f"{r['train_psnr']:.2f}" if "train_psnr" in r else "-"}),
          "\n## Did learning move?\n",
          "Hard training error (rel. MSE of final latents, training prompts) of the start and of the kept iterate; "
          "the lowest of any iterate (within the budget or not); the soft loss at the first and last update "
          "(different temperatures, so not comparable as a curve: the hard column is the measure).\n",
          markdown_table([{"key": k, **v} for k, v in rep["learned"].items()], {
              "policy @ budget": "key", "start": lambda r: f"{r['start_hard_rel_mse']:.3e}",
              "kept": lambda r: f"{r['kept_hard_rel_mse']:.3e}", "kept iterate": "best_iter",
              "lowest any": lambda r: f"{r['min_hard_rel_mse_any']:.3e}",
              "iterates within budget": lambda r: f"{r['admissible_iters']}/{len(r['history'])}",
              "soft loss first -> last": lambda r: "-" if r["first_loss"] is None
              else f"{r['first_loss']:+.3f} -> {r['last_loss']:+.3f}"}),
          "\nRoom of the threshold: distinct hard schedules the calibrated rule reaches over thresholds 0.01x-100x "
          "of the budget's, and how many of them are within the budget: " + ", ".join(
              f"B={k}: {v['distinct']} / {v['within_budget']}" for k, v in rep["threshold_room"].items())
          + ". The e0 indicator depends on the timestep only, so a threshold is a schedule, the same for every "
          "prompt.\n"]
    return "\n".join(md)


def _plot_pareto(rep, path):
    plt = pyplot()
    rows = rep["rows"]
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for m in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r["compute"], r["psnr"]) for r in rows if r["method"] == m)
        ax[0].plot(*zip(*pts, strict=True), "o-", label=m)
    ax[0].set_xlabel("compute (block-stack passes / calls)")
    ax[0].set_ylabel("PSNR vs dense (dB), held-out")
    ax[0].legend(fontsize=7)
    for k, v in rep["learned"].items():
        err = np.array([h["hard_rel_mse"] for h in v["history"]])
        out = np.array([not h["admissible"] for h in v["history"]])
        (line,) = ax[1].plot(err, "o-", ms=3, label=k)
        ax[1].plot(np.flatnonzero(out), err[out], "x", ms=8, color=line.get_color())
    ax[1].set_title("x: iterate outside the budget (not eligible)", fontsize=9)
    ax[1].set_yscale("log")
    ax[1].set_xlabel("iterate")
    ax[1].set_ylabel("hard rel. MSE, training prompts")
    ax[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m experiments.cache_policy", description=__doc__.splitlines()[2])
    ap.add_argument("study", nargs="?", default="all", choices=(*STUDIES, "all"))
    ap.add_argument("--model", default="t2v", choices=("t2v", "ar"),
                    help="ar: the AR model with FlowCache (sensitivity and pareto)")
    ap.add_argument("--chunks", type=int, default=4, help="chunks per video of the AR study")
    ap.add_argument("--no-flips", action="store_true", help="AR sensitivity: skip the one-at-a-time flips")
    ap.add_argument("--steps", type=int, default=20, help="sampler steps of the sensitivity and pareto studies")
    ap.add_argument("--train-prompts", type=int, default=2)
    ap.add_argument("--heldout-prompts", type=int, default=4)
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.4, 0.5])
    ap.add_argument("--iters", type=int, default=8, help="Adam iterations of every learned policy")
    ap.add_argument("--kinds", nargs="+", choices=POLICIES,
                    help="policies the pareto study learns (default: all on t2v; threshold and schedule on ar)")
    ap.add_argument("--transfer-steps", type=int, default=30, help="step count the transfer study carries to")
    ap.add_argument("--transfer-frames", type=int, default=12, help="latent frames the transfer study carries to")
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    kinds = tuple(a.kinds) if a.kinds else (AR_POLICIES if a.model == "ar" else POLICIES)
    if a.model == "ar":
        if a.study not in ("sensitivity", "pareto", "all"):
            raise SystemExit(f"--model ar runs the sensitivity and pareto studies only, not {a.study!r}")
        setup = make_ar_setup(steps=a.steps, prompts=a.train_prompts, chunks=a.chunks,
                              heldout_prompts=a.heldout_prompts if a.study != "sensitivity" else 0)
        if a.study in ("sensitivity", "all"):
            run_ar_sensitivity(setup, a.out, flips=not a.no_flips)
        if a.study in ("pareto", "all"):
            run_pareto(setup, calibrate(setup), a.out, a.budgets, a.iters, kinds)
        print(f"done in {time.perf_counter() - t0:.0f} s; results in {a.out}")
        return
    setup = make_setup(steps=a.steps, train_prompts=a.train_prompts, heldout_prompts=a.heldout_prompts)
    todo = STUDIES if a.study == "all" else (a.study,)
    if "memory" in todo:
        run_memory(setup, a.out)
    cal = calibrate(setup) if {"sensitivity", "pareto", "transfer"} & set(todo) else None
    if "sensitivity" in todo:
        run_sensitivity(setup, cal, a.out)
    if "pareto" in todo:
        run_pareto(setup, cal, a.out, a.budgets, a.iters, kinds)
    if "transfer" in todo:
        run_transfer(setup, cal, a.out, a.budgets[-1], a.iters, steps_to=a.transfer_steps,
                     frames_to=a.transfer_frames)
    print(f"done in {time.perf_counter() - t0:.0f} s; results in {a.out}")


if __name__ == "__main__":
    main()
