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
`<out>/fidelity_vs_density.png`, `<out>/prediction_share.png` and the EBC tables `<out>/ebc_<base>.json`.

Sparse compute runs through `--implementation`: by default the Pallas kernels on GPU and the plain-jnp gather
path elsewhere (`pallas_kernels.gather_jnp`: each query tile attends to its selected keys only, padded to
a few static bucket widths). The result equals the kernels', and CPU wall-clock then shows real work
savings as well as the overheads of mask prediction and what TMR removes. `--implementation reference`
(masked dense attention) shows only the overheads. EBC calibration always uses the reference: its
numbers are the same, and its cost is not part of the table.

Every run also writes an attention microbenchmark (`attention_bench.json` / `.md`): one attention call of
dense XLA attention against the gather path (and the jnp reference at small sizes), at densities 1, 0.5 and
0.25, at the shapes model's size (512 tokens, 4 heads x 32, XAttention block 16, SVG2 tiles 32) and at a
larger synthetic size. `--bench-only` runs just that (about a minute on CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments.haste import (SHAPES_TMR, EBCConfig, HasteConfig, TMRConfig, base_policy, calibrate_shapes,
                               default_implementation, drift, haste, pool_blocks)
from vidaccel.sparse_attention import IMPLEMENTATIONS, AttnContext, AttnSpec, sparse_attention, sparse_summary

BASES = ("xattention", "svg2")
VARIANTS = ("base", "tmr", "ebc", "haste")
VARIANT_LABEL = {"base": "baseline", "tmr": "+ TMR", "ebc": "+ EBC", "haste": "+ TMR + EBC (HASTE)"}
BASE_LABEL = {"xattention": "XAttention", "svg2": "SVG2"}
IMPL_NOTE = {"gather": "plain-jnp gather path (selected keys only, padded to static bucket widths; same result as "
                       "the kernels), so CPU times include the real sparse-attention savings",
             "reference": "jnp reference (masked dense attention; same result as the kernels, dense cost), so CPU "
                          "times show only the overheads of prediction and TMR",
             "kernel": "Pallas kernels (compiled on GPU, interpret mode elsewhere)"}


@dataclasses.dataclass(frozen=True)
class TableConfig:
    prompts: int = 8
    steps: int = 50
    guidance: float = 5.0
    seed: int = 0
    thresholds: tuple[float, ...] = (0.6, 0.8, 0.9, 0.95)
    main_threshold: float = 0.9
    bases: tuple[str, ...] = BASES
    cal_prompts: int = 4
    cal_positions: tuple[float, ...] = (0.1, 0.4, 0.7)
    tmr: TMRConfig = SHAPES_TMR
    timing_reps: int = 20
    repeats: int = 2
    implementation: str = dataclasses.field(default_factory=default_implementation)
    bench_tokens: tuple[int, ...] = (512, 4096)

    def __post_init__(self):
        if self.implementation not in IMPLEMENTATIONS:
            raise ValueError(f"TableConfig.implementation={self.implementation!r} is invalid; allowed: "
                             f"{IMPLEMENTATIONS}")


# ------------------------------------------------------------------------------------------ running
class Runner:
    """Compiles one function per denoiser structure that samples every prompt (one per call, `lax.map`)
    with per-(layer, head) thresholds as a traced input, so sweeps and EBC tables reuse the compiled code."""

    def __init__(self, model, prompts, cfg: TableConfig, log=print):
        from models.shapes import encode_prompts
        from models.shapes.pretrained import latent_noise
        from vidaccel.solvers import unipc

        self.model, self.cfg, self.log = model, cfg, log
        self.solver = unipc(cfg.steps)
        ctx = jnp.asarray(encode_prompts(prompts))
        self.ctx = ctx[:, None]                                           # (n, 1, L, D): batch 1 per call
        self.noise = latent_noise(len(prompts), cfg.seed)[:, None]
        self.compiled, self.jobs = {}, []

    def _fn(self, den):
        from vidaccel.sampling import denoise_loop, init_branches
        from vidaccel.transforms import DenoiseSpec

        solver, guidance = self.solver, jnp.float32(self.cfg.guidance)
        spec = DenoiseSpec(jax.ShapeDtypeStruct(self.noise.shape[1:], jnp.float32),
                           jax.ShapeDtypeStruct(self.ctx.shape[1:], jnp.float32), solver.num_steps)
        sparse = den.name.startswith("sparse")

        def one(params, thresholds, xs):
            noise, ctx = xs
            state = init_branches(den, spec, True)
            if sparse:
                state = state.map(lambda s: s.replace(thresholds=thresholds))
            x, state = denoise_loop(den, solver, True, params, noise, ctx, jnp.zeros_like(ctx), guidance, state,
                                    jnp.int32(0))
            return x, state

        def run(params, thresholds, noise, ctx):
            return jax.lax.map(lambda xs: one(params, thresholds, xs), (noise, ctx))

        return run

    def run(self, key: str, den, thresholds) -> dict:
        """Sample all prompts once; returns latents (n, ...), the per-prompt states summed, the wall time and
        a job number for `retime`. One compiled function per `key` (a denoiser structure)."""
        args = (den.params, jnp.asarray(thresholds, jnp.float32), self.noise, self.ctx)
        t0 = time.perf_counter()
        if key not in self.compiled:
            self.compiled[key] = jax.jit(self._fn(den)).lower(*args).compile()
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        latents, state = self.compiled[key](*args)
        jax.block_until_ready(latents)
        seconds = time.perf_counter() - t0
        self.jobs.append((key, args, [seconds]))
        state = jax.tree.map(lambda x: x.sum(0) if x.ndim else x, state)
        return {"latents": np.asarray(latents[:, 0]), "state": state, "seconds": seconds,
                "compile_seconds": compile_s, "job": len(self.jobs) - 1}

    def retime(self, rounds: int) -> list[list[float]]:
        """Time every job again `rounds` times, interleaved (round by round over all jobs) so that background
        load falls on every method alike; returns each job's wall times (the first run's included)."""
        for _ in range(rounds):
            for key, args, times in self.jobs:
                t0 = time.perf_counter()
                jax.block_until_ready(self.compiled[key](*args)[0])
                times.append(time.perf_counter() - t0)
        return [times for _, _, times in self.jobs]


def denoiser_for(model, base: str, tmr: TMRConfig | None, implementation: str):
    from models.wan.denoiser import wan_denoiser

    policy = base_policy(base, implementation=implementation)
    if tmr is not None:
        policy = haste(policy, HasteConfig(tmr=tmr))
    return sparse_attention(wan_denoiser(model), policy)


def fidelity(latents, dense_latents, prompts) -> dict:
    from models.shapes import adherence, decode_latents
    from vidaccel.metrics import psnr, relative_l2, ssim

    videos = decode_latents(latents, uint8=True)
    v = videos.astype(np.float32) / 255.0
    r = decode_latents(dense_latents, uint8=True).astype(np.float32) / 255.0
    p = np.minimum(np.asarray(psnr(v, r)), 100.0)        # identical videos (inf) count as 100 dB
    return {"psnr": float(np.mean(p)), "ssim": float(np.mean(np.asarray(ssim(v, r)))),
            "rel_l2_latents": float(np.mean(np.asarray(relative_l2(jnp.asarray(latents), jnp.asarray(dense_latents))))),
            "adherence": float(adherence(videos, prompts)["score"]), "psnr_per_prompt": np.round(p, 3).tolist()}


# ------------------------------------------------------------------------------------------ stage timings
def _time(fn, *args, reps: int) -> float:
    """Median wall seconds of a jitted call (compiled and warmed up first)."""
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def capture_qkv(model, x, t, ctx):
    """q, k, v (L, B, N, H, D) of every layer's self-attention at (x, t, ctx), from a dense forward."""
    from vidaccel.attention import dense_attention

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


def stage_timings(model, runner: Runner, cfg: TableConfig, threshold: float, log=print) -> dict:
    """Per attention call (one prompt, one CFG branch), averaged over layers: mask prediction, TMR check,
    sparse attention (`cfg.implementation`) and dense attention, timed separately on captured q, k, v at a
    mid step."""
    from experiments.haste import dense_trajectory
    from vidaccel.attention import AttentionInfo, dense_attention

    xs = dense_trajectory(model, runner.noise[0], runner.ctx[0], jnp.zeros_like(runner.ctx[0]), runner.solver,
                          cfg.guidance)
    s = cfg.steps // 2
    t = jnp.full((1,), runner.solver.timesteps[s], jnp.float32)
    q_all, k_all, v_all = capture_qkv(model, xs[s], t, runner.ctx[0])
    L, b, n, h, d = q_all.shape
    spec = AttnSpec(b, n, h, d, L, cfg.steps)
    info = AttentionInfo(jnp.zeros((b, n), jnp.int32), jnp.zeros((b, n), jnp.int32), jnp.int32(0))
    dense_fn = jax.jit(lambda q, k, v: dense_attention(q, k, v, info)[0])
    pool = cfg.tmr.pool_block
    check_fn = jax.jit(lambda q, k, qa, ka: drift(pool_blocks(q, pool), pool_blocks(k, pool), qa, ka, cfg.tmr.drift))
    out = {"step": s, "reps": cfg.timing_reps, "layers": L}
    for base in cfg.bases:
        policy = base_policy(base, threshold, cfg.implementation)
        state = policy.init(spec)
        rows = {"predict": [], "attend": [], "dense": [], "check": []}
        fractions = {"pairs": [], "gathered": []}
        for layer in range(L):
            q, k, v = q_all[layer], k_all[layer], v_all[layer]
            ctx = AttnContext(jnp.int32(s), jnp.int32(layer), jnp.full((h,), threshold, jnp.float32), spec)
            st = jax.tree.map(lambda x: x[layer], state)
            predict = jax.jit(lambda q, k, st, ctx: policy.predict(q, k, st, ctx))
            if base == "svg2":        # time the per-step (warm-started) k-means, not the one-off init
                st = predict(q, k, st, ctx)[1]
            plan = predict(q, k, st, ctx)[0]
            attend = jax.jit(lambda q, k, v, plan, ctx: policy.attend(q, k, v, plan, ctx))
            qa, ka = pool_blocks(q, pool), pool_blocks(k, pool)
            rows["predict"].append(_time(predict, q, k, st, ctx, reps=cfg.timing_reps))
            rows["attend"].append(_time(attend, q, k, v, plan, ctx, reps=cfg.timing_reps))
            rows["dense"].append(_time(dense_fn, q, k, v, reps=cfg.timing_reps))
            rows["check"].append(_time(check_fn, q, k, qa, ka, reps=cfg.timing_reps))
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
    from experiments.svg2 import svg2_shapes
    from experiments.xattention import xattention_shapes
    from pallas_kernels.gather_jnp import gather_work

    if base == "xattention":
        b, h = plan.counts.shape[:2]
        bs = xattention_shapes().block_size
        units = gather_work(plan.counts, plan.indices.shape[-1], row_len=bs, unit=bs)
        return float(units) * bs * bs / (b * h * n * n)
    b, h = plan.q_ranges.shape[:2]
    bq = svg2_shapes().block_q
    cnt = jnp.where(plan.q_ranges[..., 1] > 0, plan.kv_ranges[..., 1].sum(-1), 0)
    return float(gather_work(cnt, n, row_len=bq)) * bq / (b * h * n * n)


# ------------------------------------------------------------------------------------------ microbenchmark
BENCH_DENSITIES = (1.0, 0.5, 0.25)
BENCH_KINDS = ("blocks, equal rows", "blocks, varied rows", "clusters")


def varied_blocks(key, b: int, h: int, nq: int, nk: int, density: float):
    """Random kv blocks per query block, with per-row counts drawn uniformly from 1..2 density nk - 1 (mean
    density x nk): the rows differ, as XAttention's do. Needs density <= (nk + 1) / (2 nk)."""
    from pallas_kernels import BlockIndices

    hi = round(2 * density * nk) - 1
    if not 1 <= hi <= nk:
        raise ValueError(f"density={density} cannot vary around its mean with {nk} blocks per row")
    k1, k2 = jax.random.split(key)
    counts = jax.random.randint(k1, (b, h, nq), 1, hi + 1).astype(jnp.int32)
    idx = jnp.argsort(jax.random.uniform(k2, (b, h, nq, nk)), axis=-1).astype(jnp.int32)
    return BlockIndices(jnp.where(jnp.arange(nk) < counts[..., None], idx, -1), counts)


def _interleaved(fns: dict, reps: int) -> dict:
    """{name: (median s, min s)} of jitted calls, compiled and warmed up first, then timed `reps` rounds with
    every call once per round, so background load falls on all of them alike."""
    for fn, args in fns.values():
        jax.block_until_ready(fn(*args))
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, (fn, args) in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - t0)
    return {name: (float(np.median(t)), float(np.min(t))) for name, t in times.items()}


def attention_bench(tokens=(512, 4096), *, heads: int = 4, head_dim: int = 32, block: int = 16, tile_q: int = 32,
                    cluster: int = 16, densities=BENCH_DENSITIES, reps: int = 20, seed: int = 0, log=print) -> dict:
    """One attention call: dense XLA attention vs the gather path (and the jnp reference up to 1024 tokens).

    Per token count, on random fp32 q, k, v (batch 1), at each density, for three kinds of selection:
    - "blocks, equal rows": XAttention-style, every query block selects round(density x nk) random blocks of
      `block` tokens;
    - "blocks, varied rows": the same mean density with per-row counts spread from 1 to 2 x the mean (not
      at densities above about 0.5, where there is no room);
    - "clusters": SVG2-style key clusters of about `cluster` tokens and query tiles of `tile_q`, each cluster
      selected per tile with probability density.
    Reports the median and minimum of `reps` interleaved runs (fewer above 1024 tokens), the selected fraction
    of the dense work, the fraction the gather path computes (`gather_work`, padding included), and at <= 1024
    tokens its relative L2 difference from the reference.
    """
    from experiments.bench_kernels import AttnShape, random_blocks, random_clusters
    from pallas_kernels import BlockIndices, block_sparse_attention_gather, cluster_sparse_attention_gather
    from pallas_kernels.gather_jnp import gather_work
    from pallas_kernels.reference import block_sparse_attention_reference, cluster_sparse_attention_reference

    dense = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla"))
    blk_g = jax.jit(lambda q, k, v, i, c: block_sparse_attention_gather(q, k, v, BlockIndices(i, c), block_q=block,
                                                                        block_k=block))
    blk_r = jax.jit(lambda q, k, v, i, c: block_sparse_attention_reference(q, k, v, BlockIndices(i, c),
                                                                           block_q=block, block_k=block))
    cl_g = jax.jit(lambda q, k, v, qr, kr: cluster_sparse_attention_gather(q, k, v, kr, q_ranges=qr, block_q=tile_q,
                                                                           block_k=block))
    cl_r = jax.jit(lambda q, k, v, qr, kr: cluster_sparse_attention_reference(q, k, v, kr, q_ranges=qr,
                                                                              block_q=tile_q, block_k=block))
    rows = []
    for n in tokens:
        keys = jax.random.split(jax.random.key(seed + n), 6)
        q, k, v = (jax.random.normal(kk, (1, n, heads, head_dim), jnp.float32) for kk in keys[:3])
        nb = -(-n // block)
        with_ref = n <= 1024
        fns, cases = {"dense": (dense, (q, k, v))}, []
        for d in densities:
            for kind in BENCH_KINDS:
                if kind == "blocks, varied rows" and round(2 * d * nb) - 1 > nb:
                    continue                    # a mean this high leaves no room to vary (density 1)
                if kind == "clusters":
                    qr, kr, _ = random_clusters(keys[5], AttnShape("bench", 1, n, heads, head_dim, tile_q, cluster), d)
                    cnt = jnp.where(qr[..., 1] > 0, kr[..., 1].sum(-1), 0)
                    sel = float(jnp.sum(qr[..., 1] * cnt)) / (heads * n * n)
                    done = float(gather_work(cnt, n, row_len=tile_q)) * tile_q / (heads * n * n)
                    gfn, rfn, args = cl_g, cl_r, (q, k, v, qr, kr)
                else:
                    make = random_blocks if kind.endswith("equal rows") else varied_blocks
                    bi = make(keys[3 if kind.endswith("equal rows") else 4], 1, heads, nb, nb, d)
                    sel = float(jnp.sum(bi.counts)) / (heads * nb * nb)
                    done = float(gather_work(bi.counts, nb, row_len=block, unit=block)) / (heads * nb * nb)
                    gfn, rfn, args = blk_g, blk_r, (q, k, v, bi.indices, bi.counts)
                name = f"{kind} @ {d:g}"
                fns[f"gather {name}"] = (gfn, args)
                err = None
                if with_ref:
                    fns[f"reference {name}"] = (rfn, args)
                    a, r = np.asarray(gfn(*args), np.float64), np.asarray(rfn(*args), np.float64)
                    err = float(np.linalg.norm(a - r) / np.linalg.norm(r))
                cases.append((name, kind, d, sel, done, err))
        t = _interleaved(fns, reps if n <= 1024 else max(3, reps // 4))
        for name, kind, d, sel, done, err in cases:
            g, dn = t[f"gather {name}"], t["dense"]
            row = {"tokens": n, "kind": kind, "density": d, "selected": round(sel, 4), "gathered": round(done, 4),
                   "dense_ms": round(1e3 * dn[0], 3), "gather_ms": round(1e3 * g[0], 3),
                   "gather_min_ms": round(1e3 * g[1], 3), "dense_min_ms": round(1e3 * dn[1], 3),
                   "gather_vs_dense": round(g[0] / dn[0], 3), "reference_ms": None, "rel_l2_vs_reference": err}
            if with_ref:
                row["reference_ms"] = round(1e3 * t[f"reference {name}"][0], 3)
            rows.append(row)
            log(f"  {n} tokens, {name}: selected {sel:.3f}, gathered {done:.3f}, gather {row['gather_ms']} ms vs "
                f"dense {row['dense_ms']} ms ({row['gather_vs_dense']:.2f}x)")
    return {"heads": heads, "head_dim": head_dim, "block": block, "tile_q": tile_q, "cluster": cluster,
            "reps": reps, "machine": f"{platform.machine()}, {jax.devices()[0].platform}",
            "date": time.strftime("%Y-%m-%d %H:%M"), "rows": rows}


def bench_markdown(bench: dict, level: str = "#") -> str:
    lines = [f"{level} Attention microbenchmark: one call, dense XLA vs the gather path", "",
             f"Batch 1, {bench['heads']} heads x {bench['head_dim']}, fp32, {bench['machine']}, {bench['date']}. "
             f"Blocks of {bench['block']} tokens; clusters of about {bench['cluster']} key tokens with query tiles "
             f"of {bench['tile_q']}. Median of {bench['reps']} interleaved runs (a quarter of that, at least 3, above "
             "1024 tokens). 'selected' is the fraction of the dense query-key work the selection keeps; "
             "'gathered' is what the gather path computes, padding to the bucket widths included.", "",
             "| tokens | selection | density | selected | gathered | dense ms | gather ms (min) | reference ms | "
             "gather / dense |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in bench["rows"]:
        ref = "-" if r["reference_ms"] is None else f"{r['reference_ms']:.2f}"
        lines.append(f"| {r['tokens']} | {r['kind']} | {r['density']:g} | {r['selected']:.3f} | {r['gathered']:.3f} | "
                     f"{r['dense_ms']:.2f} | {r['gather_ms']:.2f} ({r['gather_min_ms']:.2f}) | {ref} | "
                     f"{r['gather_vs_dense']:.2f} |")
    return "\n".join(lines) + "\n"


def write_bench(bench: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "attention_bench.json").write_text(json.dumps(bench, indent=1))
    (out_dir / "attention_bench.md").write_text(bench_markdown(bench))


# ------------------------------------------------------------------------------------------ the table
def run_table(cfg: TableConfig, out_dir: Path, log=print) -> dict:
    from models.shapes import sample_prompts
    from models.shapes.pretrained import load_shapes_model, training_info
    from vidaccel.transforms import total_work
    from models.wan.denoiser import wan_denoiser

    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    model = load_shapes_model("t2v")
    prompts = sample_prompts(cfg.prompts, cfg.seed, "heldout")
    runner = Runner(model, prompts, cfg, log)
    L, H = model.cfg.num_layers, model.cfg.num_attention_heads
    ones = np.ones((L, H), np.float32)

    log(f"[dense] {cfg.prompts} prompts, UniPC {cfg.steps}, CFG {cfg.guidance}")
    dense = runner.run("dense", wan_denoiser(model), ones)
    dense_fid = fidelity(dense["latents"], dense["latents"], prompts)
    rows = [{"base": "dense", "variant": "dense", "threshold": None, "job": dense["job"],
             "compile_seconds": dense["compile_seconds"], "adherence": dense_fid["adherence"],
             "model_calls": total_work(dense["state"])["calls"]}]

    ebc_tables = {}
    for base in cfg.bases:
        log(f"[{base}] EBC calibration: {cfg.cal_prompts} train prompts, positions {cfg.cal_positions}")
        ebc_cfg = EBCConfig(positions=cfg.cal_positions, guidance=cfg.guidance,
                            reference_threshold=cfg.main_threshold)
        table = calibrate_shapes(base, prompts=cfg.cal_prompts, steps=cfg.steps, cfg=ebc_cfg, model=model, log=log)
        table.save(out_dir / f"ebc_{base}.json")
        ebc_tables[base] = table
        cands = list(table.candidates)
        for thr in cfg.thresholds:
            if thr not in cands:
                raise ValueError(f"sweep threshold {thr} is not an EBC candidate {cands}")
            budget = float(table.densities[..., cands.index(thr)].mean())
            solved = table.resolve(budget)
            for variant in VARIANTS:
                tmr = cfg.tmr if variant in ("tmr", "haste") else None
                thresholds = solved.thresholds if variant in ("ebc", "haste") else np.full((L, H), thr, np.float32)
                den = denoiser_for(model, base, tmr, cfg.implementation)
                res = runner.run(f"{base}/{tmr is not None}", den, thresholds)
                summ = sparse_summary(res["state"])
                fid = fidelity(res["latents"], dense["latents"], prompts)
                row = {"base": base, "variant": variant, "threshold": thr, "job": res["job"],
                       "compile_seconds": res["compile_seconds"], **fid, **summ}
                if variant in ("ebc", "haste"):
                    row["ebc_budget"] = budget
                    row["ebc_thresholds"] = np.asarray(solved.thresholds).round(4).tolist()
                    row["ebc_predicted"] = solved.predicted()["table"]
                rows.append(row)
                log(f"  {base} {variant:5s} tau={thr}: density {summ['density_sparse']:.3f}, PSNR {fid['psnr']:.2f}, "
                    f"SSIM {fid['ssim']:.4f}, adherence {fid['adherence']:.3f}, reuse {summ['reuse_fraction']:.2f}, "
                    f"first run {res['seconds']:.1f}s")
    log(f"[timing] {cfg.repeats - 1} more interleaved rounds over the {len(rows)} compiled runs")
    times = runner.retime(cfg.repeats - 1)
    for r in rows:
        r["seconds_all"] = [round(t, 4) for t in times[r.pop("job")]]
        r["seconds"] = min(r["seconds_all"])
    noise = timing_noise(rows)
    for r in rows:
        r["speed_vs_dense"] = rows[0]["seconds"] / r["seconds"]
        if r["base"] != "dense":
            b = next(x for x in rows if x["base"] == r["base"] and x["threshold"] == r["threshold"]
                     and x["variant"] == "base")
            r["speed_vs_base"] = b["seconds"] / r["seconds"]

    log("[stage timings]")
    stages = stage_timings(model, runner, cfg, cfg.main_threshold, log)
    for base in cfg.bases:       # attention-time ratio per sparse call, from the stage timings and reuse
        for r in rows:
            if r["base"] == base:
                st = stages[base]
                pred = (1.0 - r["reuse_fraction"]) * st["predict"] + (st["check"] if r["variant"] in ("tmr", "haste")
                                                                       else 0.0)
                r["attention_time_vs_dense"] = (pred + st["attend"]) / st["dense"]
                r["prediction_time_share"] = pred / (pred + st["attend"])
    log("[attention microbenchmark]")
    bench = attention_bench(cfg.bench_tokens, reps=cfg.timing_reps, log=log)
    write_bench(bench, out_dir)
    result = {"config": {**dataclasses.asdict(cfg), "tmr": dataclasses.asdict(cfg.tmr)}, "prompts": prompts,
              "model": training_info("t2v"), "machine": f"{platform.machine()}, {jax.devices()[0].platform}, "
              f"python {platform.python_version()}", "date": time.strftime("%Y-%m-%d %H:%M"),
              "implementation": cfg.implementation,
              "sparse_path": IMPL_NOTE[cfg.implementation] + "; the counters count the kernels' work",
              "rows": rows, "timing_noise": noise, "stage_timings_ms": stages, "attention_bench": bench,
              "total_seconds": round(time.perf_counter() - t_start, 1)}
    (out_dir / "table.json").write_text(json.dumps(result, indent=1, default=float))
    (out_dir / "table.md").write_text(markdown(result))
    plot(result, out_dir)
    log(f"wrote {out_dir}/table.json, table.md, attention_bench.json/.md, fidelity_vs_density.png, "
        f"prediction_share.png ({result['total_seconds']}s)")
    return result


def timing_noise(rows: list[dict]) -> float:
    """The largest relative spread (max - min) / min of any run's repeated wall times: a conservative noise
    level for the time ratios (0 with a single repeat)."""
    return max((max(r["seconds_all"]) - min(r["seconds_all"])) / min(r["seconds_all"]) for r in rows)


def claim_check(rows: list[dict], noise: float = 0.0) -> list[dict]:
    """HASTE vs its baseline at each threshold: density, PSNR, time; holds = at least as faithful (PSNR and
    SSIM), density within +2% of the baseline's, and faster by more than the timing noise (`timing_noise`)."""
    out = []
    for r in rows:
        if r["variant"] != "haste":
            continue
        b = next(x for x in rows if x["base"] == r["base"] and x["threshold"] == r["threshold"]
                 and x["variant"] == "base")
        faithful = r["psnr"] >= b["psnr"] and r["ssim"] >= b["ssim"]
        equal_density = r["density_sparse"] <= b["density_sparse"] * 1.02
        faster = b["seconds"] / r["seconds"] > 1.0 + noise
        out.append({"base": r["base"], "threshold": r["threshold"], "density_base": b["density_sparse"],
                    "density_haste": r["density_sparse"], "psnr_base": b["psnr"], "psnr_haste": r["psnr"],
                    "ssim_base": b["ssim"], "ssim_haste": r["ssim"], "time_ratio": b["seconds"] / r["seconds"],
                    "faithful": faithful, "equal_density": equal_density, "faster": faster,
                    "holds": bool(faithful and equal_density and faster)})
    return out


def markdown(res: dict) -> str:
    cfg = res["config"]
    rows = res["rows"]
    dense = rows[0]
    impl = res.get("implementation", "reference")
    lines = ["# Sparse attention on the embedded text-to-video model", "",
             f"{len(res['prompts'])} held-out prompts, UniPC {cfg['steps']} steps, CFG {cfg['guidance']}, seed "
             f"{cfg['seed']}, one prompt per call; model checkpoint: {res['model'].get('steps')} training steps. "
             f"{res['machine']}, {res['date']}. Sparse path: {res['sparse_path']}. Wall-clock: the minimum of "
             f"{cfg['repeats']} compiled runs per method, interleaved round by round.",
             f"Dense: {dense['seconds']:.2f} s for all prompts, adherence {dense['adherence']:.3f}.", "",
             f"## Main rows (shared threshold {cfg['main_threshold']}; EBC at that threshold's calibration density)",
             "", "| method | density (sparse steps) | density (all) | PSNR | SSIM | adherence | masks reused | "
             "prediction FLOP share | attention FLOPs vs dense | attention time vs dense | end-to-end vs dense | "
             "end-to-end vs baseline |", "|---|" + "---:|" * 11]
    for r in rows[1:]:
        if r["threshold"] != cfg["main_threshold"]:
            continue
        lines.append(f"| {BASE_LABEL[r['base']]} {VARIANT_LABEL[r['variant']]} | {r['density_sparse']:.3f} | "
                     f"{r['density_overall']:.3f} | {r['psnr']:.2f} | {r['ssim']:.4f} | {r['adherence']:.3f} | "
                     f"{100 * r['reuse_fraction']:.0f}% | {100 * r['prediction_flops_share']:.1f}% | "
                     f"{r['attention_flops_ratio']:.3f} | {r['attention_time_vs_dense']:.2f}x | "
                     f"{r['seconds'] / dense['seconds']:.2f}x | {r['speed_vs_base']:.2f}x faster |")
    lines += ["", "Time ratios are wall-clock time / dense time (below 1 = faster) except the last column "
              "(baseline time / this time). Attention time per sparse call = (1 - reuse) x prediction + TMR check "
              "+ sparse attention, from the stage timings below.", "",
              "## Stage timings (ms per attention call, mean over layers, one prompt and branch, median of "
              f"{res['stage_timings_ms']['reps']} runs, step {res['stage_timings_ms']['step']})", "",
              f"| method | mask prediction | TMR drift check | sparse attention ({impl}) | dense attention | "
              "prediction share | pairs selected / dense | pairs the gather path computes / dense |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for base in cfg["bases"]:
        st = res["stage_timings_ms"][base]
        frac = (f"{st['pairs_fraction']:.3f} | {st['gathered_fraction']:.3f}" if "gathered_fraction" in st
                else "- | -")
        lines.append(f"| {BASE_LABEL[base]} | {st['predict']:.3f} | {st['check']:.3f} | {st['attend']:.3f} | "
                     f"{st['dense']:.3f} | {100 * st['prediction_share']:.1f}% | {frac} |")
    lines.append("")
    for base in cfg["bases"]:
        st = res["stage_timings_ms"][base]
        for r in rows:
            if r["base"] == base and r["variant"] == "tmr" and r["threshold"] == cfg["main_threshold"]:
                saved = r["reuse_fraction"] * st["predict"] - st["check"]
                lines.append(f"- {BASE_LABEL[base]}: mask prediction is {100 * st['prediction_share']:.1f}% of a "
                             "sparse "
                             f"call's attention time; TMR skipped {100 * r['reuse_fraction']:.0f}% of the predictions, "
                             f"i.e. {r['reuse_fraction'] * st['predict']:.3f} of {st['predict']:.3f} ms per call, at a "
                             f"drift-check cost of {st['check']:.3f} ms (net {saved:+.3f} ms per call).")
    lines += ["", "## HASTE vs its baseline over the sweep", "",
              f"Timing noise: the largest spread of any run's repeated wall times is {100 * timing_noise(rows):.1f}% "
              "((max - min) / min); 'faster' needs a time ratio above 1 + that.", "",
              "| base | threshold | density base / HASTE | PSNR base / HASTE | SSIM base / HASTE | time base / HASTE | "
              "claim holds |", "|---|---:|---:|---:|---:|---:|---|"]
    for c in claim_check(rows, timing_noise(rows)):
        why = [] if c["holds"] else [w for w, ok in (("less faithful", c["faithful"]), ("denser", c["equal_density"]),
                                                     ("not faster beyond noise", c["faster"])) if not ok]
        lines.append(f"| {BASE_LABEL[c['base']]} | {c['threshold']} | {c['density_base']:.3f} / "
                     f"{c['density_haste']:.3f} | {c['psnr_base']:.2f} / {c['psnr_haste']:.2f} | "
                     f"{c['ssim_base']:.4f} / {c['ssim_haste']:.4f} | {c['time_ratio']:.2f}x | "
                     f"{'yes' if c['holds'] else 'no: ' + ', '.join(why)} |")
    lines += ["", "## All runs", "", "| base | variant | threshold | density | PSNR | SSIM | adherence | reuse | "
              "seconds |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows[1:]:
        lines.append(f"| {r['base']} | {r['variant']} | {r['threshold']} | {r['density_sparse']:.3f} | "
                     f"{r['psnr']:.2f} | {r['ssim']:.4f} | {r['adherence']:.3f} | {100 * r['reuse_fraction']:.0f}% | "
                     f"{r['seconds']:.2f} |")
    if "attention_bench" in res:
        lines += ["", bench_markdown(res["attention_bench"], level="##")]
    return "\n".join(lines) + "\n"


def plot(res: dict, out_dir: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cfg = res["rows"], res["config"]
    metrics = (("psnr", "PSNR vs dense (dB)"), ("ssim", "SSIM vs dense"), ("adherence", "prompt adherence"))
    fig, axes = plt.subplots(len(metrics), len(cfg["bases"]), figsize=(5 * len(cfg["bases"]), 3.2 * len(metrics)),
                             squeeze=False)
    for j, base in enumerate(cfg["bases"]):
        for i, (key, label) in enumerate(metrics):
            ax = axes[i, j]
            for variant, marker in zip(VARIANTS, "osD^"):
                pts = sorted((r["density_sparse"], r[key]) for r in rows
                             if r["base"] == base and r["variant"] == variant)
                if pts:
                    ax.plot(*zip(*pts), marker=marker, label=VARIANT_LABEL[variant])
            if key == "adherence":
                ax.axhline(rows[0]["adherence"], color="k", ls="--", lw=0.8, label="dense")
            ax.set_xlabel("density (sparse steps)")
            ax.set_ylabel(label)
            ax.set_title(BASE_LABEL[base])
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "fidelity_vs_density.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.2))
    names, pred, attn = [], [], []
    for r in rows[1:]:
        if r["threshold"] == cfg["main_threshold"]:
            names.append(f"{BASE_LABEL[r['base']]}\n{r['variant']}")
            pred.append(r["prediction_time_share"] * r["attention_time_vs_dense"])
            attn.append((1 - r["prediction_time_share"]) * r["attention_time_vs_dense"])
    x = np.arange(len(names))
    ax.bar(x, attn, label=f"sparse attention ({res.get('implementation', 'reference')})")
    ax.bar(x, pred, bottom=attn, label="mask prediction + TMR check")
    ax.axhline(1.0, color="k", ls="--", lw=0.8, label="dense attention")
    ax.set_xticks(x, names, fontsize=7)
    ax.set_ylabel("attention time / dense (CPU)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "prediction_share.png", dpi=110)
    plt.close(fig)


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
    p.add_argument("--implementation", choices=IMPLEMENTATIONS, default=d.implementation,
                   help="how sparse attention runs (default here: %(default)s; kernel on GPU, gather elsewhere)")
    p.add_argument("--bench-tokens", default=",".join(map(str, d.bench_tokens)),
                   help="token counts of the attention microbenchmark")
    p.add_argument("--bench-only", action="store_true",
                   help="only run the attention microbenchmark; writes <out>/attention_bench.json and .md")
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
    bench_tokens = tuple(int(x) for x in a.bench_tokens.split(",") if x)
    if a.bench_only:
        bench = attention_bench(bench_tokens, reps=a.timing_reps)
        write_bench(bench, Path(a.out))
        print(bench_markdown(bench))
        return
    thresholds = tuple(float(x) for x in a.thresholds.split(","))
    main_thr = a.main_threshold if a.main_threshold in thresholds else thresholds[-1]
    bases = tuple(b for b in a.bases.split(",") if b)
    for b in bases:
        if b not in BASES:
            raise SystemExit(f"unknown base {b!r}; allowed: {BASES}")
    cfg = TableConfig(prompts=a.prompts, steps=a.steps, seed=a.seed, thresholds=thresholds, main_threshold=main_thr,
                      bases=bases, cal_prompts=a.cal_prompts,
                      cal_positions=tuple(float(x) for x in a.cal_positions.split(",")),
                      tmr=dataclasses.replace(d.tmr, epsilon=a.epsilon, max_interval=a.max_interval),
                      timing_reps=a.timing_reps, repeats=a.repeats, implementation=a.implementation,
                      bench_tokens=bench_tokens)
    run_table(cfg, Path(a.out))


if __name__ == "__main__":
    main()
