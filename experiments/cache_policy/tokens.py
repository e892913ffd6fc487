"""MotionCache's token threshold (and motion-weight floor alpha) learned under a compute budget on the shapes AR
model, against MotionCache calibrated to the same compute; hard decisions on held-out prompts.

    python -m experiments.cache_policy.tokens [--budget 0.5] [--steps 16] [--chunks 3] [--iters 10] [--out DIR]

writes DIR/tokens.{json,md,png} (results/cache_policy/ by default). Steps:
1. dense rollouts of training-split and held-out prompts (`make_ar_setup`, a rolling window of 3 chunks, CFG 5);
2. MotionCache (the paper's per-token rule: no temporal vote, no minimum update ratio; warm-up and phase 1
   shortened to the short rollout) with its e0 polynomial fitted on the training rollouts; its threshold for the
   budget chosen by `choose_mc_threshold` on the training prompts (fraction = selected tokens / dense tokens),
   each candidate run by the relaxed MotionCache in hard mode (the MotionCache rollout, one compilation);
3. from there, (log threshold, alpha logit) learned on the training prompts with Adam on log(rel. MSE of the
   final latents vs dense) + lam (expected token fraction - budget), soft gates annealed from T = 1 to 0.05
   (or straight-through, --mode), dual ascent on lam; every iterate also run with hard decisions; the
   iterate kept is the lowest training error within `BUDGET_TOLERANCE` of the budget (iterate 0: the start);
4. both policies evaluated as the real `motioncache` transform on held-out prompts: PSNR / SSIM of decoded
   videos and rel. MSE vs dense, token fraction from MotionCache's `selected` counter, block-pass token
   fraction from the work counters (with bucket padding; the clean K/V pass per chunk excluded); plus
   thresholds x 0.85-1.15 around both policies on the held-out prompts (`neighbourhood`), to show how rough
   fidelity is in the threshold, and a parity row (the real transform on the training prompts).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments.cache_policy.ar import make_ar_setup
from experiments.cache_policy.study import (
    BUDGET_TOLERANCE,
    MAX_CHANGE_MARGIN,
    Setup,
    calibrate,
    dense_run,
    learn_under_budget,
    rel_mse,
    relaxed_run,
)
from experiments.cache_policy.token_rule import MotionTokenRule, relaxed_motioncache
from experiments.cache_thresholds import choose_mc_threshold
from experiments.harness import machine, markdown_table, plot_or_skip, pyplot, video_fidelity, write_results
from experiments.motioncache import MotionCacheConfig, MotionCacheState, motioncache
from models.shapes import decode_latents
from vidaccel.checks import choice_arg
from vidaccel.relaxed import (
    RelaxedParams,
    check_budget,
    check_temperature,
    compute_fraction,
)
from vidaccel.transforms import branch_states, find_state, total_work

OUT = Path("results/cache_policy")


def motion_config(setup: Setup, *, warmup: int, phase1_updates: int, log=print) -> MotionCacheConfig:
    """MotionCache's paper rule (no temporal vote, no minimum update ratio: per-token decisions) with the e0
    polynomial fitted on the setup's dense training rollouts (`calibrate`, its log names the step-level
    baseline) and the given warm-up and phase-1 lengths; threshold 1 (chosen later). Two partial-forward
    buckets (they change the padding, not the decisions)."""
    log("MotionCache: fitting the e0 polynomial")
    cal = calibrate(setup, log)
    return MotionCacheConfig(thresh=1.0, coefficients=tuple(cal["coefficients"]),
                             max_change=cal["max_change"] * (1 + MAX_CHANGE_MARGIN), warmup=warmup,
                             phase1_updates=phase1_updates, temporal_vote=None, min_update_ratio=0.0,
                             buckets=(0.5, 1.0))


def hard_runner(setup: Setup, rule: MotionTokenRule, split: str = "train"):
    """policy -> (rel. MSE vs dense, counted token fraction, final latents) of the relaxed MotionCache in hard
    mode on a split's prompts: MotionCache's rollout (tests/test_relaxed_tokens.py), jitted once for every
    policy."""
    den = relaxed_motioncache(setup.base, rule, mode="hard")
    dense = getattr(setup, split).dense

    def run(policy):
        out = relaxed_run(setup, den, RelaxedParams(den.params.model, policy, jnp.float32(1.0), rule), split)
        return rel_mse(out.latents, dense), compute_fraction(out.state, hard=True), out.latents

    return jax.jit(run)


def calibrate_threshold(hard, rule: MotionTokenRule, budget: float, log=print) -> tuple[float, float]:
    """MotionCache's threshold (alpha as `rule.cfg`'s) whose token fraction on the training prompts is closest
    to `budget` (bisection, `choose_mc_threshold`), each candidate run by `hard` (`hard_runner`); and that
    fraction."""
    start = rule.init_policy()
    return choose_mc_threshold(lambda t: float(hard({**start, "log_thresh": jnp.log(jnp.float32(t))})[1]), budget,
                               0.1, log, iters=8, tol=BUDGET_TOLERANCE / 2, unit="the dense tokens (train)")


@dataclasses.dataclass
class LearnedTokens:
    """The kept policy (`best_iter`), its hard MotionCache config, every iterate's record."""

    policy: dict
    config: MotionCacheConfig
    history: list[dict]
    seconds: float
    best_iter: int


def learn_tokens(setup: Setup, budget: float, rule: MotionTokenRule, *, policy: dict | None = None, hard=None,
                 mode: str = "soft", iters: int = 10, lr: float = 0.05, temperature: float = 1.0,
                 final_temperature: float = 0.05, dual_lr: float = 10.0, log=print) -> LearnedTokens:
    """`rule`'s policy (log threshold[, alpha logit]) learned on the training prompts under a token budget,
    from `policy` (default the rule's initial one; e.g. the calibrated threshold): Adam on log(rel. MSE vs
    dense) + lam (expected token fraction - budget), dual ascent lam <- max(0, lam + dual_lr (expected -
    budget)). `mode` "soft": gates sigmoid(margin / T), T annealed geometrically from `temperature` to
    `final_temperature`; "straight_through": the forward pass is hard. Every iterate is also run with hard
    decisions (`hard`, a `hard_runner` of this rule); kept: the lowest hard training error among the iterates
    whose counted fraction is within `BUDGET_TOLERANCE` of the budget (iterate 0 is the start)."""
    budget, temperature = check_budget(budget), check_temperature(temperature)
    final_temperature = check_temperature(final_temperature)
    choice_arg("mode", mode, ("soft", "straight_through"))
    den = relaxed_motioncache(setup.base, rule, mode=mode)
    hard = hard_runner(setup, rule) if hard is None else hard

    def objective(policy, lam, temp):
        out = relaxed_run(setup, den, RelaxedParams(den.params.model, policy, temp, rule))
        err, frac = rel_mse(out.latents, setup.train.dense), compute_fraction(out.state)
        return jnp.log(err) + lam * (frac - budget), (err, frac)

    def hard_eval(policy):
        herr, hfrac = (float(v) for v in hard(policy)[:2])
        return herr, hfrac, {"thresh": float(jnp.exp(policy["log_thresh"])), "alpha": float(rule.alpha(policy))}

    best, best_iter, history, seconds = learn_under_budget(
        objective, hard_eval, rule.init_policy() if policy is None else policy, budget, iters=iters, lr=lr,
        temperature=temperature, final_temperature=final_temperature, dual_lr=dual_lr, compute_name="hard_tokens",
        label=f"tokens ({mode})", log=log)
    best = {k: float(v) for k, v in best.items()}
    return LearnedTokens(best, rule.hard_config(best), history, seconds, best_iter)


def evaluate_motioncache(setup: Setup, cfg: MotionCacheConfig, split: str = "heldout") -> dict:
    """The real MotionCache rollout (`motioncache`, partial forwards) with `cfg` on a split's prompts: PSNR /
    SSIM of decoded videos and rel. MSE vs dense; `tokens` = its `selected` counter over the dense tokens;
    `token_layers` = token-layers its block passes ran (bucket padding included, the clean K/V pass per chunk
    excluded) over the dense run's (a batch shares its passes: the largest selection sets the bucket);
    `forwards` = calls by kind [none, full, partial] (both branches)."""
    sp = getattr(setup, split)
    out = dense_run(motioncache(setup.base, cfg), setup.solver, setup.guidance, sp.noise, sp.context,
                    chunks=setup.chunks)
    states = [find_state(s, MotionCacheState) for s in branch_states(out.state)]
    b, f, h, w = sp.noise.shape[:4]
    pt, ph, pw = setup.base.config.patch_size
    n = (f // setup.chunks // pt) * (h // ph) * (w // pw)          # tokens per chunk
    passes = len(states) * setup.calls * n           # a video's dense denoising tokens (the batch shares passes)
    work = total_work(out.state)
    commit_tokens = len(states) * setup.chunks * n
    fid = video_fidelity(decode_latents(np.asarray(out.latents), uint8=True),
                         decode_latents(np.asarray(sp.dense), uint8=True))
    return {"thresh": cfg.thresh, "alpha": cfg.alpha, "tokens": sum(int(s.selected) for s in states) / (b * passes),
            "token_layers": (work["token_layers"] / setup.base.config.num_layers - commit_tokens) / passes,
            "forwards": np.sum([np.asarray(s.forwards) for s in states], axis=0).tolist(),
            "psnr": fid["psnr"], "ssim": fid["ssim"], "rel_mse": float(rel_mse(out.latents, sp.dense))}


def neighbourhood(setup: Setup, rule: MotionTokenRule, policies: list[dict], log=print) -> list[dict]:
    """`policies` run with hard decisions on the held-out prompts (the relaxed MotionCache in hard mode, one
    compilation): token fraction, PSNR / SSIM and rel. MSE vs dense. How much the fidelity moves between
    neighbouring thresholds tells whether a difference between two policies is more than that roughness."""
    run, rows = hard_runner(setup, rule, "heldout"), []
    dense = decode_latents(np.asarray(setup.heldout.dense), uint8=True)
    for p in policies:
        err, frac, lat = run(p)
        fid = video_fidelity(decode_latents(np.asarray(lat), uint8=True), dense)
        rows.append({"thresh": float(jnp.exp(p["log_thresh"])), "alpha": float(rule.alpha(p)), "tokens": float(frac),
                     "psnr": fid["psnr"], "ssim": fid["ssim"], "rel_mse": float(err)})
        log(f"    held-out, thresh {rows[-1]['thresh']:.4g} alpha {rows[-1]['alpha']:.3f}: tokens {frac:.3f} PSNR "
            f"{fid['psnr']:.2f}")
    return rows


# ------------------------------------------------------------------------------------------------ command
def run_tokens(*, budget: float = 0.5, steps: int = 16, chunks: int = 3, train_prompts: int = 2,
               heldout_prompts: int = 4, iters: int = 10, warmup: int = 2, phase1_updates: int = 2,
               mode: str = "soft", out: Path = OUT, log=print) -> dict:
    """The study (module docstring); writes out/tokens.{json,md,png} and returns the report."""
    budget = check_budget(budget)
    t0 = time.perf_counter()
    setup = make_ar_setup(steps=steps, prompts=train_prompts, chunks=chunks, heldout_prompts=heldout_prompts)
    rule = MotionTokenRule(motion_config(setup, warmup=warmup, phase1_updates=phase1_updates, log=log),
                           learn_alpha=True)
    hard = hard_runner(setup, rule)
    thresh, frac = calibrate_threshold(hard, rule, budget, log)
    start = {**rule.init_policy(), "log_thresh": jnp.log(jnp.float32(thresh))}
    calibrated = rule.hard_config(start)
    log(f"calibrated MotionCache: thresh {thresh:.4g} -> {frac:.3f} of the training tokens; learning ({mode})")
    learned = learn_tokens(setup, budget, rule, policy=start, hard=hard, mode=mode, iters=iters, log=log)
    rows = []
    for name, c in (("calibrated MotionCache", calibrated), ("learned (thresh, alpha)", learned.config)):
        rows.append({"policy": name, **evaluate_motioncache(setup, c)})
        log(f"  {name}, held-out: " + ", ".join(f"{k} {rows[-1][k]:.4g}" for k in ("tokens", "psnr", "rel_mse")))
    cal_h, learn_h = rows
    log("neighbouring thresholds (calibrated and learned alpha) on the held-out prompts")
    grid = [{**p, "log_thresh": p["log_thresh"] + jnp.float32(d)} for p in (start, learned.policy)
            for d in np.log([0.85, 0.9, 0.95, 1.0, 1.05, 1.1, 1.15])]
    sweep = neighbourhood(setup, rule, grid, log)
    parity = evaluate_motioncache(setup, calibrated, "train")      # the real transform where the relaxed one ran
    report = {
        "budget": budget, "steps": steps, "chunks": chunks, "guidance": setup.guidance,
        "train_prompts": setup.train.prompts, "heldout_prompts": setup.heldout.prompts,
        "config": {k: v for k, v in dataclasses.asdict(calibrated).items() if k != "thresh"}, "mode": mode,
        "calibrated_thresh": thresh, "calibrated_train_tokens": frac,
        "learned": {"policy": learned.policy, "thresh": learned.config.thresh, "alpha": learned.config.alpha,
                    "best_iter": learned.best_iter, "seconds": learned.seconds},
        "history": learned.history, "rows": rows, "calibrated_train_motioncache": parity,
        "neighbourhood": sweep,
        "learned_within_budget_heldout": abs(learn_h["tokens"] - budget) <= BUDGET_TOLERANCE,
        "psnr_gain_heldout": learn_h["psnr"] - cal_h["psnr"],
        "compute_gap_heldout": learn_h["tokens"] - cal_h["tokens"],
        "seconds": time.perf_counter() - t0, "machine": machine(),
    }
    write_results(out, "tokens", report, _markdown(report))
    plot_or_skip(_plot, report, Path(out) / "tokens.png", log=log)
    return report


def _markdown(r: dict) -> str:
    cfg = r["config"]
    lines = [
        "# MotionCache's token threshold learned under a compute budget (shapes AR model)\n",
        f"Command: `python -m experiments.cache_policy.tokens --budget {r['budget']} --steps {r['steps']} --chunks "
        f"{r['chunks']} --iters {len(r['history']) - 1}` ({r['seconds']:.0f} s on {r['machine']}).\n",
        f"{len(r['train_prompts'])} training and {len(r['heldout_prompts'])} held-out prompts, {r['chunks']} chunks x "
        f"{r['steps']} UniPC steps, CFG {r['guidance']}, rolling window of 3 chunks. MotionCache: e0 polynomial "
        f"fitted on the training rollouts, warm-up {cfg['warmup']}, phase 1 {cfg['phase1_updates']} updates, the "
        f"paper's per-token rule (vote {cfg['temporal_vote']}, min update ratio {cfg['min_update_ratio']}), motion "
        f"'{cfg['motion']}'. Token "
        "fraction = MotionCache's `selected` counter / the dense run's denoising tokens (both CFG branches); "
        "block tokens = token-layers of its block passes (bucket padding included, the clean K/V pass excluded) / "
        "the dense run's. Every row is the real `motioncache` transform (hard decisions, partial forwards).\n",
        f"Calibrated: threshold {r['calibrated_thresh']:.4g} (alpha {cfg['alpha']:.3f}), chosen by bisection for "
        f"{r['calibrated_train_tokens']:.3f} of the training tokens. Learned ({r['mode']} gates, Adam + dual "
        f"ascent, kept iterate {r['learned']['best_iter']}): threshold {r['learned']['thresh']:.4g}, alpha "
        f"{r['learned']['alpha']:.3f}, in {r['learned']['seconds']:.0f} s.\n",
        "Held-out prompts (training-prompt figures of both policies are iterates 0 and "
        f"{r['learned']['best_iter']} of the training table below):\n",
        markdown_table(r["rows"], {"policy": "policy", "thresh": lambda x: f"{x['thresh']:.4g}",
                                   "alpha": lambda x: f"{x['alpha']:.3f}", "tokens": lambda x: f"{x['tokens']:.3f}",
                                   "block tokens": lambda x: f"{x['token_layers']:.3f}",
                                   "PSNR dB": lambda x: f"{x['psnr']:.2f}", "SSIM": lambda x: f"{x['ssim']:.4f}",
                                   "rel. MSE": lambda x: f"{x['rel_mse']:.3e}",
                                   "forwards none/full/partial": lambda x: "/".join(map(str, x["forwards"]))}),
        f"\nHeld out: learned - calibrated = **{r['psnr_gain_heldout']:+.2f} dB** PSNR at "
        f"{r['compute_gap_heldout']:+.3f} token fraction; the learned policy's held-out token fraction is "
        f"{'within' if r['learned_within_budget_heldout'] else 'OUTSIDE'} budget {r['budget']} +- "
        f"{BUDGET_TOLERANCE}.\n",
        f"Parity on the training prompts at the calibrated threshold: the real MotionCache selects "
        f"{r['calibrated_train_motioncache']['tokens']:.3f} of the tokens with rel. MSE "
        f"{r['calibrated_train_motioncache']['rel_mse']:.3e}; the relaxed one in hard mode (iterate 0) "
        f"{r['history'][0]['hard_tokens']:.3f} and {r['history'][0]['hard_rel_mse']:.3e} (equal up to float "
        "rounding, which the AR rollout amplifies).\n",
        "\nNeighbouring thresholds (x 0.85 ... 1.15 of each policy's; hard decisions, held-out prompts, run as the "
        "relaxed MotionCache in hard mode):\n",
        markdown_table(r["neighbourhood"], {"thresh": lambda x: f"{x['thresh']:.4g}",
                                            "alpha": lambda x: f"{x['alpha']:.3f}",
                                            "tokens": lambda x: f"{x['tokens']:.3f}",
                                            "PSNR dB": lambda x: f"{x['psnr']:.2f}",
                                            "rel. MSE": lambda x: f"{x['rel_mse']:.3e}"}),
        _roughness(r),
        f"\nTraining iterates ({r['mode']} gates; 'hard' columns: the iterate run with hard decisions):\n",
        markdown_table(r["history"], {"iter": "iter", "thresh": lambda x: f"{x['thresh']:.4g}",
                                      "alpha": lambda x: f"{x['alpha']:.3f}",
                                      "hard tokens": lambda x: f"{x['hard_tokens']:.3f}",
                                      "hard rel. MSE": lambda x: f"{x['hard_rel_mse']:.3e}",
                                      "T": lambda x: f"{x['temperature']:.3f}" if "temperature" in x else "-",
                                      "expected": lambda x: f"{x['expected']:.3f}" if "expected" in x else "-",
                                      "rel. MSE": lambda x: f"{x['rel_mse']:.3e}" if "rel_mse" in x else "-",
                                      "lam": lambda x: f"{x['lam']:.2f}" if "lam" in x else "-"}),
    ]
    return "\n".join(lines) + "\n"


def _roughness(r: dict) -> str:
    """What the neighbouring thresholds at the calibrated alpha say about the learned policy's difference."""
    alpha = r["neighbourhood"][0]["alpha"]
    near = [x for x in r["neighbourhood"] if x["alpha"] == alpha]
    top = max(near, key=lambda x: x["psnr"])
    learned = next(x for x in r["rows"] if x["policy"].startswith("learned"))
    verdict = ("no better than" if learned["psnr"] <= top["psnr"] + 0.1 else "better than")
    return (f"\nAt the calibrated alpha {alpha:.3f}, thresholds x 0.85-1.15 give {min(x['psnr'] for x in near):.2f} to "
            f"{top['psnr']:.2f} dB held-out PSNR at {min(x['tokens'] for x in near):.3f} to "
            f"{max(x['tokens'] for x in near):.3f} tokens, not monotone in the threshold: the learned policy "
            f"({learned['psnr']:.2f} dB at {learned['tokens']:.3f}) is {verdict} the best of them "
            f"({top['psnr']:.2f} dB at {top['tokens']:.3f} tokens, threshold {top['thresh']:.4g}).\n")


def _plot(r: dict, path: Path) -> None:
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    it = [h["iter"] for h in r["history"]]
    a.plot(it, [h["hard_rel_mse"] for h in r["history"]], "o-", label="hard rel. MSE (train)")
    a.set_yscale("log")
    a.set_xlabel("iteration")
    a2 = a.twinx()
    a2.plot(it, [h["hard_tokens"] for h in r["history"]], "s--", color="tab:orange", label="hard token fraction")
    a2.axhline(r["budget"], color="gray", lw=0.8)
    a.set_title(f"learning ({r['mode']} gates), training prompts")
    a.legend(loc="upper left", fontsize=8)
    a2.legend(loc="upper right", fontsize=8)
    for alpha_row, colour in ((r["neighbourhood"][0]["alpha"], "tab:blue"), (r["learned"]["alpha"], "tab:red")):
        pts = [x for x in r["neighbourhood"] if x["alpha"] == alpha_row]
        b.plot([x["tokens"] for x in pts], [x["psnr"] for x in pts], ".:", color=colour, alpha=0.5,
               label=f"thresh x 0.85-1.15, alpha {alpha_row:.3f}")
    for row in r["rows"]:
        b.scatter(row["tokens"], row["psnr"], color="tab:blue" if row["policy"].startswith("calibrated") else "tab:red",
                  label=row["policy"])
    b.axvline(r["budget"], color="gray", lw=0.8)
    b.set_xlabel("token fraction (counted)")
    b.set_ylabel("PSNR vs dense (dB)")
    b.legend(fontsize=7)
    b.set_title("hard MotionCache, held-out prompts")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m experiments.cache_policy.tokens", description=__doc__.split("\n")[0])
    ap.add_argument("--budget", type=float, default=0.5, help="token fraction budget in (0, 1]")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--chunks", type=int, default=3)
    ap.add_argument("--train-prompts", type=int, default=2)
    ap.add_argument("--heldout-prompts", type=int, default=4)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2, help="MotionCache warm-up calls per chunk")
    ap.add_argument("--phase1", type=int, default=2, help="MotionCache phase-1 updates per chunk")
    ap.add_argument("--mode", choices=("soft", "straight_through"), default="soft", help="gates while learning")
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args(argv)
    run_tokens(budget=a.budget, steps=a.steps, chunks=a.chunks, train_prompts=a.train_prompts,
               heldout_prompts=a.heldout_prompts, iters=a.iters, warmup=a.warmup, phase1_updates=a.phase1,
               mode=a.mode, out=a.out)


if __name__ == "__main__":
    main()
