"""Attention benchmarks (not tests): the Pallas kernels against dense attention, and the plain-jnp gather path.

Kernels: for every shape and density, median wall time after warm-up, actual and dense-equivalent TFLOP/s,
bytes/s (minimal HBM traffic / time) and the speed ratio to dense attention at the same shape (implementation
"xla", plus "cudnn" on GPU), all measured in this one process. Writes `<out>/kernels[_smoke].json` and `.md`.

    python -m experiments.bench_kernels                 # GPU: Wan 1.3B 480p and 14B 720p shapes
    python -m experiments.bench_kernels --smoke         # CPU: tiny shapes, interpret mode, < 1 minute
    python -m experiments.bench_kernels --gather        # the gather path at the shapes model's size (CPU, ~1 min)

On CPU the kernels run in Pallas interpret mode, so smoke times measure the interpreter, not a kernel.
`--gather` times one attention call of dense XLA attention against the gather path
(`pallas_kernels.gather_jnp`, what sparse attention runs on CPU) and the jnp reference, at densities 1, 0.5
and 0.25, at the shapes model's size (512 tokens, 4 heads x 32, XAttention block 16, SVG2 tiles 32) and a
larger one; it writes `<out>/attention_bench.json` and `.md` (default `results/sparse`, where
`python -m experiments.sparse_table` also writes it as part of its table).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import pathlib
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels as pk
from experiments.harness import interleaved_times, machine, markdown_table, write_results
from pallas_kernels import kv_quantization as kv
from pallas_kernels.gather_jnp import gather_work
from pallas_kernels.reference import block_sparse_attention_reference, cluster_sparse_attention_reference


@dataclasses.dataclass(frozen=True)
class AttnShape:
    name: str
    batch: int
    tokens: int
    heads: int
    head_dim: int
    block: int
    cluster_size: int  # mean SVG2 key-cluster size at this resolution (spec: 33 at 480p, 76 at 720p)


@dataclasses.dataclass(frozen=True)
class KVShape:
    name: str
    batch: int
    queries: int  # the current chunk (lives in the full-precision window)
    cached: int  # quantized past tokens
    heads: int
    head_dim: int
    group: int
    block_q: int


GPU_ATTN = [AttnShape("wan2.1-1.3B-480p", 1, 32_760, 12, 128, 128, 33),
            AttnShape("wan2.1-14B-720p", 1, 75_600, 40, 128, 128, 76)]
# Self-Forcing Wan2.1-1.3B: a 3-latent-frame chunk (3 x 1560 tokens) over the 18 frames before it
GPU_KV = [KVShape("selfforcing-1.3B-480p-chunk", 1, 4_680, 28_080, 12, 128, 64, 64)]
SMOKE_ATTN = [AttnShape("smoke", 1, 200, 2, 32, 32, 12)]
SMOKE_KV = [KVShape("smoke-kv", 1, 48, 160, 2, 32, 32, 16)]


def timeit(fn: Callable[[], Any], warmup: int, iters: int) -> float:
    """Median seconds of `fn()` (blocked on its result) after `warmup` untimed calls (compilation included)."""
    return statistics.median(interleaved_times({"fn": fn}, iters, warmup=warmup)["fn"])


def safe_time(fn, warmup, iters) -> tuple[float | None, str | None]:
    try:
        return timeit(fn, warmup, iters), None
    except Exception as e:  # e.g. XLA dense attention running out of memory at 75,600 tokens
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"


def dense_baselines(q, k, v, on_gpu, warmup, iters, mask=None) -> dict[str, dict]:
    out = {}
    for impl in ["xla"] + (["cudnn"] if on_gpu else []):
        f = jax.jit(lambda q, k, v, impl=impl: jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl))
        t, err = safe_time(lambda f=f: f(q, k, v), warmup, iters)
        out[impl] = {"seconds": t, "error": err}
    return out


def random_blocks(key, b, h, nq, nk, density) -> pk.BlockIndices:
    """round(density * nk) distinct random kv blocks per query block (at least 1)."""
    n = max(1, round(density * nk))
    scores = jax.random.uniform(key, (b, h, nq, nk))
    idx = jnp.argsort(scores, axis=-1)[..., :n].astype(jnp.int32)
    return pk.BlockIndices(idx, jnp.full((b, h, nq), n, jnp.int32))


def random_clusters(key, s: AttnShape, density):
    """SVG2-like: key clusters of random sizes (mean s.cluster_size), fixed query tiles, each key cluster
    selected per tile with probability `density` (at least one). Returns (q_ranges, kv_ranges, density)."""
    n, bq = s.tokens, s.block
    nkc = max(2, n // s.cluster_size)
    k1, k2 = jax.random.split(key)
    cuts = jnp.sort(jax.random.randint(k1, (s.batch, s.heads, nkc - 1), 0, n + 1), axis=-1)
    bounds = jnp.concatenate([jnp.zeros((s.batch, s.heads, 1), jnp.int32), cuts,
                              jnp.full((s.batch, s.heads, 1), n, jnp.int32)], -1)
    k_sizes = jnp.diff(bounds, axis=-1)
    nq = -(-n // bq)
    q_sizes = jnp.broadcast_to(jnp.minimum(bq, n - jnp.arange(nq) * bq), (s.batch, s.heads, nq)).astype(jnp.int32)
    sel = jax.random.uniform(k2, (s.batch, s.heads, nq, nkc)) < density
    sel = sel.at[..., 0].set(sel[..., 0] | ~sel.any(-1))
    qr, kr = pk.clusters_to_ranges(sel, q_sizes, k_sizes, block_q=bq, num_q_tokens=n)
    pairs = jnp.sum(qr[..., 1].astype(jnp.float32) * kr[..., 1].sum(-1))
    return qr, kr, float(pairs) / (s.batch * s.heads * n * n)


def bench_attention(s: AttnShape, densities, dtype, on_gpu, interpret, warmup, iters) -> list[dict]:
    keys = jax.random.split(jax.random.key(0), 5)
    q, k, v = (jax.random.normal(kk, (s.batch, s.tokens, s.heads, s.head_dim), dtype) for kk in keys[:3])
    item = jnp.dtype(dtype).itemsize
    dense_flops = 4.0 * s.batch * s.heads * s.tokens ** 2 * s.head_dim
    base = dense_baselines(q, k, v, on_gpu, warmup, iters)
    nq = nk = -(-s.tokens // s.block)
    qo_bytes = 2 * s.batch * s.tokens * s.heads * s.head_dim * item  # read q, write out
    rows = baseline_rows(s.name, base, dense_flops, qo_bytes * 2)
    for d in densities:
        bi = random_blocks(keys[3], s.batch, s.heads, nq, nk, d)
        f = jax.jit(lambda q, k, v, i: pk.block_sparse_attention(q, k, v, i, block_q=s.block, block_k=s.block,
                                                                  interpret=interpret))
        t, err = safe_time(lambda f=f, bi=bi: f(q, k, v, bi), warmup, iters)
        blocks = float(jnp.sum(bi.counts))
        flops = 4.0 * s.head_dim * s.block * s.block * blocks
        nbytes = qo_bytes + blocks * 2 * s.block * s.head_dim * item
        rows.append(_row("block_sparse", s.name, d, blocks / (s.batch * s.heads * nq * nk), t, err, flops,
                         dense_flops, nbytes, base))
        qr, kr, dens = random_clusters(keys[4], s, d)
        g = jax.jit(lambda q, k, v, qr, kr: pk.cluster_sparse_attention(q, k, v, kr, q_ranges=qr, block_q=s.block,
                                                                         block_k=s.block, interpret=interpret))
        t, err = safe_time(lambda g=g, qr=qr, kr=kr: g(q, k, v, qr, kr), warmup, iters)
        chunks = float(jnp.sum(jnp.ceil(kr[..., 1] / s.block) * (qr[..., 1:2] > 0)))
        flops = 4.0 * s.head_dim * s.block * s.block * chunks  # work done, masked tails included
        nbytes = qo_bytes + chunks * 2 * s.block * s.head_dim * item
        rows.append(_row("cluster_sparse", s.name, d, dens, t, err, flops, dense_flops, nbytes, base))
    return rows


def bench_kv(s: KVShape, bits_list, dtype, on_gpu, interpret, warmup, iters, hbm_gbps) -> list[dict]:
    keys = jax.random.split(jax.random.key(1), 5)
    shp = lambda t: (s.batch, t, s.heads, s.head_dim)
    q = jax.random.normal(keys[0], shp(s.queries), dtype)
    k = jax.random.normal(keys[1], shp(s.cached), dtype)
    v = jax.random.normal(keys[2], shp(s.cached), dtype)
    kw = jax.random.normal(keys[3], shp(s.queries), dtype)
    vw = jax.random.normal(keys[4], shp(s.queries), dtype)
    tk = s.cached + s.queries
    dense_flops = 4.0 * s.batch * s.heads * s.queries * tk * s.head_dim
    kd, vd = jnp.concatenate([k, kw], 1), jnp.concatenate([v, vw], 1)
    base = dense_baselines(q, kd, vd, on_gpu, warmup, iters)
    rows = baseline_rows(s.name, base, dense_flops, (q.size * 2 + kd.size * 2) * q.dtype.itemsize)
    for bits in bits_list:
        cache = kv.quantize_kv(k, v, kv.KVQuantConfig(bits=bits, group_size=s.group), k_recent=kw, v_recent=vw)
        f = jax.jit(lambda q, c: pk.quantized_kv_attention(q, c, block_q=s.block_q, interpret=interpret))
        t, err = safe_time(lambda f=f, cache=cache: f(q, cache), warmup, iters)
        nbytes = kv.bytes_held(cache) + 2 * q.size * q.dtype.itemsize  # every cache byte once, q in, out
        row = _row(f"quantized_kv_int{bits}", s.name, 1.0, 1.0, t, err, dense_flops, dense_flops, nbytes, base)
        row["hbm_fraction"] = row["gbytes_per_s"] / hbm_gbps if (t and on_gpu) else None
        row["cache_bytes"] = kv.bytes_held(cache)
        row["dense_bf16_kv_bytes"] = kv.dense_kv_bytes(s.batch, tk, s.heads, s.head_dim, jnp.bfloat16)
        rows.append(row)
    return rows


def baseline_rows(shape: str, base: dict, dense_flops: float, nbytes: float) -> list[dict]:
    """One row per dense baseline, so its own TFLOP/s sits next to the kernels' (speedup columns = 1)."""
    return [_row(f"dense_{impl}", shape, 1.0, 1.0, b["seconds"], b["error"], dense_flops, dense_flops, nbytes,
                 {impl: b}) for impl, b in base.items()]


def _row(kernel, shape, density, actual_density, t, err, flops, dense_flops, nbytes, base) -> dict:
    row = {"kernel": kernel, "shape": shape, "density": density, "actual_density": actual_density,
           "seconds": t, "error": err, "flops": flops, "dense_equiv_flops": dense_flops, "bytes": nbytes,
           "tflops_actual": None, "tflops_dense_equiv": None, "gbytes_per_s": None}
    if t:
        row.update(tflops_actual=flops / t / 1e12, tflops_dense_equiv=dense_flops / t / 1e12,
                   gbytes_per_s=nbytes / t / 1e9)
    for impl, b in base.items():
        row[f"{impl}_seconds"] = b["seconds"]
        row[f"{impl}_error"] = b["error"]
        row[f"speedup_vs_{impl}"] = b["seconds"] / t if (t and b["seconds"]) else None
    return row


def _fmt(x, spec="{:.3g}"):
    return "n/a" if x is None else spec.format(x)


def to_markdown(meta: dict, rows: list[dict]) -> str:
    impls = [i for i in ("xla", "cudnn") if any(f"{i}_seconds" in r for r in rows)]
    head = ["kernel", "shape", "density (actual)", "time ms", "TFLOP/s actual", "TFLOP/s dense-eq", "GB/s"]
    head += [f"vs {i} (x)" for i in impls]
    lines = [f"Device: {meta['device']} | jax {meta['jax']} | interpret={meta['interpret']} | {meta['dtype']} | "
             f"{meta['when']}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["kernel"], r["shape"], f"{r['density']:g} ({r['actual_density']:.3f})",
                 _fmt(r["seconds"] and r["seconds"] * 1e3) if not r["error"] else "failed",
                 _fmt(r["tflops_actual"]), _fmt(r["tflops_dense_equiv"]), _fmt(r["gbytes_per_s"])]
        if r.get("hbm_fraction") is not None:
            cells[-1] += f" ({100 * r['hbm_fraction']:.1f}% of HBM)"
        cells += [_fmt(r.get(f"speedup_vs_{i}"), "{:.2f}") if r.get(f"{i}_error") is None else "baseline failed"
                  for i in impls]
        lines.append("| " + " | ".join(cells) + " |")
    errs = {(r["kernel"], r["shape"]): r["error"] for r in rows if r["error"]}
    errs.update({(f"dense {i}", r["shape"]): r[f"{i}_error"] for r in rows for i in impls if r.get(f"{i}_error")})
    if errs:
        lines += ["", "Failures:"] + [f"- {a} @ {b}: {e}" for (a, b), e in errs.items()]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ the gather path
GATHER_DENSITIES = (1.0, 0.5, 0.25)
GATHER_KINDS = ("blocks, equal rows", "blocks, varied rows", "clusters")


def varied_blocks(key, b: int, h: int, nq: int, nk: int, density: float) -> pk.BlockIndices:
    """Random kv blocks per query block, with per-row counts drawn uniformly from 1..2 density nk - 1 (mean
    density x nk): the rows differ, as XAttention's do. Needs density <= (nk + 1) / (2 nk)."""
    hi = round(2 * density * nk) - 1
    if not 1 <= hi <= nk:
        raise ValueError(f"density={density} cannot vary around its mean with {nk} blocks per row")
    k1, k2 = jax.random.split(key)
    counts = jax.random.randint(k1, (b, h, nq), 1, hi + 1).astype(jnp.int32)
    idx = jnp.argsort(jax.random.uniform(k2, (b, h, nq, nk)), axis=-1).astype(jnp.int32)
    return pk.BlockIndices(jnp.where(jnp.arange(nk) < counts[..., None], idx, -1), counts)


def _selection(kind: str, keys, n: int, heads: int, head_dim: int, block: int, tile_q: int, cluster: int,
               density: float):
    """(gather args after q, k, v; selected fraction; fraction the gather path computes) of one selection."""
    if kind == "clusters":
        qr, kr, _ = random_clusters(keys[5], AttnShape("bench", 1, n, heads, head_dim, tile_q, cluster), density)
        cnt = jnp.where(qr[..., 1] > 0, kr[..., 1].sum(-1), 0)
        sel = float(jnp.sum(qr[..., 1] * cnt)) / (heads * n * n)
        return (qr, kr), sel, float(gather_work(cnt, n, row_len=tile_q)) * tile_q / (heads * n * n)
    nb = -(-n // block)
    equal = kind.endswith("equal rows")
    bi = (random_blocks if equal else varied_blocks)(keys[3 if equal else 4], 1, heads, nb, nb, density)
    sel = float(jnp.sum(bi.counts)) / (heads * nb * nb)
    done = float(gather_work(bi.counts, nb, row_len=block, unit=block)) / (heads * nb * nb)
    return (bi.indices, bi.counts), sel, done


def attention_bench(tokens=(512, 4096), *, heads: int = 4, head_dim: int = 32, block: int = 16, tile_q: int = 32,
                    cluster: int = 16, densities=GATHER_DENSITIES, reps: int = 20, seed: int = 0, log=print) -> dict:
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
    dense = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla"))
    blocks = (jax.jit(lambda q, k, v, i, c: pk.block_sparse_attention_gather(
                  q, k, v, pk.BlockIndices(i, c), block_q=block, block_k=block)),
              jax.jit(lambda q, k, v, i, c: block_sparse_attention_reference(
                  q, k, v, pk.BlockIndices(i, c), block_q=block, block_k=block)))
    clusters = (jax.jit(lambda q, k, v, qr, kr: pk.cluster_sparse_attention_gather(
                    q, k, v, kr, q_ranges=qr, block_q=tile_q, block_k=block)),
                jax.jit(lambda q, k, v, qr, kr: cluster_sparse_attention_reference(
                    q, k, v, kr, q_ranges=qr, block_q=tile_q, block_k=block)))
    rows = []
    for n in tokens:
        keys = jax.random.split(jax.random.key(seed + n), 6)
        q, k, v = (jax.random.normal(kk, (1, n, heads, head_dim), jnp.float32) for kk in keys[:3])
        nb = -(-n // block)
        with_ref = n <= 1024
        fns, cases = {"dense": lambda q=q, k=k, v=v: dense(q, k, v)}, []
        for d in densities:
            for kind in GATHER_KINDS:
                if kind == "blocks, varied rows" and round(2 * d * nb) - 1 > nb:
                    continue                    # a mean this high leaves no room to vary (density 1)
                sel_args, sel, done = _selection(kind, keys, n, heads, head_dim, block, tile_q, cluster, d)
                gfn, rfn = clusters if kind == "clusters" else blocks
                args = (q, k, v, *sel_args)
                name = f"{kind} @ {d:g}"
                fns[f"gather {name}"] = lambda f=gfn, a=args: f(*a)
                err = None
                if with_ref:
                    fns[f"reference {name}"] = lambda f=rfn, a=args: f(*a)
                    a, r = np.asarray(gfn(*args), np.float64), np.asarray(rfn(*args), np.float64)
                    err = float(np.linalg.norm(a - r) / np.linalg.norm(r))
                cases.append((name, kind, d, sel, done, err))
        times = interleaved_times(fns, reps if with_ref else max(3, reps // 4), warmup=1)
        med = {key: float(np.median(t)) for key, t in times.items()}
        for name, kind, d, sel, done, err in cases:
            g, dn = times[f"gather {name}"], times["dense"]
            row = {"tokens": n, "kind": kind, "density": d, "selected": round(sel, 4), "gathered": round(done, 4),
                   "dense_ms": round(1e3 * med["dense"], 3), "gather_ms": round(1e3 * med[f"gather {name}"], 3),
                   "gather_min_ms": round(1e3 * min(g), 3), "dense_min_ms": round(1e3 * min(dn), 3),
                   "gather_vs_dense": round(med[f"gather {name}"] / med["dense"], 3), "reference_ms": None,
                   "rel_l2_vs_reference": err}
            if with_ref:
                row["reference_ms"] = round(1e3 * med[f"reference {name}"], 3)
            rows.append(row)
            log(f"  {n} tokens, {name}: selected {sel:.3f}, gathered {done:.3f}, gather {row['gather_ms']} ms vs "
                f"dense {row['dense_ms']} ms ({row['gather_vs_dense']:.2f}x)")
    return {"heads": heads, "head_dim": head_dim, "block": block, "tile_q": tile_q, "cluster": cluster,
            "reps": reps, "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"), "rows": rows}


def bench_markdown(bench: dict, level: str = "#") -> str:
    """The gather-path benchmark (`attention_bench`) as markdown, under a heading of `level`."""
    cols = {"tokens": "tokens", "selection": "kind", "density": lambda r: f"{r['density']:g}",
            "selected": lambda r: f"{r['selected']:.3f}", "gathered": lambda r: f"{r['gathered']:.3f}",
            "dense ms": lambda r: f"{r['dense_ms']:.2f}",
            "gather ms (min)": lambda r: f"{r['gather_ms']:.2f} ({r['gather_min_ms']:.2f})",
            "reference ms": lambda r: "-" if r["reference_ms"] is None else f"{r['reference_ms']:.2f}",
            "gather / dense": lambda r: f"{r['gather_vs_dense']:.2f}"}
    return "\n".join([
        f"{level} Attention microbenchmark: one call, dense XLA vs the gather path", "",
        f"Batch 1, {bench['heads']} heads x {bench['head_dim']}, fp32, {bench['machine']}, {bench['date']}. "
        f"Blocks of {bench['block']} tokens; clusters of about {bench['cluster']} key tokens with query tiles "
        f"of {bench['tile_q']}. Median of {bench['reps']} interleaved runs (a quarter of that, at least 3, above "
        "1024 tokens). 'selected' is the fraction of the dense query-key work the selection keeps; "
        "'gathered' is what the gather path computes, padding to the bucket widths included.", "",
        markdown_table(bench["rows"], cols, align="rlrrrrrrr")]) + "\n"


def write_bench(bench: dict, out_dir) -> None:
    """`<out_dir>/attention_bench.json` and `.md`."""
    write_results(out_dir, "attention_bench", bench, bench_markdown(bench))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m experiments.bench_kernels", description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes (CPU, interpret mode, < 1 minute)")
    p.add_argument("--gather", action="store_true",
                   help="benchmark the plain-jnp gather path instead of the kernels (CPU, about a minute)")
    p.add_argument("--out", default=None, help="output folder (default results/kernels; results/sparse with --gather)")
    p.add_argument("--densities", default="1,0.5,0.25,0.1", help="kernel densities (default %(default)s)")
    p.add_argument("--tokens", default="512,4096", help="--gather: token counts (default %(default)s)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--bits", default="8,4")
    p.add_argument("--hbm-gbps", type=float, default=3350.0, help="HBM bandwidth for the KV bytes/s fraction "
                   "(default 3350 GB/s, H100 SXM)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None, help="timed runs (median reported; --gather: default 20)")
    a = p.parse_args(argv)
    if a.gather:
        tokens = tuple(int(x) for x in a.tokens.split(",") if x)
        if not tokens or min(tokens) < 1 or (a.iters is not None and a.iters < 1):
            p.error(f"--tokens must be positive counts and --iters >= 1; got {a.tokens!r}, {a.iters}")
        bench = attention_bench(tokens, reps=a.iters or 20)
        write_bench(bench, pathlib.Path(a.out or "results/sparse"))
        print(bench_markdown(bench))
        return bench
    on_gpu = jax.default_backend() == "gpu"
    interpret = not on_gpu
    if not a.smoke and not on_gpu:
        p.error("the full shapes need a GPU (interpret mode would take hours); use --smoke on CPU")
    warmup = a.warmup if a.warmup is not None else (2 if a.smoke else 3)
    iters = a.iters if a.iters is not None else (20 if a.smoke else 10)
    densities = [float(x) for x in a.densities.split(",")]
    if any(not 0 < d <= 1 for d in densities):
        p.error(f"densities must lie in (0, 1], got {densities}")
    dtype = jnp.dtype(a.dtype)
    t0 = time.perf_counter()
    rows = []
    for s in (SMOKE_ATTN if a.smoke else GPU_ATTN):
        rows += bench_attention(s, densities, dtype, on_gpu, interpret, warmup, iters)
    for s in (SMOKE_KV if a.smoke else GPU_KV):
        rows += bench_kv(s, [int(b) for b in a.bits.split(",")], dtype, on_gpu, interpret, warmup, iters, a.hbm_gbps)
    meta = {"device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(), "jax": jax.__version__,
            "interpret": interpret, "dtype": a.dtype, "smoke": a.smoke, "warmup": warmup, "iters": iters,
            "hbm_gbps": a.hbm_gbps, "when": datetime.datetime.now().isoformat(timespec="seconds"),
            "wall_seconds": round(time.perf_counter() - t0, 1),
            "shapes": [dataclasses.asdict(s) for s in (SMOKE_ATTN + SMOKE_KV if a.smoke else GPU_ATTN + GPU_KV)]}
    stem = "kernels_smoke" if a.smoke else "kernels"
    md = to_markdown(meta, rows)
    path = write_results(a.out or "results/kernels", stem, {"meta": meta, "rows": rows}, md)[0]
    print(md)
    print(f"wrote {path.with_suffix('')}.json and .md in {meta['wall_seconds']} s")
    return {"meta": meta, "rows": rows}


if __name__ == "__main__":
    main()
