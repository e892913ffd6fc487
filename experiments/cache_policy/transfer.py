"""Transfer of learned cache policies (issue 18): each policy is learned once, on the training prompts at the
training setting (UniPC S steps, F latent frames), and evaluated with hard decisions (`lax.cond`, compute
from the counters)

- on held-out prompts at the training setting (prompt transfer),
- on held-out prompts at another step count S' (a per-step schedule is resampled: `resample_schedule`, then
  the top round(B S') logits are kept, `top_k_schedule`; the threshold and the network are used as they are),
- on held-out prompts at another video length F' (every policy as it is).

Beside them at every setting: TeaCache calibrated at that setting (on the training prompts, for the budget),
TeaCache with the training setting's calibration as it is, and a uniform schedule at the budget.
"""

from __future__ import annotations

import numpy as np

from experiments.cache_policy.study import (
    BUDGET_TOLERANCE,
    POLICIES,
    calibrate,
    evaluate,
    evaluate_teacache,
    evaluate_uniform,
    learn_policy,
    make_setup,
    teacache_rule,
)
from experiments.harness import machine, markdown_table, plot_or_skip, pyplot, write_results
from vidaccel.relaxed import ScheduleRule, relaxed_cache, relaxed_params, resample_schedule, top_k_schedule


def _hard_policy(res, base, steps: int, budget: float):
    """(denoiser, params) of a learned policy for a sampler of `steps` steps over `base`."""
    if res.kind != "schedule" or steps == len(res.policy["logits"]):
        return res.den_hard, res.params_hard
    rule, policy = resample_schedule(ScheduleRule(len(res.policy["logits"])), res.policy, steps)
    den = relaxed_cache(base, rule, mode="hard")
    return den, relaxed_params(den, top_k_schedule(rule, policy, budget))


def _rows(tgt, scenario: str, cal_train: dict, learned: dict, budget: float, log, *, trained_here: bool = False):
    """Every method evaluated on `tgt`'s held-out prompts (`trained_here`: tgt is the training setting, whose
    calibration is `cal_train`)."""
    steps, frames = tgt.solver.num_steps, int(tgt.heldout.noise.shape[1])
    cfg_train, _ = teacache_rule(cal_train, budget)
    if trained_here:
        runs = {"TeaCache (calibrated at this setting)": evaluate_teacache(tgt, cfg_train)}
    else:
        cfg_here, _ = teacache_rule(calibrate(tgt, log=log), budget)
        runs = {"TeaCache (calibrated at this setting)": evaluate_teacache(tgt, cfg_here),
                "TeaCache (training calibration as is)": evaluate_teacache(tgt, cfg_train)}
    runs |= {"uniform schedule": evaluate_uniform(tgt, budget)}
    for kind, res in learned.items():
        runs[f"learned {kind}"] = evaluate(tgt, *_hard_policy(res, tgt.base, steps, budget))
    rows = []
    for name, ev in runs.items():
        ev.pop("psnr_per_video", None)
        rows.append({"scenario": scenario, "method": name, "steps": steps, "frames": frames, "budget": budget,
                     "budget_holds": abs(ev["compute"] - budget) <= BUDGET_TOLERANCE, **ev})
        log(f"  {scenario:<8} {name:<40} compute {ev['compute']:.3f} PSNR {ev['psnr']:.2f}")
    return rows


def run_transfer(setup, cal, out, budget: float, iters: int, *, steps_to: int, frames_to: int, log=print) -> dict:
    """Learn every policy kind on `setup` at `budget`, evaluate the transfers, write <out>/transfer.*."""
    learned = {k: learn_policy(setup, k, budget, calibration=cal, iters=iters, log=log) for k in POLICIES}
    train = {k: evaluate(setup, r.den_hard, r.params_hard, split="train") for k, r in learned.items()}
    n_train, n_held = len(setup.train.prompts), len(setup.heldout.prompts)
    rows = _rows(setup, "prompts", cal, learned, budget, log, trained_here=True)
    for r in rows:
        kind = r["method"].removeprefix("learned ")
        if kind in learned:
            r["train_psnr"], r["train_compute"] = train[kind]["psnr"], train[kind]["compute"]
    other = {"steps": dict(steps=steps_to), "length": dict(frames=frames_to)}
    for scenario, kw in other.items():
        tgt = make_setup(**{"steps": setup.solver.num_steps, "frames": int(setup.train.noise.shape[1]), **kw},
                         train_prompts=n_train, heldout_prompts=n_held, guidance=setup.guidance, model=setup.model)
        rows += _rows(tgt, scenario, cal, learned, budget, log)
    report = {"budget": budget, "tolerance": BUDGET_TOLERANCE, "iters": iters, "guidance": setup.guidance,
              "train": {"steps": setup.solver.num_steps, "frames": int(setup.train.noise.shape[1]),
                        "prompts": setup.train.prompts},
              "heldout_prompts": setup.heldout.prompts, "steps_to": steps_to, "frames_to": frames_to, "rows": rows,
              "learned": {k: {"policy": r.policy, "history": r.history, "seconds": r.seconds}
                          for k, r in learned.items()},
              "machine": machine()}
    write_results(out, "transfer", report, _markdown(report))
    plot_or_skip(_plot, rows, out / "transfer.png", log=log)
    return report


def _markdown(rep: dict) -> str:
    tr = rep["train"]
    what = (f"Policies learned at budget {rep['budget']:.2f} on {len(tr['prompts'])} training prompts at UniPC "
            f"{tr['steps']} steps, {tr['frames']} latent frames, CFG {rep['guidance']} ({rep['iters']} Adam "
            "iterations, annealed soft gates, dual ascent, iterate kept by hard training error within the budget), "
            "then evaluated with hard decisions on "
            f"{len(rep['heldout_prompts'])} held-out prompts: at the training setting (prompts), at "
            f"{rep['steps_to']} steps (steps; the schedule resampled in the step fraction, then its top "
            f"round(B x steps) logits kept) and at {rep['frames_to']} latent frames (length). compute = block-stack "
            f"passes / calls from the counters; the budget holds when |compute - B| <= {rep['tolerance']}. "
            "PSNR / SSIM of decoded videos against the dense run at the same setting; train PSNR is the hard "
            "policy on the training prompts.")
    cols = {"scenario": "scenario", "method": "method", "steps": "steps", "frames": "frames",
            "compute": lambda r: f"{r['compute']:.3f}", "budget holds": lambda r: "yes" if r["budget_holds"] else "no",
            "PSNR": lambda r: f"{r['psnr']:.2f}", "SSIM": lambda r: f"{r['ssim']:.4f}",
            "rel. MSE": lambda r: f"{r['rel_mse']:.2e}",
            "train PSNR": lambda r: f"{r['train_psnr']:.2f}" if "train_psnr" in r else "-"}
    return "\n".join(["# Transfer of learned cache policies (hard decisions, held-out prompts)\n", what + "\n",
                      markdown_table(rep["rows"], cols)]) + "\n"


def _plot(rows, path):
    plt = pyplot()
    scenarios = list(dict.fromkeys(r["scenario"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(methods)
    for j, m in enumerate(methods):
        vals = [next((r["psnr"] for r in rows if r["scenario"] == s and r["method"] == m), np.nan) for s in scenarios]
        ax.bar(np.arange(len(scenarios)) + j * width, vals, width, label=m)
    ax.set_xticks(np.arange(len(scenarios)) + 0.4 - width / 2, scenarios)
    ax.set_ylabel("PSNR vs dense (dB), held-out")
    ax.set_ylim(bottom=float(np.nanmin([r["psnr"] for r in rows])) - 3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["run_transfer"]
