"""The per-head threshold study: XAttention thresholds per (layer, head) learned under an attention-density
budget on the shapes t2v model, against one uniform threshold and HASTE's EBC table at matched density.

    python -m experiments.cache_policy.heads [--budgets 0.5,0.35] [--steps 12] [--out results/cache_policy]

Protocol (`run_heads`): the `study.make_setup` prompts (training split for calibration and learning, held-out
split for evaluation), UniPC `steps`, CFG 5; XAttention with the shapes block / stride
(`xattention_shapes`) and a dense warm-up of 10% of the steps. Compute = attention density over every
attention call (`experiments.cache_policy.heads`). For each budget B, on the training prompts: the uniform
threshold and the EBC budget (EBC measured afresh at this step count, `calibrate_ebc`, re-solved per budget)
are each bisected so that their counted density is B; the learned table starts at that uniform threshold.
Every method is then run once with hard decisions on the held-out prompts: PSNR / SSIM of the decoded videos
against the dense run, relative MSE of the latents, and the density counted by the hook's counters.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments.cache_policy.heads import relaxed_xattention
from experiments.cache_policy.study import (
    BUDGET_TOLERANCE,
    LEARN_MODES,
    Setup,
    learn_under_budget,
    make_setup,
    rel_mse,
    relaxed_run,
)
from experiments.harness import machine, markdown_table, plot_or_skip, pyplot, video_fidelity, write_results
from experiments.haste import EBCConfig, EBCTable, calibrate_ebc
from experiments.shapes_presets import xattention_shapes
from experiments.xattention import XAttentionConfig, xattention
from models.shapes import decode_latents
from vidaccel.checks import choice_arg, float_arg, int_arg
from vidaccel.relaxed import RelaxedParams, check_budget, check_temperature, compute_fraction, relaxed_params
from vidaccel.sparse_attention import sparse_summary

EBC_CANDIDATES = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def heads_xattention(steps: int, backend: str = "auto") -> XAttentionConfig:
    """The study's XAttention: the shapes block / stride, dense warm-up round(10% of `steps`) (the paper's 5 of
    50), at least 1."""
    return xattention_shapes(warmup_steps=max(1, round(0.1 * steps)), backend=backend)


class HardRunner:
    """Hard runs of the relaxed XAttention denoiser on a split, one compilation per split for every table."""

    def __init__(self, setup: Setup, cfg: XAttentionConfig):
        self.setup, self.cfg, self.den = setup, cfg, relaxed_xattention(setup.base, cfg, mode="hard")
        self.rule = self.den.params.rule
        self._fns = {}

    def table(self, tau) -> jax.Array:
        """A scalar / (heads,) / (layers, heads) threshold spec as the policy's (layers, heads) table."""
        return jnp.broadcast_to(jnp.asarray(tau, jnp.float32), (self.rule.layers, self.rule.heads))

    def run(self, tau, split: str = "train"):
        if split not in self._fns:
            self._fns[split] = jax.jit(lambda p: relaxed_run(self.setup, self.den, p, split))
        return self._fns[split](relaxed_params(self.den, {"tau": self.table(tau)}))

    def density(self, tau, split: str = "train") -> float:
        return float(compute_fraction(self.run(tau, split).state, hard=True))

    def evaluate(self, tau, split: str = "heldout") -> dict:
        """Fidelity against the dense run and the counted densities, hard decisions on `split`."""
        sp = getattr(self.setup, split)
        out = self.run(tau, split)
        s = sparse_summary(out.state)
        fid = video_fidelity(decode_latents(np.asarray(out.latents), uint8=True),
                             decode_latents(np.asarray(sp.dense), uint8=True))
        return {"psnr": fid["psnr"], "ssim": fid["ssim"], "rel_mse": float(rel_mse(out.latents, sp.dense)),
                "density": float(compute_fraction(out.state, hard=True)), "density_sparse": s["density_sparse"],
                "density_overall": s["density_overall"]}


def bisect_density(density, lo: float, hi: float, budget: float, iters: int = 6) -> tuple[float, float]:
    """The probed x in [lo, hi] whose (non-decreasing) density(x) is closest to `budget`, preferring x within
    it, by bisection: (x, density(x))."""
    probes = {}
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        probes[mid] = d = density(mid)
        lo, hi = (mid, hi) if d <= budget else (lo, mid)
    probes.setdefault(hi, density(hi))
    x = min(probes, key=lambda k: (abs(probes[k] - budget) > BUDGET_TOLERANCE, abs(probes[k] - budget)))
    return x, probes[x]


@dataclasses.dataclass
class LearnedHeads:
    budget: float
    tau: np.ndarray            # (layers, heads) the kept table
    best_iter: int
    history: list[dict]
    seconds: float


def learn_heads(setup: Setup, runner: HardRunner, budget: float, init, *, iters: int = 6, lr: float = 0.03,
                temperature: float = 0.1, final_temperature: float = 0.02, mode: str = "soft",
                dual_lr: float = 10.0, remat="step", log=print) -> LearnedHeads:
    """Learn the (layers, heads) threshold table on the training prompts under an attention-density budget, the
    shared protocol (`study.learn_under_budget`): loss log(rel_mse of final latents vs dense) + lam (expected density -
    budget), Adam on tau (kept in [0, 1]), dual ascent on lam >= 0, the temperature (in units of a row's block
    mass) annealed geometrically; every iterate also run hard on the training prompts, and the kept table the
    one with the lowest hard training error among those within `BUDGET_TOLERANCE` of the budget (iterate 0,
    `init`, is the start). `remat` as `relaxed_sample`'s ("step": the backward pass keeps one step's
    (B, H, N, N) attention weights at a time; without it 16 steps of the shapes model need ~9 GB)."""
    budget = check_budget(budget)
    temperature = check_temperature(temperature)
    final_temperature = check_temperature(final_temperature)
    choice_arg("mode", mode, LEARN_MODES)
    iters = int_arg("iters", iters, minimum=0)
    lr = float_arg("lr", lr, low=0.0, low_open=True)
    rule = runner.rule
    den = relaxed_xattention(setup.base, runner.cfg, rule, mode=mode)
    dense = setup.train.dense

    def objective(tau, lam, temp):
        out = relaxed_run(setup, den, RelaxedParams(den.params.model, {"tau": tau}, temp, rule), remat=remat)
        err, frac = rel_mse(out.latents, dense), compute_fraction(out.state)
        return jnp.log(err) + lam * (frac - budget), (err, frac)

    def hard_eval(tau):
        out = runner.run(tau)
        return (float(rel_mse(out.latents, dense)), float(compute_fraction(out.state, hard=True)),
                {"tau_mean": float(tau.mean()), "tau_std": float(tau.std())})

    best, best_iter, history, seconds = learn_under_budget(
        objective, hard_eval, runner.table(init), budget, iters=iters, lr=lr, temperature=temperature,
        final_temperature=final_temperature, dual_lr=dual_lr, project=lambda tau: jnp.clip(tau, 0.0, 1.0),
        compute_name="hard_density", label="heads", log=log)
    return LearnedHeads(budget, np.asarray(best), best_iter, history, seconds)


def ebc_table(setup: Setup, cfg: XAttentionConfig, log=print) -> EBCTable:
    """HASTE's EBC measured on the setup's training prompts at its step count (jnp reference attention), over
    `EBC_CANDIDATES` (EBCConfig's grid stops at 0.5, whose density is above the study's lower budgets)."""
    tr = setup.train
    policy = xattention(dataclasses.replace(cfg, backend="reference"))
    return calibrate_ebc(setup.model, policy, tr.noise, tr.context, jnp.zeros_like(tr.context),
                         EBCConfig(candidates=EBC_CANDIDATES, guidance=setup.guidance), solver=setup.solver, log=log)


def run_heads(out: Path, *, budgets=(0.5, 0.35), steps: int = 12, train_prompts: int = 2, heldout_prompts: int = 4,
              iters: int = 5, log=print) -> dict:
    """The whole study (module docstring); writes <out>/heads.{json,md,png} and returns the report."""
    budgets = [check_budget(b) for b in budgets]
    t_start = time.perf_counter()
    setup = make_setup(steps=steps, train_prompts=train_prompts, heldout_prompts=heldout_prompts)
    xcfg = heads_xattention(steps)
    runner = HardRunner(setup, xcfg)
    t0 = time.perf_counter()
    ebc = ebc_table(setup, xcfg, log=log)
    ebc_seconds = time.perf_counter() - t0
    floor = float(ebc.densities.min(axis=-1).mean())
    rows, learned, matched = [], {}, {}
    for b in budgets:
        tau_u, d_u = bisect_density(runner.density, 0.0, 1.0, b)
        b_e, d_e = bisect_density(lambda x: runner.density(ebc.resolve(x).thresholds), floor, 1.0, b)
        log(f"B={b:.2f}: uniform tau {tau_u:.4f} (train density {d_u:.3f}); EBC budget {b_e:.4f} (train density "
            f"{d_e:.3f})")
        tables = {"uniform": runner.table(tau_u), "EBC (HASTE)": jnp.asarray(ebc.resolve(b_e).thresholds)}
        train = {"uniform": d_u, "EBC (HASTE)": d_e}
        for start in ("uniform", "EBC (HASTE)"):
            log(f"  learning from the {start} table")
            res = learn_heads(setup, runner, b, tables[start], iters=iters, log=log)
            name, hist = f"learned ({start} start)", res.history
            tables[name], train[name] = jnp.asarray(res.tau), hist[res.best_iter]["hard_density"]
            learned[f"{name} @ {b}"] = {"best_iter": res.best_iter, "history": hist, "seconds": res.seconds,
                                        "start_hard_rel_mse": hist[0]["hard_rel_mse"],
                                        "kept_hard_rel_mse": hist[res.best_iter]["hard_rel_mse"]}
        for name, tau in tables.items():
            ev = runner.evaluate(tau)
            rows.append({"method": name, "budget": b, **ev, "train_density": train[name],
                         "budget_holds": bool(abs(ev["density"] - b) <= BUDGET_TOLERANCE),
                         "tau": np.round(np.asarray(tau), 4).tolist()})
            log(f"  {name:<28} B={b:.2f} held-out density {ev['density']:.3f} PSNR {ev['psnr']:.2f}")
        matched[str(b)] = {"uniform_tau": tau_u, "ebc_budget": b_e}
    report = {"steps": steps, "guidance": setup.guidance, "xattention": dataclasses.asdict(xcfg),
              "train_prompts": setup.train.prompts, "heldout_prompts": setup.heldout.prompts,
              "budgets": budgets, "iters": iters, "tolerance": BUDGET_TOLERANCE, "rows": rows, "learned": learned,
              "matched": matched,
              "ebc": {"seconds": ebc_seconds, "candidates": list(ebc.candidates), "meta": ebc.meta,
                      "floor_density": floor},
              "seconds": time.perf_counter() - t_start, "machine": machine()}
    write_results(out, "heads", report, heads_markdown(report))
    plot_or_skip(_plot_heads, report, out / "heads.png", log=log)
    return report


def heads_markdown(rep: dict) -> str:
    x = rep["xattention"]
    md = ["# Per-head XAttention thresholds: learned vs uniform vs HASTE's EBC (held-out prompts, hard decisions)\n",
          f"Shapes t2v model, UniPC {rep['steps']} steps, CFG {rep['guidance']}, XAttention block {x['block_size']}, "
          f"stride {x['stride']}, dense warm-up {x['warmup_steps']} steps. Compute = attention density: query-key "
          "pairs attended / dense, over every attention call (warm-up included; the attention core only). At each "
          f"budget B, on {len(rep['train_prompts'])} training prompts, the uniform threshold and the EBC budget "
          "(EBC measured afresh on the training prompts at this step count, re-solved per budget) are bisected to "
          "density B; a (layers, heads) table is learned from each of the two (uniform start, EBC start): "
          f"{rep['iters']} Adam updates on log(rel. MSE of final latents vs dense) + lam (expected density - B), "
          "soft block weights, temperature annealed 0.1 -> 0.02, dual ascent on lam; kept: the iterate with the "
          f"lowest hard training error within {rep['tolerance']} of B. Evaluated once on "
          f"{len(rep['heldout_prompts'])} held-out prompts; density from the counters; PSNR / SSIM of decoded "
          "videos vs the dense run.\n",
          markdown_table(rep["rows"], {
              "method": "method", "budget": lambda r: f"{r['budget']:.2f}",
              "train density": lambda r: f"{r['train_density']:.3f}",
              "held-out density": lambda r: f"{r['density']:.3f}",
              "holds": lambda r: "yes" if r["budget_holds"] else "no", "PSNR": lambda r: f"{r['psnr']:.2f}",
              "SSIM": lambda r: f"{r['ssim']:.4f}", "rel. MSE": lambda r: f"{r['rel_mse']:.3e}"}),
          "\nLearning (hard training error of the start and of the kept iterate):\n",
          markdown_table([{"b": k, **v} for k, v in rep["learned"].items()], {
              "policy @ budget": "b", "start": lambda r: f"{r['start_hard_rel_mse']:.3e}",
              "kept": lambda r: f"{r['kept_hard_rel_mse']:.3e}", "kept iterate": "best_iter",
              "seconds": lambda r: f"{r['seconds']:.0f}"}),
          f"\nEBC measurement: {rep['ebc']['seconds']:.0f} s; whole command: {rep['seconds']:.0f} s on "
          f"{rep['machine']}.\n"]
    return "\n".join(md)


def _plot_heads(rep, path):
    plt = pyplot()
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    rows = rep["rows"]
    for m in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r["density"], r["psnr"]) for r in rows if r["method"] == m)
        ax[0].plot(*zip(*pts, strict=True), "o-", label=m)
    ax[0].set_xlabel("attention density (held-out, counted)")
    ax[0].set_ylabel("PSNR vs dense (dB), held-out")
    ax[0].legend(fontsize=8)
    b = min(rep["budgets"])
    tab = [r for r in rows if r["budget"] == b]
    im = ax[1].imshow(np.concatenate([np.asarray(r["tau"]) for r in tab], axis=1), cmap="viridis", vmin=0, vmax=1)
    ax[1].set_title(f"tau per (layer, head) at B={b}, left to right:\n" + " | ".join(r["method"] for r in tab),
                    fontsize=8)
    ax[1].set_ylabel("layer")
    ax[1].set_xlabel("head")
    fig.colorbar(im, ax=ax[1], shrink=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m experiments.cache_policy.heads",
                                description="per-head XAttention thresholds learned under a density budget")
    p.add_argument("--budgets", default="0.5,0.35", help="attention-density budgets (default %(default)s)")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--train-prompts", type=int, default=2)
    p.add_argument("--heldout-prompts", type=int, default=4)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--out", default="results/cache_policy")
    a = p.parse_args(argv)
    run_heads(Path(a.out), budgets=[float(v) for v in a.budgets.split(",")], steps=a.steps,
              train_prompts=a.train_prompts, heldout_prompts=a.heldout_prompts, iters=a.iters)


__all__ = ["heads_xattention", "HardRunner", "bisect_density", "LearnedHeads", "learn_heads", "ebc_table",
           "run_heads", "heads_markdown", "main"]
