"""Benchmark the Pallas attention kernels against jax.nn.dot_product_attention (not a test).

For every shape and density: median wall time after warm-up, actual and dense-equivalent TFLOP/s, bytes/s
(minimal HBM traffic / time) and the speed ratio to dense attention at the same shape (implementation "xla",
plus "cudnn" on GPU), all measured in this one process. Writes `<out>/kernels[_smoke].json` and `.md`.

    python -m experiments.bench_kernels                 # GPU: Wan 1.3B 480p and 14B 720p shapes
    python -m experiments.bench_kernels --smoke         # CPU: tiny shapes, interpret mode, < 1 minute

On CPU the kernels run in Pallas interpret mode, so smoke times measure the interpreter, not a kernel.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import pathlib
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

import pallas_kernels as pk
from pallas_kernels import kv_quantization as kv


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
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def safe_time(fn, warmup, iters) -> tuple[float | None, str | None]:
    try:
        return timeit(fn, warmup, iters), None
    except Exception as e:  # e.g. XLA dense attention running out of memory at 75,600 tokens
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"


def dense_baselines(q, k, v, on_gpu, warmup, iters, mask=None) -> dict[str, dict]:
    out = {}
    for impl in ["xla"] + (["cudnn"] if on_gpu else []):
        f = jax.jit(lambda q, k, v, impl=impl: jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl))
        t, err = safe_time(lambda: f(q, k, v), warmup, iters)
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
        t, err = safe_time(lambda: f(q, k, v, bi), warmup, iters)
        blocks = float(jnp.sum(bi.counts))
        flops = 4.0 * s.head_dim * s.block * s.block * blocks
        nbytes = qo_bytes + blocks * 2 * s.block * s.head_dim * item
        rows.append(_row("block_sparse", s.name, d, blocks / (s.batch * s.heads * nq * nk), t, err, flops,
                         dense_flops, nbytes, base))
        qr, kr, dens = random_clusters(keys[4], s, d)
        g = jax.jit(lambda q, k, v, qr, kr: pk.cluster_sparse_attention(q, k, v, kr, q_ranges=qr, block_q=s.block,
                                                                         block_k=s.block, interpret=interpret))
        t, err = safe_time(lambda: g(q, k, v, qr, kr), warmup, iters)
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
        t, err = safe_time(lambda: f(q, cache), warmup, iters)
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


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes (CPU, interpret mode, < 1 minute)")
    p.add_argument("--out", default="results/kernels", help="output folder (default results/kernels)")
    p.add_argument("--densities", default="1,0.5,0.25,0.1")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--bits", default="8,4")
    p.add_argument("--hbm-gbps", type=float, default=3350.0, help="HBM bandwidth for the KV bytes/s fraction "
                   "(default 3350 GB/s, H100 SXM)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    a = p.parse_args(argv)
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
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "kernels_smoke" if a.smoke else "kernels"
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    md = to_markdown(meta, rows)
    (out / f"{stem}.md").write_text(md)
    print(md)
    print(f"wrote {out / stem}.json and .md in {meta['wall_seconds']} s")
    return {"meta": meta, "rows": rows}


if __name__ == "__main__":
    main()
