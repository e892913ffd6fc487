"""Reproduce, in kind, the sparse-attention tables on the embedded text-to-video model (XAttention, SVG2, HASTE).

    python -m experiments.sparse_table                               # the full setting (see --help)
    python -m experiments.sparse_table --prompts 2 --steps 20 --thresholds 0.9 --cal-prompts 2 --out /tmp/s

For each base method (XAttention, SVG2) and each shared threshold of the sweep it samples the held-out
prompts with four variants -- the baseline, + TMR, + EBC (per-head thresholds solved at the baseline's
calibration density), + both (HASTE) -- plus the dense run, all from the same noise (UniPC, CFG 5, one
prompt per call as the reference code requires batch 1). It reports density (from the transform's own
counters), PSNR / SSIM of the decoded videos against dense, prompt adherence, the reuse fraction, the
FLOP share of mask prediction, wall-clock ratios of the compiled runs (same process, after compilation),
and stage timings of one attention call per layer (mask prediction, TMR check, sparse attention, dense
attention) on q, k, v captured from the model. Writes `<out>/table.json`, `<out>/table.md`,
`<out>/fidelity_vs_density.png`, `<out>/prediction_share.png` (plots need matplotlib: `vidaccel[plots]`)
and the EBC tables `<out>/ebc_<base>.json`.

Sparse compute runs through `--backend` (`vidaccel.attention.BACKENDS`): "auto" is the Pallas kernels on
GPU and the plain-jnp gather path elsewhere (`pallas_kernels.gather_jnp`: each query tile attends to its
selected keys only, padded to a few static bucket widths). The result equals the kernels', and CPU
wall-clock then shows real work savings as well as the overheads of mask prediction and what TMR removes.
`--backend reference` (masked dense attention) shows only the overheads. EBC calibration always uses the
reference: its numbers are the same, and its cost is not part of the table.

Every run also includes the gather-path microbenchmark of `experiments.bench_kernels` (`attention_bench.json`
/ `.md`; `python -m experiments.bench_kernels --gather` runs it alone). The report's markdown and plots are
made by `experiments.sparse_report` (`--render` redraws them from a table.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench_kernels import attention_bench, write_bench
from experiments.harness import (
    CompiledRunner,
    interleaved_times,
    machine,
    median_times,
    plot_or_skip,
    video_fidelity,
    write_results,
)
from experiments.haste import EBCConfig, HasteConfig, TMRConfig, dense_trajectory, drift, haste, pool_blocks
from experiments.shapes_presets import (
    SHAPES_BASES,
    SHAPES_TMR,
    calibrate_shapes_ebc,
    shapes_base_policy,
    svg2_shapes,
    xattention_shapes,
)
from experiments.sparse_report import BACKEND_NOTE, VARIANTS, markdown, plot, timing_noise
from models.shapes import adherence, decode_latents, encode_prompts, sample_prompts
from models.shapes.pretrained import latent_noise, load_shapes_model, training_info
from models.wan.denoiser import wan_denoiser
from pallas_kernels.gather_jnp import gather_work
from vidaccel.attention import BACKENDS, AttentionInfo, dense_attention, resolve_backend
from vidaccel.checks import choice_arg, float_arg, int_arg
from vidaccel.metrics import relative_l2
from vidaccel.solvers import unipc
from vidaccel.sparse_attention import AttnContext, AttnSpec, sparse_attention, sparse_summary
from vidaccel.transforms import total_work


@dataclasses.dataclass(frozen=True)
class TableConfig:
    """The table's setting; `backend` is how sparse attention runs (one of `BACKENDS`, "auto" by default)."""

    prompts: int = 8
    steps: int = 50
    guidance: float = 5.0
    seed: int = 0
    thresholds: tuple[float, ...] = (0.6, 0.8, 0.9, 0.95)
    main_threshold: float = 0.9
    bases: tuple[str, ...] = SHAPES_BASES
    cal_prompts: int = 4
    cal_positions: tuple[float, ...] = (0.1, 0.4, 0.7)
    tmr: TMRConfig = SHAPES_TMR
    timing_reps: int = 20
    repeats: int = 2
    backend: str = "auto"
    bench_tokens: tuple[int, ...] = (512, 4096)

    def __post_init__(self):
        choice_arg("TableConfig.backend", self.backend, BACKENDS)
        for f in ("prompts", "steps", "cal_prompts", "timing_reps", "repeats"):
            int_arg(f"TableConfig.{f}", getattr(self, f), minimum=1)
        float_arg("TableConfig.guidance", self.guidance)
        for b in self.bases:
            choice_arg("TableConfig.bases", b, SHAPES_BASES)
        if self.main_threshold not in self.thresholds:
            raise ValueError(f"TableConfig.main_threshold={self.main_threshold} must be one of the thresholds "
                             f"{self.thresholds}")


def denoiser_for(model, base: str, tmr: TMRConfig | None, backend: str):
    """The base method's sparse-attention denoiser, with TMR when `tmr` is given (EBC tables come as inputs)."""
    policy = shapes_base_policy(base, backend=resolve_backend(backend))
    if tmr is not None:
        policy = haste(policy, HasteConfig(tmr=tmr))
    return sparse_attention(wan_denoiser(model), policy)


def fidelity(latents, dense_latents, prompts) -> dict:
    """PSNR / SSIM of the decoded videos against dense, relative L2 of the latents, prompt adherence."""
    videos = decode_latents(latents, uint8=True)
    fid = video_fidelity(videos, decode_latents(dense_latents, uint8=True))
    rel = relative_l2(jnp.asarray(latents), jnp.asarray(dense_latents))
    return {"psnr": fid["psnr"], "ssim": fid["ssim"], "rel_l2_latents": float(np.mean(np.asarray(rel))),
            "adherence": float(adherence(videos, prompts)["score"]),
            "psnr_per_prompt": np.round(fid["psnr_per_video"], 3).tolist()}


# ------------------------------------------------------------------------------------------ stage timings
def capture_qkv(model, x, t, ctx):
    """q, k, v (L, B, N, H, D) of every layer's self-attention at (x, t, ctx), from a dense forward."""

    @jax.jit
    def run(x, t, ctx):
        emb = model.embed(x, t, ctx)
        b, n, _ = emb.tokens.shape
        cfg = model.cfg
        z = jnp.zeros((cfg.num_layers, b, n, cfg.num_attention_heads, cfg.attention_head_dim), jnp.float32)

        def attn(q, k, v, info, _):
            return dense_attention(q, k, v, info)[0], (q, k, v)

        _, qkv = model.blocks(emb, attention=attn, layer_state=(z, z, z))
        return qkv

    return run(x, t, ctx)


def stage_timings(model, runner: CompiledRunner, cfg: TableConfig, threshold: float, log=print) -> dict:
    """Per attention call (one prompt, one CFG branch), averaged over layers: mask prediction, TMR check,
    sparse attention (`cfg.backend`) and dense attention, timed round-robin on captured q, k, v at a mid step."""
    ctx0 = runner.context[0]
    xs = dense_trajectory(model, runner.noise[0], ctx0, jnp.zeros_like(ctx0), runner.solver, cfg.guidance)
    s = cfg.steps // 2
    t = jnp.full((1,), runner.solver.timesteps[s], jnp.float32)
    q_all, k_all, v_all = capture_qkv(model, xs[s], t, ctx0)
    L, b, n, h, d = q_all.shape
    spec = AttnSpec(b, n, h, d, L, cfg.steps)
    info = AttentionInfo(jnp.zeros((b, n), jnp.int32), jnp.zeros((b, n), jnp.int32), jnp.int32(0))
    dense_fn = jax.jit(lambda q, k, v: dense_attention(q, k, v, info)[0])
    pool = cfg.tmr.pool_block
    check_fn = jax.jit(lambda q, k, qa, ka: drift(pool_blocks(q, pool), pool_blocks(k, pool), qa, ka, cfg.tmr.drift))
    out = {"step": s, "reps": cfg.timing_reps, "layers": L}
    for base in cfg.bases:
        policy = shapes_base_policy(base, threshold, resolve_backend(cfg.backend))
        predict = jax.jit(policy.predict)
        attend = jax.jit(policy.attend)
        state = policy.init(spec)
        rows = {"predict": [], "attend": [], "dense": [], "check": []}
        fractions = {"pairs": [], "gathered": []}
        for layer in range(L):
            q, k, v = q_all[layer], k_all[layer], v_all[layer]
            ctx = AttnContext(jnp.int32(s), jnp.int32(layer), jnp.full((h,), threshold, jnp.float32), spec)
            st = jax.tree.map(lambda x, layer=layer: x[layer], state)
            if base == "svg2":        # time the per-step (warm-started) k-means, not the one-off init
                st = predict(q, k, st, ctx)[1]
            plan = predict(q, k, st, ctx)[0]
            qa, ka = pool_blocks(q, pool), pool_blocks(k, pool)
            med = median_times(interleaved_times({
                "predict": lambda f=predict, q=q, k=k, st=st, ctx=ctx: f(q, k, st, ctx),
                "attend": lambda f=attend, q=q, k=k, v=v, plan=plan, ctx=ctx: f(q, k, v, plan, ctx),
                "dense": lambda q=q, k=k, v=v: dense_fn(q, k, v),
                "check": lambda q=q, k=k, qa=qa, ka=ka: check_fn(q, k, qa, ka)}, cfg.timing_reps, warmup=1))
            for key, value in med.items():
                rows[key].append(value)
            fractions["pairs"].append(float(jnp.sum(plan.pairs)) / (b * h * n * n))
            fractions["gathered"].append(gathered_fraction(base, plan, n))
        ms = {key: round(1e3 * float(np.mean(vals)), 4) for key, vals in rows.items()}
        ms["prediction_share"] = round(ms["predict"] / (ms["predict"] + ms["attend"]), 4)
        ms.update({f"{key}_fraction": round(float(np.mean(vals)), 4) for key, vals in fractions.items()})
        out[base] = ms
        log(f"  stage timings {base}: {ms}")
    return out


def gathered_fraction(base: str, plan, n: int) -> float:
    """Query-key pairs the gather path computes for `plan` (padding to its bucket widths and, for SVG2, whole
    query tiles included), as a fraction of dense attention's, from `gather_jnp.gather_work`."""
    if base == "xattention":
        b, h = plan.counts.shape[:2]
        bs = xattention_shapes().block_size
        units = gather_work(plan.counts, plan.indices.shape[-1], row_len=bs, unit=bs)
        return float(units) * bs * bs / (b * h * n * n)
    b, h = plan.q_ranges.shape[:2]
    bq = svg2_shapes().block_q
    cnt = jnp.where(plan.q_ranges[..., 1] > 0, plan.kv_ranges[..., 1].sum(-1), 0)
    return float(gather_work(cnt, n, row_len=bq)) * bq / (b * h * n * n)


# ------------------------------------------------------------------------------------------ the table
def sweep_rows(model, runner: CompiledRunner, cfg: TableConfig, base: str, table, dense_latents, prompts,
               log=print) -> list[dict]:
    """The four variants of `base` at every threshold of the sweep, with EBC thresholds from `table`."""
    L, H = model.cfg.num_layers, model.cfg.num_attention_heads
    cands = list(table.candidates)
    rows = []
    for thr in cfg.thresholds:
        if thr not in cands:
            raise ValueError(f"sweep threshold {thr} is not an EBC candidate {cands}")
        budget = float(table.densities[..., cands.index(thr)].mean())
        solved = table.resolve(budget)
        for variant in VARIANTS:
            tmr = cfg.tmr if variant in ("tmr", "haste") else None
            thresholds = solved.thresholds if variant in ("ebc", "haste") else np.full((L, H), thr, np.float32)
            den = denoiser_for(model, base, tmr, cfg.backend)
            res = runner.run(f"{base}/{tmr is not None}", den, thresholds)
            summ = sparse_summary(res.state)
            fid = fidelity(res.latents, dense_latents, prompts)
            row = {"base": base, "variant": variant, "threshold": thr, "job": res.job,
                   "compile_seconds": res.compile_seconds, **fid, **summ}
            if variant in ("ebc", "haste"):
                row["ebc_budget"] = budget
                row["ebc_thresholds"] = np.asarray(solved.thresholds).round(4).tolist()
                row["ebc_predicted"] = solved.predicted()["table"]
            rows.append(row)
            log(f"  {base} {variant:5s} tau={thr}: density {summ['density_sparse']:.3f}, PSNR {fid['psnr']:.2f}, "
                f"SSIM {fid['ssim']:.4f}, adherence {fid['adherence']:.3f}, reuse {summ['reuse_fraction']:.2f}, "
                f"first run {res.seconds:.1f}s")
    return rows


def add_timings(rows: list[dict], times: list[list[float]], stages: dict) -> None:
    """Wall-clock figures of every row: the minimum of its runs, ratios to dense and to its baseline, and the
    attention time per sparse call from the stage timings and the reuse ((1 - reuse) x prediction + check +
    attention)."""
    for r in rows:
        r["seconds_all"] = [round(t, 4) for t in times[r.pop("job")]]
        r["seconds"] = min(r["seconds_all"])
    for r in rows:
        r["speed_vs_dense"] = rows[0]["seconds"] / r["seconds"]
        if r["base"] == "dense":
            continue
        b = next(x for x in rows if x["base"] == r["base"] and x["threshold"] == r["threshold"]
                 and x["variant"] == "base")
        r["speed_vs_base"] = b["seconds"] / r["seconds"]
        st = stages[r["base"]]
        pred = (1.0 - r["reuse_fraction"]) * st["predict"] + (st["check"] if r["variant"] in ("tmr", "haste") else 0.0)
        r["attention_time_vs_dense"] = (pred + st["attend"]) / st["dense"]
        r["prediction_time_share"] = pred / (pred + st["attend"])


def heldout_dense_run(cfg, log=print):
    """The t2v model, `cfg.prompts` held-out prompts, a compiled runner for them (UniPC `cfg.steps`, CFG
    `cfg.guidance`) and its dense run: what every sparse-attention command compares against."""
    model = load_shapes_model("t2v")
    prompts = sample_prompts(cfg.prompts, cfg.seed, "heldout")
    runner = CompiledRunner(latent_noise(len(prompts), cfg.seed), encode_prompts(prompts), solver=unipc(cfg.steps),
                            guidance=cfg.guidance)
    log(f"[dense] {cfg.prompts} held-out prompts, UniPC {cfg.steps}, CFG {cfg.guidance}")
    return model, prompts, runner, runner.run("dense", wan_denoiser(model))


def run_table(cfg: TableConfig, out_dir: Path, log=print) -> dict:
    """Run the whole table and write its files to `out_dir`; returns the report."""
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    model, prompts, runner, dense = heldout_dense_run(cfg, log)
    rows = [{"base": "dense", "variant": "dense", "threshold": None, "job": dense.job,
             "compile_seconds": dense.compile_seconds,
             "adherence": fidelity(dense.latents, dense.latents, prompts)["adherence"],
             "model_calls": total_work(dense.state)["calls"]}]
    for base in cfg.bases:
        log(f"[{base}] EBC calibration: {cfg.cal_prompts} train prompts, positions {cfg.cal_positions}")
        ebc_cfg = EBCConfig(positions=cfg.cal_positions, guidance=cfg.guidance, reference_threshold=cfg.main_threshold)
        table = calibrate_shapes_ebc(base, prompts=cfg.cal_prompts, steps=cfg.steps, cfg=ebc_cfg, model=model, log=log)
        table.save(out_dir / f"ebc_{base}.json")
        rows += sweep_rows(model, runner, cfg, base, table, dense.latents, prompts, log)
    log(f"[timing] {cfg.repeats - 1} more interleaved rounds over the {len(rows)} compiled runs")
    times = runner.retime(cfg.repeats - 1)
    log("[stage timings]")
    stages = stage_timings(model, runner, cfg, cfg.main_threshold, log)
    add_timings(rows, times, stages)
    log("[attention microbenchmark]")
    bench = attention_bench(cfg.bench_tokens, reps=cfg.timing_reps, log=log)
    write_bench(bench, out_dir)
    backend = resolve_backend(cfg.backend)
    result = {"config": {**dataclasses.asdict(cfg), "tmr": dataclasses.asdict(cfg.tmr)}, "prompts": prompts,
              "model": training_info("t2v"), "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"),
              "implementation": backend,
              "sparse_path": BACKEND_NOTE[backend] + "; the counters count the kernels' work",
              "rows": rows, "timing_noise": timing_noise(rows), "stage_timings_ms": stages, "attention_bench": bench,
              "total_seconds": round(time.perf_counter() - t_start, 1)}
    write_results(out_dir, "table", result, markdown(result))
    plot_or_skip(plot, result, out_dir, log=log)
    log(f"wrote {out_dir}/table.json, table.md, attention_bench.json/.md, fidelity_vs_density.png, "
        f"prediction_share.png ({result['total_seconds']}s)")
    return result


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x)


def main(argv: list[str] | None = None) -> None:
    d = TableConfig()
    p = argparse.ArgumentParser(prog="python -m experiments.sparse_table", description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=d.prompts, help="held-out prompts (default %(default)s)")
    p.add_argument("--steps", type=int, default=d.steps, help="UniPC steps (default %(default)s)")
    p.add_argument("--thresholds", default=",".join(map(str, d.thresholds)), help="shared-threshold sweep")
    p.add_argument("--main-threshold", type=float, default=d.main_threshold)
    p.add_argument("--bases", default=",".join(d.bases), help="xattention,svg2")
    p.add_argument("--cal-prompts", type=int, default=d.cal_prompts, help="EBC calibration prompts (train split)")
    p.add_argument("--cal-positions", default=",".join(map(str, d.cal_positions)))
    p.add_argument("--epsilon", type=float, default=d.tmr.epsilon, help="TMR drift threshold")
    p.add_argument("--max-interval", type=int, default=d.tmr.max_interval, help="TMR R_max")
    p.add_argument("--timing-reps", type=int, default=d.timing_reps, help="runs per stage timing (median)")
    p.add_argument("--repeats", type=int, default=d.repeats, help="timed runs per method (minimum reported)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--backend", choices=BACKENDS, default=d.backend,
                   help="how sparse attention runs (default %(default)s: kernel on GPU, gather elsewhere)")
    p.add_argument("--bench-tokens", default=",".join(map(str, d.bench_tokens)),
                   help="token counts of the gather-path microbenchmark")
    p.add_argument("--out", default="results/sparse")
    p.add_argument("--render", default=None, metavar="TABLE_JSON",
                   help="only re-render table.md and the plots next to an existing table.json")
    a = p.parse_args(argv)
    if a.render:
        path = Path(a.render)
        res = json.loads(path.read_text())
        res["timing_noise"] = timing_noise(res["rows"])
        (path.parent / "table.md").write_text(markdown(res))
        plot(res, path.parent)
        return
    thresholds = _floats(a.thresholds)
    if not thresholds:
        p.error("--thresholds needs at least one value")
    try:
        cfg = TableConfig(prompts=a.prompts, steps=a.steps, seed=a.seed, thresholds=thresholds,
                          main_threshold=a.main_threshold if a.main_threshold in thresholds else thresholds[-1],
                          bases=tuple(b for b in a.bases.split(",") if b), cal_prompts=a.cal_prompts,
                          cal_positions=_floats(a.cal_positions),
                          tmr=dataclasses.replace(d.tmr, epsilon=a.epsilon, max_interval=a.max_interval),
                          timing_reps=a.timing_reps, repeats=a.repeats, backend=a.backend,
                          bench_tokens=tuple(int(x) for x in a.bench_tokens.split(",") if x))
    except (ValueError, TypeError) as err:
        p.error(str(err))
    run_table(cfg, Path(a.out))


if __name__ == "__main__":
    main()
