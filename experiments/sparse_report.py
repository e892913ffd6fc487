"""The sparse-attention table's report: markdown, plots and the HASTE claim check, from its result dict.

`experiments.sparse_table` runs the experiment and writes `table.json`; the functions here turn that dict
into `table.md` and the two figures (`python -m experiments.sparse_table --render table.json` redraws them).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from experiments.bench_kernels import bench_markdown
from experiments.harness import markdown_table, pyplot

VARIANTS = ("base", "tmr", "ebc", "haste")
VARIANT_LABEL = {"base": "baseline", "tmr": "+ TMR", "ebc": "+ EBC", "haste": "+ TMR + EBC (HASTE)"}
BASE_LABEL = {"xattention": "XAttention", "svg2": "SVG2"}
BACKEND_NOTE = {"gather": "plain-jnp gather path (selected keys only, padded to static bucket widths; same result as "
                          "the kernels), so CPU times include the real sparse-attention savings",
                "reference": "jnp reference (masked dense attention; same result as the kernels, dense cost), so CPU "
                             "times show only the overheads of prediction and TMR",
                "kernel": "Pallas kernels (compiled on GPU, interpret mode elsewhere)"}


def timing_noise(rows: list[dict]) -> float:
    """The largest relative spread (max - min) / min of any run's repeated wall times: a conservative noise
    level for the time ratios (0 with a single repeat)."""
    return max((max(r["seconds_all"]) - min(r["seconds_all"])) / min(r["seconds_all"]) for r in rows)


def _baseline_of(rows: list[dict], r: dict) -> dict:
    return next(x for x in rows if x["base"] == r["base"] and x["threshold"] == r["threshold"]
                and x["variant"] == "base")


def claim_check(rows: list[dict], noise: float = 0.0) -> list[dict]:
    """HASTE vs its baseline at each threshold: density, PSNR, time; holds = at least as faithful (PSNR and
    SSIM), density within +2% of the baseline's, and faster by more than the timing noise (`timing_noise`)."""
    out = []
    for r in rows:
        if r["variant"] != "haste":
            continue
        b = _baseline_of(rows, r)
        faithful = r["psnr"] >= b["psnr"] and r["ssim"] >= b["ssim"]
        equal_density = r["density_sparse"] <= b["density_sparse"] * 1.02
        faster = b["seconds"] / r["seconds"] > 1.0 + noise
        out.append({"base": r["base"], "threshold": r["threshold"], "density_base": b["density_sparse"],
                    "density_haste": r["density_sparse"], "psnr_base": b["psnr"], "psnr_haste": r["psnr"],
                    "ssim_base": b["ssim"], "ssim_haste": r["ssim"], "time_ratio": b["seconds"] / r["seconds"],
                    "faithful": faithful, "equal_density": equal_density, "faster": faster,
                    "holds": bool(faithful and equal_density and faster)})
    return out


def _method(r: dict) -> str:
    return f"{BASE_LABEL[r['base']]} {VARIANT_LABEL[r['variant']]}"


def _verdict(c: dict) -> str:
    if c["holds"]:
        return "yes"
    why = [w for w, ok in (("less faithful", c["faithful"]), ("denser", c["equal_density"]),
                           ("not faster beyond noise", c["faster"])) if not ok]
    return "no: " + ", ".join(why)


def _main_rows(res: dict) -> list[str]:
    cfg, rows = res["config"], res["rows"]
    dense = rows[0]
    main = [r for r in rows[1:] if r["threshold"] == cfg["main_threshold"]]
    cols = {"method": _method, "density (sparse steps)": lambda r: f"{r['density_sparse']:.3f}",
            "density (all)": lambda r: f"{r['density_overall']:.3f}", "PSNR": lambda r: f"{r['psnr']:.2f}",
            "SSIM": lambda r: f"{r['ssim']:.4f}", "adherence": lambda r: f"{r['adherence']:.3f}",
            "masks reused": lambda r: f"{100 * r['reuse_fraction']:.0f}%",
            "prediction FLOP share": lambda r: f"{100 * r['prediction_flops_share']:.1f}%",
            "attention FLOPs vs dense": lambda r: f"{r['attention_flops_ratio']:.3f}",
            "attention time vs dense": lambda r: f"{r['attention_time_vs_dense']:.2f}x",
            "end-to-end vs dense": lambda r: f"{r['seconds'] / dense['seconds']:.2f}x",
            "end-to-end vs baseline": lambda r: f"{r['speed_vs_base']:.2f}x faster"}
    return [f"## Main rows (shared threshold {cfg['main_threshold']}; EBC at that threshold's calibration density)",
            "", markdown_table(main, cols), "",
            "Time ratios are wall-clock time / dense time (below 1 = faster) except the last column "
            "(baseline time / this time). Attention time per sparse call = (1 - reuse) x prediction + TMR check "
            "+ sparse attention, from the stage timings below."]


def _fraction(stage: dict, key: str) -> str:
    """A stage timing's work fraction (older results hold none)."""
    return f"{stage[key + '_fraction']:.3f}" if "gathered_fraction" in stage else "-"


def _stage_rows(res: dict) -> list[str]:
    cfg, rows, stages = res["config"], res["rows"], res["stage_timings_ms"]
    impl = res.get("implementation", "reference")
    cols = {"method": lambda b: BASE_LABEL[b], "mask prediction": lambda b: f"{stages[b]['predict']:.3f}",
            "TMR drift check": lambda b: f"{stages[b]['check']:.3f}",
            f"sparse attention ({impl})": lambda b: f"{stages[b]['attend']:.3f}",
            "dense attention": lambda b: f"{stages[b]['dense']:.3f}",
            "prediction share": lambda b: f"{100 * stages[b]['prediction_share']:.1f}%",
            "pairs selected / dense": lambda b: _fraction(stages[b], "pairs"),
            "pairs the gather path computes / dense": lambda b: _fraction(stages[b], "gathered")}
    lines = ["## Stage timings (ms per attention call, mean over layers, one prompt and branch, median of "
             f"{stages['reps']} runs, step {stages['step']})", "", markdown_table(cfg["bases"], cols), ""]
    for base in cfg["bases"]:
        st = stages[base]
        for r in rows:
            if r["base"] == base and r["variant"] == "tmr" and r["threshold"] == cfg["main_threshold"]:
                saved = r["reuse_fraction"] * st["predict"] - st["check"]
                lines.append(f"- {BASE_LABEL[base]}: mask prediction is {100 * st['prediction_share']:.1f}% of a "
                             f"sparse call's attention time; TMR skipped {100 * r['reuse_fraction']:.0f}% of the "
                             f"predictions, i.e. {r['reuse_fraction'] * st['predict']:.3f} of {st['predict']:.3f} ms "
                             f"per call, at a drift-check cost of {st['check']:.3f} ms (net {saved:+.3f} ms per call).")
    return lines


def markdown(res: dict) -> str:
    """`table.md` from the result dict of `experiments.sparse_table.run_table`."""
    cfg, rows = res["config"], res["rows"]
    dense = rows[0]
    noise = timing_noise(rows)
    claims = {"base": lambda c: BASE_LABEL[c["base"]], "threshold": "threshold",
              "density base / HASTE": lambda c: f"{c['density_base']:.3f} / {c['density_haste']:.3f}",
              "PSNR base / HASTE": lambda c: f"{c['psnr_base']:.2f} / {c['psnr_haste']:.2f}",
              "SSIM base / HASTE": lambda c: f"{c['ssim_base']:.4f} / {c['ssim_haste']:.4f}",
              "time base / HASTE": lambda c: f"{c['time_ratio']:.2f}x", "claim holds": _verdict}
    runs = {"base": "base", "variant": "variant", "threshold": "threshold",
            "density": lambda r: f"{r['density_sparse']:.3f}", "PSNR": lambda r: f"{r['psnr']:.2f}",
            "SSIM": lambda r: f"{r['ssim']:.4f}", "adherence": lambda r: f"{r['adherence']:.3f}",
            "reuse": lambda r: f"{100 * r['reuse_fraction']:.0f}%", "seconds": lambda r: f"{r['seconds']:.2f}"}
    lines = ["# Sparse attention on the embedded text-to-video model", "",
             f"{len(res['prompts'])} held-out prompts, UniPC {cfg['steps']} steps, CFG {cfg['guidance']}, seed "
             f"{cfg['seed']}, one prompt per call; model checkpoint: {res['model'].get('steps')} training steps. "
             f"{res['machine']}, {res['date']}. Sparse path: {res['sparse_path']}. Wall-clock: the minimum of "
             f"{cfg['repeats']} compiled runs per method, interleaved round by round.",
             f"Dense: {dense['seconds']:.2f} s for all prompts, adherence {dense['adherence']:.3f}.", "",
             *_main_rows(res), "", *_stage_rows(res),
             "", "## HASTE vs its baseline over the sweep", "",
             f"Timing noise: the largest spread of any run's repeated wall times is {100 * noise:.1f}% "
             "((max - min) / min); 'faster' needs a time ratio above 1 + that.", "",
             markdown_table(claim_check(rows, noise), claims, align="lrrrrrl"),
             "", "## All runs", "", markdown_table(rows[1:], runs, align="llrrrrrrr")]
    if "attention_bench" in res:
        lines += ["", bench_markdown(res["attention_bench"], level="##")]
    return "\n".join(lines) + "\n"


def plot(res: dict, out_dir: Path) -> None:
    """`fidelity_vs_density.png` (PSNR, SSIM, adherence against density per variant) and `prediction_share.png`
    (attention time per sparse call, split into prediction and attention) in `out_dir`."""
    plt = pyplot()
    rows, cfg = res["rows"], res["config"]
    metrics = (("psnr", "PSNR vs dense (dB)"), ("ssim", "SSIM vs dense"), ("adherence", "prompt adherence"))
    fig, axes = plt.subplots(len(metrics), len(cfg["bases"]), figsize=(5 * len(cfg["bases"]), 3.2 * len(metrics)),
                             squeeze=False)
    for j, base in enumerate(cfg["bases"]):
        for i, (key, label) in enumerate(metrics):
            ax = axes[i, j]
            for variant, marker in zip(VARIANTS, "osD^", strict=True):
                pts = sorted((r["density_sparse"], r[key]) for r in rows
                             if r["base"] == base and r["variant"] == variant)
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker=marker, label=VARIANT_LABEL[variant])
            if key == "adherence":
                ax.axhline(rows[0]["adherence"], color="k", ls="--", lw=0.8, label="dense")
            ax.set(xlabel="density (sparse steps)", ylabel=label, title=BASE_LABEL[base])
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "fidelity_vs_density.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.2))
    main = [r for r in rows[1:] if r["threshold"] == cfg["main_threshold"]]
    pred = [r["prediction_time_share"] * r["attention_time_vs_dense"] for r in main]
    attn = [(1 - r["prediction_time_share"]) * r["attention_time_vs_dense"] for r in main]
    x = np.arange(len(main))
    ax.bar(x, attn, label=f"sparse attention ({res.get('implementation', 'reference')})")
    ax.bar(x, pred, bottom=attn, label="mask prediction + TMR check")
    ax.axhline(1.0, color="k", ls="--", lw=0.8, label="dense attention")
    ax.set_xticks(x, [f"{BASE_LABEL[r['base']]}\n{r['variant']}" for r in main], fontsize=7)
    ax.set_ylabel("attention time / dense (CPU)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "prediction_share.png", dpi=110)
    plt.close(fig)
