"""HASTE at equal quality on the embedded text-to-video model: how much attention work does HASTE need to match
its baseline's fidelity?

    python -m experiments.haste_isoquality                                  # the full setting (see --help)
    python -m experiments.haste_isoquality --prompts 1 --steps 4 --fractions 0.6,1.0 --out /tmp/iso

`experiments.sparse_table` compares HASTE with its baseline at equal density, where only mask reuse can save
time. This command asks the paper's question instead: speed at matched quality. For each base method
(XAttention, SVG2) and each shared threshold tau it samples the held-out prompts with the baseline (PSNR
against dense, density, attention FLOPs). HASTE (EBC thresholds + TMR, per-layer and per-head TMR) then runs
under a sweep of EBC density budgets at and below the baselines' calibration densities. The HASTE curve does
not depend on tau (tau only sets the target), so one grid per base serves every tau: `fractions` x the
densest tau's calibration density, plus each tau's own calibration density (the equal-density point of
sparse_table). For each tau only the budgets at or below that tau's calibration density count. Over them,
sorted by measured density, the first crossing of the baseline's PSNR gives the matched density and attention
FLOPs by linear interpolation (`matched_point`). The ideal speed-up at matched quality is baseline / HASTE
attention FLOPs. The wall-clock ratio is interpolated between the same runs, whose times are the minimum of
`repeats` rounds timed round-robin (`CompiledRunner.retime`, i.e. `harness.interleaved_times`).

EBC thresholds come from the packaged measurements (`experiments.shapes_presets.ebc_file`: 4 training
prompts, UniPC 50, CFG 5, positions 10/40/70%), re-solved for each budget (`EBCTable.resolve`); nothing is
recalibrated. Attention FLOPs are `vidaccel.sparse_attention.sparse_summary`'s: computed pairs plus mask
prediction plus TMR checks, dense warm-up included, relative to dense attention. Writes
`<out>/isoquality.json`, `<out>/isoquality.md` and `<out>/isoquality.png` (matplotlib: `vidaccel[plots]`).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from experiments.harness import machine, markdown_table, plot_or_skip, pyplot, write_results
from experiments.haste import TMRConfig, head_reuse_counts, load_ebc_table
from experiments.shapes_presets import SHAPES_BASES, SHAPES_TMR, ebc_file
from experiments.sparse_report import BACKEND_NOTE, BASE_LABEL, timing_noise
from experiments.sparse_table import denoiser_for, fidelity, heldout_dense_run
from models.shapes.pretrained import training_info
from vidaccel.attention import BACKENDS, resolve_backend
from vidaccel.checks import choice_arg, float_arg, int_arg
from vidaccel.sparse_attention import sparse_summary

GRANULARITY_LABEL = {"layer": "HASTE (per-layer TMR)", "head": "HASTE (per-head TMR)"}


@dataclasses.dataclass(frozen=True)
class IsoConfig:
    """The iso-quality setting. `taus`: the baselines' shared thresholds (each an EBC candidate, in (0, 1]);
    `fractions`: budget fractions of the densest tau's calibration density (in (0, 1], distinct);
    `granularities`: the TMR variants ("layer", "head"); `ebc_dir`: where the EBC tables are (None = the
    packaged ones)."""

    prompts: int = 4
    steps: int = 50
    guidance: float = 5.0
    seed: int = 0
    taus: tuple[float, ...] = (0.8, 0.9, 0.95)
    fractions: tuple[float, ...] = (0.4, 0.52, 0.64, 0.76, 0.88, 1.0)
    bases: tuple[str, ...] = SHAPES_BASES
    granularities: tuple[str, ...] = ("layer", "head")
    tmr: TMRConfig = SHAPES_TMR
    repeats: int = 2
    backend: str = "auto"
    ebc_dir: str | None = None

    def __post_init__(self):
        for f in ("prompts", "steps", "repeats"):
            int_arg(f"IsoConfig.{f}", getattr(self, f), minimum=1)
        float_arg("IsoConfig.guidance", self.guidance)
        choice_arg("IsoConfig.backend", self.backend, BACKENDS)
        if not self.bases:
            raise ValueError("IsoConfig.bases is empty: give xattention and/or svg2")
        for b in self.bases:
            choice_arg("IsoConfig.bases", b, SHAPES_BASES)
        if not self.granularities:
            raise ValueError("IsoConfig.granularities is empty: give layer and/or head")
        for g in self.granularities:
            choice_arg("IsoConfig.granularities", g, ("layer", "head"))
        for name, vals in (("taus", self.taus), ("fractions", self.fractions)):
            vals = tuple(float_arg(f"IsoConfig.{name}", v) for v in vals)
            if not vals or any(not 0 < v <= 1 for v in vals) or len(set(vals)) != len(vals):
                raise ValueError(f"IsoConfig.{name}={vals!r} is invalid: distinct numbers in (0, 1]")
            object.__setattr__(self, name, vals)


# ------------------------------------------------------------------------------------------ the matched point
def matched_point(points: Sequence[dict], target: float, *, key: str = "psnr", x: str = "density",
                  carry: Sequence[str] = ("attention_flops_ratio", "seconds")) -> dict:
    """Where a sweep first reaches `target` on `key`, with `x` and the `carry` values linearly interpolated.

    The points are sorted by `x` (density). The first point with `key` >= target gives the match: at the
    first point itself the result is that point (`at_first_point`: the sweep does not show how much lower it
    could go); otherwise the value is interpolated between it and the point before. `reached` is False when
    no point reaches the target. Missing `carry` values stay None.
    """
    pts = sorted(points, key=lambda p: p[x])
    for i, p in enumerate(pts):
        if p[key] >= target:
            if i == 0:
                w, a = 1.0, p
            else:
                a = pts[i - 1]
                w = (target - a[key]) / (p[key] - a[key])
            out = {"reached": True, "at_first_point": i == 0, x: a[x] + w * (p[x] - a[x]), "between": [a[x], p[x]]}
            for c in carry:
                out[c] = None if p.get(c) is None or a.get(c) is None else a[c] + w * (p[c] - a[c])
            return out
    return {"reached": False, "at_first_point": False, x: None, "between": None, **dict.fromkeys(carry)}


def budget_grid(cal_density: dict[float, float], fractions: Sequence[float], floor: float) -> list[float]:
    """EBC budgets of one base: `fractions` x the densest tau's calibration density plus each tau's own, raised
    to the least achievable budget `floor` and deduplicated (equal to 1e-4; each tau's own value is kept
    exactly, so that it counts for that tau), ascending."""
    top = max(cal_density.values())
    grid = {}
    for b in [f * top for f in fractions] + list(cal_density.values()):   # a tau's own value wins a tie
        b = max(float(b), floor)
        grid[round(b, 4)] = b
    return sorted(grid.values())


# ------------------------------------------------------------------------------------------ the experiment
def _row(res, fid: dict, **extra) -> dict:
    s = sparse_summary(res.state)
    row = {**extra, "job": res.job, "psnr": fid["psnr"], "ssim": fid["ssim"], "adherence": fid["adherence"],
           "density": s["density_sparse"], "attention_flops_ratio": s["attention_flops_ratio"],
           "prediction_flops_share": s["prediction_flops_share"], "reuse_fraction": s["reuse_fraction"],
           "compile_seconds": res.compile_seconds}
    if extra.get("granularity") is not None:
        row.update(head_reuse_counts(res.state))
    return row


def compare(rows: list[dict], cfg: IsoConfig, noise: float) -> list[dict]:
    """Per (base, tau, granularity): the baseline's point and HASTE's matched point (over the budgets at or
    below the tau's calibration density), the FLOP and wall-clock ratios baseline / HASTE."""
    out = []
    for base in cfg.bases:
        for tau in cfg.taus:
            b = next(r for r in rows if r["base"] == base and r["variant"] == "baseline" and r["tau"] == tau)
            for g in cfg.granularities:
                sweep = [r for r in rows if r["base"] == base and r.get("granularity") == g
                         and r["budget"] <= b["cal_density"] + 1e-9]
                m = matched_point(sweep, b["psnr"])
                c = {"base": base, "tau": tau, "granularity": g, "baseline_psnr": b["psnr"],
                     "baseline_density": b["density"], "baseline_flops": b["attention_flops_ratio"],
                     "baseline_seconds": b["seconds"], "points": len(sweep), **{f"matched_{k}": v for k, v in
                                                                                 m.items()}}
                if m["reached"]:
                    c["flops_ratio"] = b["attention_flops_ratio"] / m["attention_flops_ratio"]
                    c["time_ratio"] = b["seconds"] / m["seconds"]
                    c["fewer_flops"] = c["flops_ratio"] > 1.0
                    c["faster_beyond_noise"] = c["time_ratio"] > 1.0 + noise
                else:
                    c.update(flops_ratio=None, time_ratio=None, fewer_flops=False, faster_beyond_noise=False)
                out.append(c)
    return out


def run_isoquality(cfg: IsoConfig, out_dir: Path, log=print) -> dict:
    """Run the whole comparison and write isoquality.{json,md,png} to `out_dir`; returns the report."""
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    model, prompts, runner, dense = heldout_dense_run(cfg, log)
    rows = [{"base": "dense", "variant": "dense", "tau": None, "job": dense.job}]
    L, H = model.cfg.num_layers, model.cfg.num_attention_heads
    grids = {}
    for base in cfg.bases:
        path = ebc_file(base) if cfg.ebc_dir is None else Path(cfg.ebc_dir) / f"ebc_{base}.json"
        table = load_ebc_table(path)
        cands = list(table.candidates)
        missing = [t for t in cfg.taus if t not in cands]
        if missing:
            raise ValueError(f"taus {missing} are not candidates of the EBC table {path} ({cands})")
        cal = {t: float(table.densities[..., cands.index(t)].mean()) for t in cfg.taus}
        floor = float(table.densities.min(-1).mean())
        grids[base] = budget_grid(cal, cfg.fractions, floor)
        log(f"[{base}] EBC table {path}; calibration densities {cal}; budgets {np.round(grids[base], 4).tolist()}")
        baseline = denoiser_for(model, base, None, cfg.backend)
        for tau in cfg.taus:
            res = runner.run(f"{base}/baseline", baseline, np.full((L, H), tau, np.float32))
            rows.append(_row(res, fidelity(res.latents, dense.latents, prompts), base=base, variant="baseline",
                             tau=tau, cal_density=cal[tau], granularity=None))
            r = rows[-1]
            log(f"  {base} baseline tau={tau}: density {r['density']:.3f}, PSNR {r['psnr']:.2f}, "
                f"FLOPs {r['attention_flops_ratio']:.3f}")
        for g in cfg.granularities:
            den = denoiser_for(model, base, dataclasses.replace(cfg.tmr, granularity=g), cfg.backend)
            for budget in grids[base]:
                solved = table.resolve(budget)
                res = runner.run(f"{base}/haste-{g}", den, solved.thresholds)
                rows.append(_row(res, fidelity(res.latents, dense.latents, prompts), base=base, variant="haste",
                                 tau=None, granularity=g, budget=budget,
                                 predicted_density=solved.predicted()["table"]["density"]))
                r = rows[-1]
                log(f"  {base} HASTE/{g} budget {budget:.4f}: density {r['density']:.3f}, PSNR {r['psnr']:.2f}, "
                    f"FLOPs {r['attention_flops_ratio']:.3f}, reuse (heads) {r['head_reuse_fraction']:.2f}, "
                    f"first run {res.seconds:.1f}s")
    log(f"[timing] {cfg.repeats - 1} more interleaved rounds over the {len(rows)} compiled runs")
    times = runner.retime(cfg.repeats - 1)
    for r in rows:
        r["seconds_all"] = [round(t, 4) for t in times[r.pop("job")]]
        r["seconds"] = min(r["seconds_all"])
    noise = timing_noise(rows)
    backend = resolve_backend(cfg.backend)
    result = {"config": {**dataclasses.asdict(cfg), "tmr": dataclasses.asdict(cfg.tmr)}, "prompts": prompts,
              "model": training_info("t2v"), "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"),
              "implementation": backend, "sparse_path": BACKEND_NOTE[backend], "budgets": grids, "rows": rows,
              "timing_noise": noise, "comparison": compare(rows, cfg, noise),
              "total_seconds": round(time.perf_counter() - t_start, 1)}
    write_results(out_dir, "isoquality", result, markdown(result))
    plot_or_skip(plot, result, out_dir, log=log)
    log(f"wrote {out_dir}/isoquality.json, isoquality.md, isoquality.png ({result['total_seconds']}s)")
    return result


# ------------------------------------------------------------------------------------------ report
def _num(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _matched(c: dict) -> str:
    if not c["matched_reached"]:
        return "not reached"
    note = " (at the sparsest budget: may go lower)" if c["matched_at_first_point"] else ""
    return f"{c['matched_density']:.3f}{note}"


def _verdict(c: dict) -> str:
    if not c["matched_reached"]:
        return "no: PSNR not reached at or below the baseline's density"
    if not c["fewer_flops"]:
        return "no: no fewer FLOPs"
    return "yes" if c["faster_beyond_noise"] else "fewer FLOPs; not faster beyond noise"


def markdown(res: dict) -> str:
    """`isoquality.md` from the result dict of `run_isoquality`."""
    cfg, rows = res["config"], res["rows"]
    dense = rows[0]
    cols = {"base": lambda c: BASE_LABEL[c["base"]], "tau": "tau", "TMR": "granularity",
            "baseline PSNR": lambda c: f"{c['baseline_psnr']:.2f}",
            "baseline density": lambda c: f"{c['baseline_density']:.3f}",
            "baseline attn FLOPs": lambda c: f"{c['baseline_flops']:.3f}",
            "HASTE density at matched PSNR": _matched,
            "HASTE attn FLOPs at matched PSNR": lambda c: _num(c["matched_attention_flops_ratio"], ".3f"),
            "FLOPs base / HASTE": lambda c: _num(c["flops_ratio"], ".2f") + ("x" if c["flops_ratio"] else ""),
            "time base / HASTE": lambda c: _num(c["time_ratio"], ".2f") + ("x" if c["time_ratio"] else ""),
            "budgets": "points", "faster at matched quality": _verdict}
    sweep = {"base": lambda r: BASE_LABEL[r["base"]], "TMR": "granularity", "budget": lambda r: f"{r['budget']:.4f}",
             "density": lambda r: f"{r['density']:.3f}", "PSNR": lambda r: f"{r['psnr']:.2f}",
             "SSIM": lambda r: f"{r['ssim']:.4f}", "attn FLOPs": lambda r: f"{r['attention_flops_ratio']:.3f}",
             "prediction share": lambda r: f"{100 * r['prediction_flops_share']:.1f}%",
             "masks reused (heads)": lambda r: f"{100 * r['head_reuse_fraction']:.0f}%",
             "calls w/o prediction": lambda r: f"{100 * r['reuse_fraction']:.0f}%",
             "seconds": lambda r: f"{r['seconds']:.2f}"}
    base_cols = {"base": lambda r: BASE_LABEL[r["base"]], "tau": "tau", "density": lambda r: f"{r['density']:.3f}",
                 "PSNR": lambda r: f"{r['psnr']:.2f}", "SSIM": lambda r: f"{r['ssim']:.4f}",
                 "attn FLOPs": lambda r: f"{r['attention_flops_ratio']:.3f}",
                 "prediction share": lambda r: f"{100 * r['prediction_flops_share']:.1f}%",
                 "seconds": lambda r: f"{r['seconds']:.2f}"}
    lines = ["# HASTE at equal quality on the embedded text-to-video model", "",
             f"{len(res['prompts'])} held-out prompts, UniPC {cfg['steps']} steps, CFG {cfg['guidance']}, seed "
             f"{cfg['seed']}, one prompt per call; model checkpoint: {res['model'].get('steps')} training steps. "
             f"{res['machine']}, {res['date']}. Sparse path: {res['sparse_path']}. TMR: epsilon "
             f"{cfg['tmr']['epsilon']}, R_max {cfg['tmr']['max_interval']}, pooling {cfg['tmr']['pool_block']}. "
             f"EBC: the packaged measurements re-solved per budget. Dense: {dense['seconds']:.2f} s for all "
             f"prompts. Total {res['total_seconds']:.0f} s.", "",
             "Attention FLOPs are relative to dense attention over all calls (dense warm-up, mask prediction and "
             "TMR checks included). Per-head TMR counts the prediction FLOPs of the heads that predicted only "
             "(a kernel that predicts selected heads); on CPU the jnp prediction runs for all heads when any "
             "needs it. Matched = the first crossing of the baseline's PSNR over the budgets at or below the "
             "tau's calibration density, sorted by measured density, linearly interpolated (density, FLOPs, "
             "seconds).",
             f"Timing noise: the largest spread of any run's repeated wall times is "
             f"{100 * res['timing_noise']:.1f}% ((max - min) / min over {cfg['repeats']} rounds); 'faster' needs "
             "a time ratio above 1 + that.", "",
             "## Matched quality", "", markdown_table(res["comparison"], cols, align="lrlrrrrrrrrl"), "",
             "## Baselines", "", markdown_table([r for r in rows if r["variant"] == "baseline"], base_cols), "",
             "## HASTE budget sweeps", "", markdown_table([r for r in rows if r["variant"] == "haste"], sweep,
                                                           align="llrrrrrrrrr")]
    return "\n".join(lines) + "\n"


def plot(res: dict, out_dir: Path) -> None:
    """`isoquality.png`: PSNR against attention FLOPs per base, baseline points and the HASTE curves, with the
    matched points."""
    plt = pyplot()
    cfg, rows = res["config"], res["rows"]
    fig, axes = plt.subplots(1, len(cfg["bases"]), figsize=(5.5 * len(cfg["bases"]), 4), squeeze=False)
    for ax, base in zip(axes[0], cfg["bases"], strict=True):
        for g, marker in zip(cfg["granularities"], "os", strict=False):
            pts = sorted((r["attention_flops_ratio"], r["psnr"]) for r in rows
                         if r["base"] == base and r.get("granularity") == g)
            ax.plot(*zip(*pts, strict=True), marker=marker, ms=4, label=GRANULARITY_LABEL[g])
        for r in rows:
            if r["base"] == base and r["variant"] == "baseline":
                ax.plot(r["attention_flops_ratio"], r["psnr"], "k^")
                ax.annotate(f"tau {r['tau']}", (r["attention_flops_ratio"], r["psnr"]), fontsize=7,
                            xytext=(4, -8), textcoords="offset points")
        for c in res["comparison"]:
            if c["base"] == base and c["matched_reached"]:
                ax.plot(c["matched_attention_flops_ratio"], c["baseline_psnr"], "x", color="C3")
        ax.plot([], [], "k^", label="baseline (shared tau)")
        ax.plot([], [], "x", color="C3", label="HASTE at the baseline's PSNR")
        ax.set(xlabel="attention FLOPs / dense (prediction included)", ylabel="PSNR vs dense (dB)",
               title=BASE_LABEL[base])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "isoquality.png", dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ CLI
def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def parse_config(argv: list[str] | None = None) -> tuple[IsoConfig, Path]:
    """The CLI's config and output folder (argparse errors, exit code 2, on invalid values)."""
    d = IsoConfig()
    p = argparse.ArgumentParser(prog="python -m experiments.haste_isoquality", description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=d.prompts, help="held-out prompts (default %(default)s)")
    p.add_argument("--steps", type=int, default=d.steps, help="UniPC steps (default %(default)s)")
    p.add_argument("--taus", default=",".join(map(str, d.taus)), help="the baselines' shared thresholds")
    p.add_argument("--fractions", default=",".join(map(str, d.fractions)),
                   help="EBC budgets as fractions of the densest tau's calibration density, in (0, 1]")
    p.add_argument("--bases", default=",".join(d.bases), help="xattention,svg2")
    p.add_argument("--granularities", default=",".join(d.granularities), help="TMR variants: layer,head")
    p.add_argument("--repeats", type=int, default=d.repeats, help="timed rounds per run (minimum reported)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--backend", choices=BACKENDS, default=d.backend)
    p.add_argument("--ebc-dir", default=None, help="folder with ebc_<base>.json (default: the packaged tables)")
    p.add_argument("--out", default="results/sparse")
    a = p.parse_args(argv)
    try:
        cfg = IsoConfig(prompts=a.prompts, steps=a.steps, seed=a.seed, taus=_floats(a.taus),
                        fractions=_floats(a.fractions), bases=tuple(b for b in a.bases.split(",") if b),
                        granularities=tuple(g for g in a.granularities.split(",") if g), repeats=a.repeats,
                        backend=a.backend, ebc_dir=a.ebc_dir)
    except (ValueError, TypeError) as err:
        p.error(str(err))
    if cfg.ebc_dir is None:              # the packaged tables' grid (a given --ebc-dir is checked when loaded)
        for base in cfg.bases:
            cands = load_ebc_table(ebc_file(base)).candidates
            bad = [t for t in cfg.taus if t not in cands]
            if bad:
                p.error(f"--taus {bad} are not thresholds of the EBC table {ebc_file(base).name}: {cands}")
    return cfg, Path(a.out)


def main(argv: list[str] | None = None) -> None:
    cfg, out = parse_config(argv)
    run_isoquality(cfg, out)


if __name__ == "__main__":
    main()
