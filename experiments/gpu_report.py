"""One prepared GPU run (issue 19): the kernels compiled and checked, their speed at Wan shapes, and one step.

    JAX_PLATFORMS=cuda PYTHONPATH=. python3 -m experiments.gpu_report --out "$OUT"     # scripts/gpu_check.sh
    python -m experiments.gpu_report --out /tmp/dry --dry-run                        # CPU: tiny shapes, ~1-2 min

Parts (`--parts`, in this order), each run in its own subprocess under its own time limit (clamped to what is
left of `--budget-s`); a part that times out or raises is recorded as such and the next part runs:
- env: devices, versions, `nvidia-smi`;
- correctness: block-sparse, cluster-range and quantized-KV (int8, int4) kernels, compiled (`interpret=False`)
  on GPU, against their jnp references in fp32 and bf16, on the tests' shapes and larger ones;
- kernels: `experiments.bench_kernels` at the Wan 1.3B 480p and 14B 720p shapes (bf16, densities 0.1-1)
  against cuDNN and XLA dense attention, the speedup against the ideal 1/density, and the quantized-KV
  kernel's bytes/s against a measured device-to-device copy;
- step / step14b: one denoising step of Wan2.1-1.3B at 480p x 81 frames (14B at 720p) with random bf16
  weights: dense (cuDNN), XAttention-style prediction plus the block-sparse kernel at a fixed density (random
  weights have no attention structure, so the density is set, not found), the same mask without prediction,
  a HASTE mask-reuse step (TMR drift check + that mask), the prediction alone, and a TeaCache skip step
  (embed, indicator, cached residual, head).
Writes `<out>/report.json`, `report.md`, `gpu_report.log` and per part `parts/<part>.json` (saved after every
row, so a part killed at its limit keeps what it measured) and `parts/<part>.stderr`.
`--dry-run`: tiny shapes, Pallas interpret mode, the same code paths.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib.metadata
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import pallas_kernels as pk
from experiments import bench_kernels as bk
from experiments.harness import interleaved_times, markdown_table
from experiments.haste import drift, pool_blocks
from experiments.xattention import antidiagonal_scores
from models.wan import abstract_transformer, wan21_t2v_1_3b, wan21_t2v_14b, wan_tiny
from pallas_kernels import kv_quantization as kv
from pallas_kernels import reference as R
from vidaccel.attention import dense_attention
from vidaccel.residual_cache import relative_change

PARTS = ("env", "correctness", "kernels", "step", "step14b")
LIMITS_S = {"env": 25, "correctness": 90, "kernels": 140, "step": 150, "step14b": 240}  # GPU, per part
DRY_LIMIT_S = 240    # generous: a loaded shared CPU can be several times slower than an idle one
MIN_START_S = 15       # a part is skipped when less than this is left of the budget
TOL = {"float32": 1e-5, "bfloat16": 1e-2}   # relative L2 to the reference, as in the kernel tests
DENSITIES = (1.0, 0.5, 0.25, 0.1)
GOALS = {"dense_vs_cudnn": 0.9, "speedup_at_0.25": 3.0, "int8_copy_fraction": 0.85}
_T0 = time.monotonic()


# ------------------------------------------------------------------------------------------- bookkeeping
def log(out: Path, msg: str) -> None:
    """Print a progress line (flushed) and append it to `<out>/gpu_report.log`."""
    line = f"[{time.monotonic() - _T0:7.1f}s] {msg}"
    print(line, flush=True)
    with open(out / "gpu_report.log", "a") as f:
        f.write(line + "\n")


class Recorder:
    """A part's results, rewritten to `<out>/parts/<part>.json` after every row."""

    def __init__(self, out: Path, part: str):
        self.out, self.path = out, out / "parts" / f"{part}.json"
        self.data: dict = {"part": part, "rows": [], "done": False}
        self.save()

    def add(self, row: dict) -> None:
        self.data["rows"].append(row)
        self.save()
        log(self.out, "  " + ", ".join(f"{k}={_short(v)}" for k, v in row.items() if v is not None))

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(self.path)


def _short(v):
    return f"{v:.4g}" if isinstance(v, float) else v


def _err(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"


# ------------------------------------------------------------------------------------------- env
def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def part_env(rec: Recorder, dry: bool) -> None:
    try:
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError) as e:
        smi = f"not available ({_err(e)})"
    rec.data.update(backend=jax.default_backend(), devices=[str(d) for d in jax.devices()],
                    device_kind=jax.devices()[0].device_kind, python=platform.python_version(),
                    versions={p: _version(p) for p in ("jax", "jaxlib", "jax-cuda13-plugin", "flax", "optax",
                                                       "orbax-checkpoint", "chex", "numpy")},
                    jax_platforms=os.environ.get("JAX_PLATFORMS"), nvidia_smi=smi)
    rec.add({"check": "devices", "count": len(jax.devices()), "kind": jax.devices()[0].device_kind})


# ------------------------------------------------------------------------------------------- correctness
def _compare(rec: Recorder, kernel: str, shape: str, interp: bool, fn, ref, *args, **kw) -> None:
    """One row: `fn(*args, interpret=interp, **kw)` against `ref(*args, **kw)` (args[0] is q, in the dtype)."""
    dt = jnp.dtype(args[0].dtype).name
    row = {"kernel": kernel, "shape": shape, "dtype": dt, "tolerance_rel_l2": TOL[dt]}
    try:
        t0 = time.perf_counter()
        out = np.asarray(jax.block_until_ready(fn(*args, interpret=interp, **kw)), np.float64)
        row["kernel_s"] = time.perf_counter() - t0   # compilation included
        expect = np.asarray(ref(*args, **kw), np.float64)
        finite = bool(np.isfinite(out).all())
        rel = float(np.linalg.norm(out - expect) / max(np.linalg.norm(expect), 1e-30))
        row.update(max_abs_err=float(np.abs(out - expect).max()), rel_l2=rel, finite=finite,
                   passed=finite and rel <= row["tolerance_rel_l2"], error=None)
    except Exception as e:  # a kernel that fails to compile is a failed row, not a lost part
        row.update(max_abs_err=None, rel_l2=None, finite=None, passed=False, error=_err(e))
    rec.add(row)


def _qkv(seed, b, t, h, d, dtype):
    ks = jax.random.split(jax.random.key(seed), 3)
    return tuple((jax.random.normal(k, (b, t, h, d)) * s).astype(dtype) for k, s in zip(ks, (1.5, 1.0, 1.0)))


def part_correctness(rec: Recorder, dry: bool) -> None:
    interp = dry or jax.default_backend() != "gpu"
    rec.data["interpret"] = interp
    # (name, batch, tokens, heads, head_dim, block_q, block_k): the tests' shape first, then larger ones
    if dry:
        stages = [([("dry", 1, 80, 2, 32, 32, 16)], [bk.AttnShape("dry", 1, 80, 2, 32, 32, 12)],
                   [bk.KVShape("dry", 2, 16, 64, 2, 32, 32, 16)])]
    else:   # the tests' shapes first (every kernel and dtype), then the large ones
        stages = [([("tests", 2, 150, 3, 32, 32, 16)], [bk.AttnShape("tests", 2, 120, 2, 32, 32, 12)],
                   [bk.KVShape("tests", 3, 40, 150, 2, 32, 32, 16)]),
                  ([("4096", 1, 4096, 4, 128, 128, 128), ("32760", 1, 32760, 1, 128, 128, 128)],
                   [bk.AttnShape("4096", 1, 4096, 4, 128, 128, 33), bk.AttnShape("32760", 1, 32760, 1, 128, 128, 33)],
                   bk.GPU_KV)]
    for blocks, clusters, kvs in stages:
        for dtype in (jnp.float32, jnp.bfloat16):
            _check_stage(rec, interp, dtype, blocks, clusters, kvs)


def _check_stage(rec: Recorder, interp: bool, dtype, blocks, clusters, kvs) -> None:
    for name, b, t, h, d, bq, bkk in blocks:
        q, k, v = _qkv(0, b, t, h, d, dtype)
        mask = jax.random.bernoulli(jax.random.key(1), 0.3, (b, h, -(-t // bq), -(-t // bkk)))
        mask = mask.at[0, 0, 1, :].set(False).at[0, -1, 0, :].set(True)   # an empty row and a full row
        _compare(rec, "block_sparse", name, interp, pk.block_sparse_attention, R.block_sparse_attention_reference,
                 q, k, v, mask, block_q=bq, block_k=bkk)
    for s in clusters:
        q, k, v = _qkv(2, s.batch, s.tokens, s.heads, s.head_dim, dtype)
        qr, kr, _ = bk.random_clusters(jax.random.key(3), s, 0.3)
        _compare(rec, "cluster_sparse", s.name, interp, pk.cluster_sparse_attention,
                 R.cluster_sparse_attention_reference, q, k, v, kr, q_ranges=qr, block_q=s.block, block_k=s.block)
    for s in kvs:
        ks = jax.random.split(jax.random.key(4), 5)
        q = jax.random.normal(ks[0], (s.batch, s.queries, s.heads, s.head_dim)).astype(dtype)
        past = [jax.random.normal(kk, (s.batch, s.cached, s.heads, s.head_dim)) for kk in ks[1:3]]
        win = [jax.random.normal(kk, (s.batch, s.queries, s.heads, s.head_dim)) for kk in ks[3:]]
        qlen = jnp.full((s.batch,), s.queries, jnp.int32).at[-1].set(max(1, s.queries // 2))
        for bits in (8, 4):
            cache = kv.quantize_kv(*past, kv.KVQuantConfig(bits=bits, group_size=s.group), k_recent=win[0],
                                   v_recent=win[1])
            if s.batch > 1:   # a shorter cache and window in batch 0, as in the tests
                cache = cache.replace(length=cache.length.at[0].set(s.cached - s.group),
                                      recent_length=cache.recent_length.at[0].set(s.queries // 3))
            _compare(rec, f"quantized_kv_int{bits}", s.name, interp, pk.quantized_kv_attention,
                     R.quantized_kv_attention_reference, q, cache, q_lengths=qlen, block_q=s.block_q)


# ------------------------------------------------------------------------------------------- kernels
def copy_bandwidth(nbytes: int, warmup: int, iters: int) -> float:
    """Device-to-device copy GB/s (bytes read + bytes written) of an `nbytes` float32 array, x -> x * 2."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    f = jax.jit(lambda x: x * 2)
    return 2 * x.nbytes / bk.timeit(lambda: f(x), warmup, iters) / 1e9


def _ideal(row: dict, copy_gbps: float) -> dict:
    """Add the speedup over dense (cuDNN if measured, else XLA) against the ideal 1/density, and the fraction
    of the measured copy bandwidth."""
    ref = "cudnn" if row.get("speedup_vs_cudnn") is not None else "xla"
    sp, dens = row.get(f"speedup_vs_{ref}"), row["actual_density"]
    row.update(ideal_vs=ref, ideal_speedup=1 / dens, fraction_of_ideal=sp * dens if sp else None,
               copy_gbps=copy_gbps, copy_fraction=row["gbytes_per_s"] / copy_gbps if row["gbytes_per_s"] else None)
    return row


def part_kernels(rec: Recorder, dry: bool) -> None:
    on_gpu = jax.default_backend() == "gpu"
    interp = dry or not on_gpu
    warmup, iters = (1, 2) if dry else (2, 5)
    copy = copy_bandwidth(2 ** 22 if dry else 2 ** 30, warmup, iters + 5)
    rec.data.update(copy_gbps=copy, interpret=interp, warmup=warmup, iters=iters, dtype="bfloat16")
    log(rec.out, f"  device-to-device copy: {copy:.1f} GB/s")
    attn = bk.SMOKE_ATTN if dry else bk.GPU_ATTN
    kvs = bk.SMOKE_KV if dry else bk.GPU_KV
    densities = (0.25,) if dry else DENSITIES
    todo = [("attn", attn[0])] + [("kv", s) for s in kvs] + [("attn", s) for s in attn[1:]]
    for kind, s in todo:
        log(rec.out, f"  {kind} {s.name}")
        rows = (bk.bench_attention(s, densities, jnp.bfloat16, on_gpu, interp, warmup, iters) if kind == "attn" else
                bk.bench_kv(s, [8, 4], jnp.bfloat16, on_gpu, interp, warmup, iters, copy))
        for r in rows:
            rec.add(_ideal(r, copy))


# ------------------------------------------------------------------------------------------- one step
def random_model(cfg, seed: int = 0):
    """(graphdef, state) of a Wan transformer with ~N(0, 0.02) weights, made fast: one random draw of at most
    2^26 numbers, each leaf a shifted slice of it, tiled where the leaf is longer (no initialiser runs; the
    weights only need to be finite and unstructured)."""
    graphdef, abstract = nnx.split(abstract_transformer(cfg))
    leaves, treedef = jax.tree.flatten(abstract)
    shift, chunk = 4099, min(2 ** 26, max(math.prod(x.shape) for x in leaves))

    def leaf(base, i, x):
        n = math.prod(x.shape)
        seg = jax.lax.dynamic_slice_in_dim(base, (i * 577) % shift, min(n, chunk))
        return jnp.tile(seg, -(-n // seg.size))[:n].reshape(x.shape).astype(x.dtype)

    @jax.jit
    def fill(key):
        base = jax.random.normal(key, (chunk + shift,), jnp.bfloat16) * 0.02
        return [leaf(base, i, x) for i, x in enumerate(leaves)]

    return graphdef, jax.tree.unflatten(treedef, fill(jax.random.key(seed)))


def predicted_blocks(q, k, density: float, block: int, stride: int) -> pk.BlockIndices:
    """XAttention's antidiagonal block importance, then the top round(density x nk) blocks per query block."""
    a = antidiagonal_scores(q, k, stride, block)
    n = max(1, round(density * a.shape[-1]))
    idx = jax.lax.top_k(a, n)[1].astype(jnp.int32)
    return pk.BlockIndices(idx, jnp.full(a.shape[:3], n, jnp.int32))


def step_case(big: bool, dry: bool):
    """(config, latent shape, text length, block, stride, densities) of the part."""
    if dry:
        return wan_tiny(param_dtype="bfloat16", dtype="bfloat16"), (1, 2, 16, 16, 4), 8, 32, 4, () if big else (0.25,)
    if big:   # 720p x 81 frames: 21 x 90 x 160 latents -> 75,600 tokens
        return wan21_t2v_14b(param_dtype="bfloat16", dtype="bfloat16"), (1, 21, 90, 160, 16), 512, 128, 8, (0.25,)
    return wan21_t2v_1_3b(param_dtype="bfloat16", dtype="bfloat16"), (1, 21, 60, 104, 16), 512, 128, 8, (0.25, 0.1)


def part_step(rec: Recorder, dry: bool, big: bool = False) -> None:
    on_gpu = jax.default_backend() == "gpu"
    interp = dry or not on_gpu
    cfg, shape, text_len, block, stride, densities = step_case(big, dry)
    reps = 1 if (dry or big) else 3
    t0 = time.perf_counter()
    graphdef, state = random_model(cfg)
    jax.block_until_ready(state)
    ks = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(ks[0], shape, jnp.bfloat16)
    ctx = jax.random.normal(ks[1], (1, text_len, cfg.text_dim), jnp.bfloat16)
    t = jnp.full((1,), 500.0, jnp.float32)
    tokens = math.prod(s // p for s, p in zip(shape[1:4], cfg.patch_size))
    h, d, nb = cfg.num_attention_heads, cfg.attention_head_dim, -(-tokens // block)
    rec.data.update(model=f"{cfg.num_layers} layers x {h} heads x {d}", latents=shape, tokens=tokens, block=block,
                    init_s=time.perf_counter() - t0, interpret=interp, reps=reps,
                    note="random weights: densities are set (top-k of XAttention's antidiagonal scores), not found; "
                         "fixed_mask = the density's attention alone, haste_tmr_reuse = a HASTE step that reuses its "
                         "mask (drift check + fixed mask), xattention_topk = prediction + kernel every layer")
    log(rec.out, f"  random bf16 weights in {rec.data['init_s']:.1f} s; {tokens} tokens")

    def forward(attention):
        return jax.jit(lambda st, x, t, c: nnx.merge(graphdef, st)(x, t, c, attention=attention))

    def sparse(density, fixed, anchors=None):
        def attn(q, k, v, info, ls):
            bi = fixed if fixed is not None else predicted_blocks(q, k, density, block, stride)
            out = pk.block_sparse_attention(q, k, v, bi, block_q=block, block_k=block, interpret=interp)
            if anchors is not None:   # HASTE's TMR reuse step: the drift check (pooled logits), then the old mask
                dr = drift(pool_blocks(q, block), pool_blocks(k, block), *anchors)
                out = jnp.where(jnp.max(dr) < jnp.inf, out, jnp.zeros_like(out))
            return out, ls
        return attn

    emb_shape = jax.eval_shape(lambda st: nnx.merge(graphdef, st).embed(x, t, ctx), state)
    residual = jnp.zeros(emb_shape.tokens.shape, emb_shape.tokens.dtype)
    prev_e0 = jnp.ones(emb_shape.e0.shape, emb_shape.e0.dtype)

    @jax.jit
    def skip(st, x, t, c, residual, prev_e0):
        emb = nnx.merge(graphdef, st).embed(x, t, c)
        return nnx.merge(graphdef, st).head(emb.tokens + residual, emb), relative_change(emb.e0, prev_e0)

    qk = [jax.random.normal(kk, (1, tokens, h, d), jnp.bfloat16) for kk in jax.random.split(ks[2], 2)]
    anchors = [pool_blocks(a, block) for a in qk]

    def dense(q, k, v, info, ls):   # cuDNN takes bf16 only (a no-op cast when q, k, v are bf16 already)
        if on_gpu:
            q, k, v = (a.astype(jnp.bfloat16) for a in (q, k, v))
        return dense_attention(q, k, v, info, ls, implementation="cudnn" if on_gpu else None)

    variants = [("dense", 1.0, forward(dense), (state, x, t, ctx)),
                ("teacache_skip", None, skip, (state, x, t, ctx, residual, prev_e0))]
    for dens in densities:   # the density's own time first, XAttention's whole step (slowest to compile) last
        fixed = bk.random_blocks(jax.random.key(5), 1, h, nb, nb, dens)
        variants += [(f"fixed_mask@{dens}", dens, forward(sparse(dens, fixed)), (state, x, t, ctx)),
                     (f"mask_prediction@{dens} x {cfg.num_layers} layers", dens,
                      jax.jit(functools.partial(predicted_blocks, density=dens, block=block, stride=stride)), qk),
                     (f"haste_tmr_reuse@{dens}", dens, forward(sparse(dens, fixed, anchors)), (state, x, t, ctx)),
                     (f"xattention_topk@{dens}", dens, forward(sparse(dens, None)), (state, x, t, ctx))]
    dense_s = None
    for name, dens, fn, args in variants:
        row = {"variant": name, "density": dens}
        try:
            t1 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            row["first_call_s"] = time.perf_counter() - t1
            sec = float(np.median(interleaved_times({name: lambda fn=fn, args=args: fn(*args)}, reps)[name]))
            if name.startswith("mask_prediction"):
                sec *= cfg.num_layers   # one call per layer in a step
            dense_s = sec if name == "dense" else dense_s
            row.update(seconds=sec, vs_dense=dense_s / sec if dense_s else None, error=None)
        except Exception as e:  # e.g. out of memory at 720p: record it, time the next variant
            row.update(seconds=None, vs_dense=None, error=_err(e))
        rec.add(row)


RUNNERS = {"env": part_env, "correctness": part_correctness, "kernels": part_kernels, "step": part_step,
           "step14b": functools.partial(part_step, big=True)}


# ------------------------------------------------------------------------------------------- orchestration
def part_command(name: str, out: Path, dry: bool) -> list[str]:
    return [sys.executable, "-m", "experiments.gpu_report", "--out", str(out), "--part", name] + (["--dry-run"] * dry)


def run_part(name: str, cmd: list[str], limit_s: float, out: Path) -> dict:
    """Run one part's command in its own process group; kill it at `limit_s`. Returns its record: status "ok",
    "error" (non-zero exit, or no final results) or "timed_out", with whatever rows it saved."""
    (out / "parts").mkdir(parents=True, exist_ok=True)
    log(out, f"part {name}: limit {limit_s:.0f} s")
    path = out / "parts" / f"{name}.json"
    path.unlink(missing_ok=True)   # never read a previous run's results as this one's
    t0 = time.monotonic()
    with open(out / "parts" / f"{name}.stderr", "w") as err:
        proc = subprocess.Popen(cmd, stderr=err, start_new_session=True)
        try:
            rc = proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    data = json.loads(path.read_text()) if path.exists() else {"rows": []}
    status = "timed_out" if rc is None else ("ok" if rc == 0 and data.get("done") else "error")
    tail = (out / "parts" / f"{name}.stderr").read_text()[-2000:]
    rec = {**data, "part": name, "status": status, "returncode": rc, "seconds": time.monotonic() - t0,
           "limit_s": limit_s, "stderr_tail": tail if status == "error" else None}
    log(out, f"part {name}: {status} in {rec['seconds']:.1f} s, {len(rec['rows'])} rows")
    return rec


def orchestrate(out: Path, parts, dry: bool, budget_s: float, command=part_command, limits=None) -> dict:
    """Run `parts` in order, each under min(its limit, what is left of the budget); write the report."""
    out.mkdir(parents=True, exist_ok=True)
    limits = limits or ({p: DRY_LIMIT_S for p in PARTS} if dry else LIMITS_S)
    t0 = time.monotonic()
    log(out, f"gpu_report: parts {list(parts)}, budget {budget_s:.0f} s, dry_run={dry}")
    recs = {}
    for name in parts:
        left = budget_s - (time.monotonic() - t0)
        if left < min(MIN_START_S, limits[name]):
            recs[name] = {"part": name, "status": "skipped", "rows": [], "seconds": 0.0, "limit_s": 0.0,
                          "note": f"only {left:.0f} s of the budget left"}
            log(out, f"part {name}: skipped ({left:.0f} s left)")
            continue
        recs[name] = run_part(name, command(name, out, dry), min(limits[name], left), out)
    report = {"when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "dry_run": dry,
              "budget_s": budget_s, "seconds": time.monotonic() - t0, "parts": recs}
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    md = to_markdown(report)
    (out / "report.md").write_text(md)
    print(md.split("\n## ")[0], flush=True)   # the parts' status table
    log(out, f"wrote {out / 'report.json'} and report.md in {report['seconds']:.1f} s")
    return report


# ------------------------------------------------------------------------------------------- report
def _f(spec):
    return lambda r, k: "-" if r.get(k) is None else format(r[k], spec)


def _cols(spec: dict) -> dict:
    return {head: (lambda r, k=k, f=f: f(r, k)) if f else k for head, (k, f) in spec.items()}


def goals(rows: list[dict]) -> list[str]:
    """The issue's acceptance goals, checked on the kernel rows (cuDNN baselines only)."""
    out = []
    for r in rows:
        sp, d = r.get("speedup_vs_cudnn"), r["density"]
        if r["kernel"] in ("block_sparse", "cluster_sparse") and sp is not None and d in (1.0, 0.25):
            goal = GOALS["dense_vs_cudnn"] if d == 1.0 else GOALS["speedup_at_0.25"]
            out.append(f"{r['kernel']} {r['shape']} density {d:g}: {sp:.2f}x cuDNN (goal >= {goal:g}x): "
                       f"{'met' if sp >= goal else 'NOT met'}")
        if r["kernel"] == "quantized_kv_int8" and r.get("copy_fraction") is not None and r.get("speedup_vs_cudnn"):
            g = GOALS["int8_copy_fraction"]
            out.append(f"int8 KV {r['shape']}: {100 * r['copy_fraction']:.0f}% of copy bandwidth (goal >= "
                       f"{100 * g:.0f}%): {'met' if r['copy_fraction'] >= g else 'NOT met'}")
    return out or ["no cuDNN baseline measured (not a GPU run)"]


def to_markdown(report: dict) -> str:
    p = report["parts"]
    lines = [f"# GPU report ({'dry run, interpret mode' if report['dry_run'] else 'compiled'}), {report['when']}", "",
             markdown_table(list(p.values()), _cols({"part": ("part", None), "status": ("status", None),
                                                     "seconds": ("seconds", _f(".1f")),
                                                     "limit s": ("limit_s", _f(".0f")), "rows": ("rows", lambda r, k:
                                                                                                  len(r[k]))}))]
    env = p.get("env", {})
    if env.get("devices"):
        lines += ["", "## Environment", "", f"{env['device_kind']} ({env['backend']}): {env['devices']}",
                  f"versions: {env['versions']}, python {env['python']}", "", "```", env["nvidia_smi"].strip(), "```"]
    if p.get("correctness", {}).get("rows"):
        rows = p["correctness"]["rows"]
        lines += ["", f"## Correctness (interpret={p['correctness'].get('interpret')}): "
                  f"{sum(r.get('passed') is True for r in rows)}/{len(rows)} passed", "",
                  markdown_table(rows, _cols({"kernel": ("kernel", None), "shape": ("shape", None),
                                              "dtype": ("dtype", None), "max abs err": ("max_abs_err", _f(".2e")),
                                              "rel L2": ("rel_l2", _f(".2e")), "tol": ("tolerance_rel_l2", _f("g")),
                                              "passed": ("passed", None), "error": ("error", None)}))]
    kern = p.get("kernels", {})
    if kern.get("rows"):
        meta = {"device": env.get("device_kind", "?"), "jax": jax.__version__, "interpret": kern.get("interpret"),
                "dtype": "bfloat16", "when": report["when"]}
        lines += ["", f"## Kernel speed (copy bandwidth {kern.get('copy_gbps', 0):.1f} GB/s)", "",
                  bk.to_markdown(meta, kern["rows"]), "Speedup over dense against the ideal 1/density:", "",
                  markdown_table([r for r in kern["rows"] if not r["kernel"].startswith("dense")], _cols({
                      "kernel": ("kernel", None), "shape": ("shape", None), "density": ("actual_density", _f(".3f")),
                      "vs": ("ideal_vs", None), "ideal x": ("ideal_speedup", _f(".2f")),
                      "of ideal": ("fraction_of_ideal", _f(".2f")), "of copy BW": ("copy_fraction", _f(".2f"))})),
                  "", "Goals:", ""] + [f"- {g}" for g in goals(kern["rows"])]
    for name in ("step", "step14b"):
        s = p.get(name, {})
        if s.get("rows"):
            lines += ["", f"## One denoising step: {name} ({s.get('model')}, {s.get('tokens')} tokens, "
                      f"interpret={s.get('interpret')})", "", s.get("note", ""), "",
                      markdown_table(s["rows"], _cols({"variant": ("variant", None), "density": ("density", None),
                                                       "seconds": ("seconds", _f(".4g")),
                                                       "first call s": ("first_call_s", _f(".1f")),
                                                       "dense / this": ("vs_dense", _f(".2f")),
                                                       "error": ("error", None)}))]
    bad = [f"- {n}: {r['status']}" + (f"\n```\n{r['stderr_tail']}\n```" if r.get("stderr_tail") else "")
           for n, r in p.items() if r["status"] != "ok"]
    return "\n".join(lines + (["", "## Parts not ok", ""] + bad if bad else [])) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m experiments.gpu_report", description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes, interpret mode (CPU, about 1-2 minutes)")
    ap.add_argument("--parts", default=",".join(PARTS), help="comma-separated parts (default %(default)s)")
    ap.add_argument("--budget-s", type=float, default=480.0, help="wall budget of the whole run (default 480)")
    ap.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)   # internal: run one part in this process
    a = ap.parse_args(argv)
    out = Path(a.out)
    if a.part:
        if not a.dry_run:   # a rerun on a still-warm machine reuses the compiled programs
            jax.config.update("jax_compilation_cache_dir", "/tmp/vidaccel_jax_cache")
        rec = Recorder(out, a.part)
        log(out, f"{a.part}: backend {jax.default_backend()}, {jax.devices()[0].device_kind}")
        RUNNERS[a.part](rec, a.dry_run)
        rec.data["done"] = True
        rec.save()
        return rec.data
    parts = [x for x in a.parts.split(",") if x]
    if not parts or set(parts) - set(PARTS):
        ap.error(f"--parts must name some of {PARTS}, got {a.parts!r}")
    if a.budget_s <= 0:
        ap.error(f"--budget-s must be positive, got {a.budget_s}")
    return orchestrate(out, parts, a.dry_run, a.budget_s)


if __name__ == "__main__":
    main()
