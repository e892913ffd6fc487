"""Real-size compile report for Wan2.1-14B on device meshes (issue 17): no weights, no accelerator needed.

    nice python -m experiments.parallel_report                  # writes results/parallel/compile_report.{json,md}
    python -m experiments.parallel_report --small --out /tmp/pr  # smoke run: 2 layers, a small video

For every mesh it lowers and compiles one guided denoising step (both CFG branches, bf16 weights and
activations) of `wan21_t2v_14b` at 720p x 81 frames (latents (1, 21, 90, 160, 16) = 75,600 tokens, 512 text
tokens) against abstract inputs (`jax.ShapeDtypeStruct` with shardings) on virtual CPU devices, and reads:
- per-device memory from `compiled.memory_analysis()` (arguments = the device's parameter shard and inputs,
  temporaries, outputs; peak = their sum less aliased bytes), and which of 16 / 80 / 141 GB devices it fits;
- the bytes of every collective in the compiled HLO (all-to-all, collective-permute, all-gather, all-reduce,
  reduce-scatter result buffers per device), each multiplied by the trip counts of the loops it sits in
  (the layer scan, the ring scan), against a first-principles count: Ulysses = 4 all-to-alls of the local
  activation (T/P x D) per layer per call, ring = K and V blocks passed P - 1 times per layer per call, FSDP =
  every sharded weight gathered once per call, CFG-parallel = one all-gather of the velocity per step.
Self-attention is scored 675 queries at a time (Ulysses: `vidaccel.blockwise_attention.blockwise`
inside, keys in tiles of 1024; ring: `q_chunk`), a memory-bounded stand-in for a flash kernel; a GPU/TPU
flash kernel holds less, so temporaries here are an upper bound for the attention part. CPU compiles do
not model a GPU's fusion or scheduling exactly; the collective bytes are set by the sharding (but see
NOTES on the f32 upcast).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from experiments.harness import markdown_table
from models.wan import abstract_transformer, wan21_t2v_14b
from models.wan.sharding import WAN_RULES, parallel_wan_denoiser
from vidaccel.blockwise_attention import blockwise
from vidaccel.parallel import (
    CFGContext,
    batch_axes,
    cfg_parallel_denoiser,
    make_mesh,
    param_shardings,
)
from vidaccel.sampling import guided_velocity
from vidaccel.transforms import CFGBranches, DenoiseSpec

# (devices, mesh spec, sequence-parallel attention). 40 heads: Ulysses needs seq in {1,2,4,5,8,10,20,40};
# 75,600 tokens = 2^4 3^3 5^2 7: seq = 32 cannot split them, so 32 devices use data=2 (CFG) x seq=16 (ring)
# or data=2 x fsdp=2 x seq=8.
MESHES = ((4, "seq=4", "ulysses"), (4, "data=2,seq=2", "ulysses"),
          (8, "seq=8", "ulysses"), (8, "data=2,seq=4", "ulysses"), (8, "seq=8", "ring"),
          (16, "data=2,seq=8", "ulysses"), (16, "seq=16", "ring"),
          (32, "data=2,seq=16", "ring"), (32, "data=2,fsdp=2,seq=8", "ulysses"))
SMALL_MESHES = ((4, "seq=4", "ulysses"), (4, "data=2,seq=2", "ring"), (8, "data=2,fsdp=2,seq=2", "ulysses"))
DEVICE_GB = (16, 80, 141)
NOTES = """Reading the table: XLA:CPU runs bf16 collectives in f32 (a convert feeds every bf16 all-to-all,
all-gather and collective-permute in the compiled HLO), so a collective the first-principles count takes in
bf16 reads 2.00x here; on GPU/TPU they stay bf16. All-gather below 2.00x: XLA keeps the cross-attention K/V
weights (applied to the 512 text tokens only) sharded and all-reduces their small outputs instead of
gathering them. Peak = arguments + outputs + temporaries - aliased, as `memory_analysis()` reports them
for the CPU compile; Ulysses' inner attention and the ring both score 675 queries at a time against their
keys (stand-ins for a flash kernel, which holds less).
"""
LATENTS = (1, 21, 90, 160, 16)          # 720p x 81 frames after the Wan VAE (4x time, 8x space)
TEXT_LEN = 512
COLLECTIVES = ("all-to-all", "collective-permute", "all-gather", "all-reduce", "reduce-scatter")
BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4,
         "s64": 8, "u64": 8, "f64": 8}


# ------------------------------------------------------------------------------------------- HLO reading
def _shape_bytes(text: str) -> int:
    return sum(BYTES.get(dt, 4) * math.prod(int(d) for d in dims.split(",") if d)
               for dt, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", text))


def collective_bytes(hlo: str) -> dict[str, int]:
    """Bytes per device of each collective kind in compiled HLO text, each instruction's result buffer
    counted once per execution: loop bodies multiplied by their known trip counts, called computations
    (fusions, conditionals' branches: an upper bound) inherit their caller's count."""
    comps: dict[str, list[str]] = {}
    entry, name = None, None
    for line in hlo.splitlines():
        m = re.match(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if m and not line.startswith(" "):
            name = m.group(2)
            comps[name] = []
            if m.group(1):
                entry = name
            continue
        if name is not None and line.startswith(" "):
            comps[name].append(line)
    calls: dict[str, list[tuple[str, int]]] = {c: [] for c in comps}
    for c, lines in comps.items():
        for line in lines:
            trip = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
            for key, target in re.findall(r"(body|condition|to_apply|calls|true_computation|false_computation)"
                                          r"=%?([\w.\-]+)", line):
                n = int(trip.group(1)) if trip and key in ("body", "condition") else 1
                calls[c].append((target, n))
            for group in re.findall(r"branch_computations=\{([^}]*)\}", line):
                calls[c].extend((t.strip().lstrip("%"), 1) for t in group.split(","))
    mult: dict[str, int] = {}

    def visit(c: str, n: int) -> None:
        mult[c] = mult.get(c, 0) + n
        for target, k in calls.get(c, ()):
            if target in comps:
                visit(target, n * k)

    visit(entry, 1)
    out = dict.fromkeys(COLLECTIVES, 0)
    for c, lines in comps.items():
        for line in lines:
            m = re.match(r"\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s+([a-z\-]+)\(", line)
            if not m:
                continue
            op = m.group(2).removesuffix("-start")
            if op in out:        # an async start's result is (operand, output): count the output only
                shapes = m.group(1) if op == m.group(2) else re.findall(r"[a-z]+\d*\[[\d,]*\]", m.group(1))[-1]
                out[op] += _shape_bytes(shapes) * mult.get(c, 0)
    return out


# ----------------------------------------------------------------------------------------- one compile
def _sharded_bytes(params, shardings) -> int:
    """Bytes of the parameters that are split (what FSDP gathers per call)."""
    total = 0
    for a, s in zip(jax.tree.leaves(params), jax.tree.leaves(shardings), strict=True):
        if any(e is not None for e in s.spec):
            total += math.prod(a.shape) * jnp.dtype(a.dtype).itemsize
    return total


def expected_bytes(cfg, mesh, kind: str, latents, cfg_parallel: bool, sharded_param_bytes: int) -> dict:
    """First-principles collective bytes per device per denoising step (both CFG branches)."""
    b, f, h, w, _ = latents
    pt, ph, pw = cfg.patch_size
    tokens = (f // pt) * (h // ph) * (w // pw)
    p = mesh.shape["seq"]
    calls = 1 if cfg_parallel else 2
    bsplit = math.prod(mesh.shape[a] for a in (batch_axes(mesh, b) or ()) if not (cfg_parallel and a == "data"))
    act = b // bsplit * tokens // p * cfg.dim * jnp.dtype(cfg.jnp_dtype).itemsize   # one local activation
    out = dict.fromkeys(COLLECTIVES, 0)
    if p > 1 and kind == "ulysses":
        out["all-to-all"] = 4 * act * cfg.num_layers * calls
    if p > 1 and kind == "ring":
        out["collective-permute"] = 2 * (p - 1) * act * cfg.num_layers * calls
    if mesh.shape["fsdp"] * p > 1:
        out["all-gather"] = sharded_param_bytes * calls
    if cfg_parallel:
        out["all-gather"] += 2 * math.prod(latents) * jnp.dtype(cfg.jnp_dtype).itemsize
    return out


def compile_one(cfg, devices: int, spec: str, kind: str, latents, text_len: int, q_chunk: int) -> dict:
    mesh = make_mesh(spec, devices=jax.devices()[:devices])
    model = abstract_transformer(cfg)
    kw = {"inner": blockwise(q_chunk, 1024)} if kind == "ulysses" else {"q_chunk": q_chunk}
    den = parallel_wan_denoiser(model, mesh, attention=kind, **kw)
    _, params = nnx.split(model)
    psh = param_shardings(params, WAN_RULES, mesh)
    cfg_parallel = mesh.shape["data"] == 2
    b = latents[0]
    bax = None if cfg_parallel else batch_axes(mesh, b)
    lsh = NamedSharding(mesh, P(bax))
    dt = cfg.jnp_dtype
    spec_d = DenoiseSpec(jax.ShapeDtypeStruct(latents, dt), jax.ShapeDtypeStruct((b, text_len, cfg.text_dim), dt), 1)

    def step(params, x, t, ctx, neg, g):
        if cfg_parallel:
            pden = cfg_parallel_denoiser(den, mesh)
            v, _ = pden.apply(params, pden.init(spec_d), x, t, CFGContext(jnp.stack([ctx, neg]), g))
            return v
        v, _ = guided_velocity(den, True, params, CFGBranches(den.init(spec_d), den.init(spec_d)), x, t, ctx, neg, g)
        return v

    repl = NamedSharding(mesh, P())
    args = (jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), params, psh),
            jax.ShapeDtypeStruct(latents, dt, sharding=lsh), jax.ShapeDtypeStruct((b,), jnp.float32, sharding=repl),
            jax.ShapeDtypeStruct((b, text_len, cfg.text_dim), dt, sharding=lsh),
            jax.ShapeDtypeStruct((b, text_len, cfg.text_dim), dt, sharding=lsh),
            jax.ShapeDtypeStruct((), jnp.float32, sharding=repl))
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = jax.jit(step, out_shardings=lsh).lower(*args).compile()
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
            - mem.alias_size_in_bytes)
    got = collective_bytes(compiled.as_text())
    want = expected_bytes(cfg, mesh, kind, latents, cfg_parallel, _sharded_bytes(params, psh))
    gb = 1e9
    return {"devices": devices, "mesh": spec, "attention": kind, "cfg_parallel": cfg_parallel,
            "compile_s": round(seconds, 1),
            "arguments_gb": round(mem.argument_size_in_bytes / gb, 2), "temp_gb": round(mem.temp_size_in_bytes / gb, 2),
            "output_gb": round(mem.output_size_in_bytes / gb, 3), "peak_gb": round(peak / gb, 2),
            "fits": {f"{d}GB": bool(peak <= d * gb) for d in DEVICE_GB},
            "collectives_gb": {k: round(v / gb, 3) for k, v in got.items() if v},
            "expected_gb": {k: round(v / gb, 3) for k, v in want.items() if v}}


def _table(rows: list[dict]) -> str:
    def ok(r, key):
        return "-" if "error" in r else r[key]

    def fits(r):
        return "-" if "error" in r else "/".join("yes" if r["fits"][f"{d}GB"] else "no" for d in DEVICE_GB)

    def coll(r, key):
        if "error" in r:
            return r["error"][:80] if key == "collectives_gb" else "-"
        return ", ".join(f"{k} {v}" for k, v in r[key].items()) or "none"

    def ratio(r):
        if "error" in r:
            return "-"
        got, want = r["collectives_gb"], r["expected_gb"]
        return ", ".join(f"{k} {got.get(k, 0) / v:.2f}" for k, v in want.items() if v)

    cols = {"devices": "devices", "mesh": "mesh", "attention": "attention",
            "params+inputs GB": lambda r: ok(r, "arguments_gb"), "temp GB": lambda r: ok(r, "temp_gb"),
            "peak GB": lambda r: ok(r, "peak_gb"), "fits 16/80/141 GB": fits,
            "collectives GB/step (HLO)": lambda r: coll(r, "collectives_gb"),
            "first principles GB/step": lambda r: coll(r, "expected_gb"), "HLO / first principles": ratio,
            "compile s": lambda r: ok(r, "compile_s")}
    return markdown_table(rows, cols, align="rll" + "r" * 4 + "lllr")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/parallel")
    ap.add_argument("--small", action="store_true", help="smoke run: 2 layers, latents (1, 3, 16, 32, 16)")
    ap.add_argument("--q-chunk", type=int, default=675,
                    help="queries scored at a time by the attention (divides 75,600 and its 8- and 16-way splits)")
    args = ap.parse_args(argv)
    jax.config.update("jax_num_cpu_devices", 32)          # before the backend starts; no effect afterwards
    if jax.device_count() < 32:
        raise SystemExit(f"need 32 (virtual) devices, found {jax.device_count()}: run in a fresh process on CPU "
                         "(JAX_PLATFORMS=cpu) so jax_num_cpu_devices can take effect")
    if args.small:
        cfg, latents, text_len, meshes = wan21_t2v_14b().replace(num_layers=2), (1, 3, 16, 32, 16), 16, SMALL_MESHES
        q_chunk = 64
    else:
        cfg, latents, text_len, meshes, q_chunk = wan21_t2v_14b(), LATENTS, TEXT_LEN, MESHES, args.q_chunk
    cfg = cfg.replace(param_dtype="bfloat16", dtype="bfloat16")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for devices, spec, kind in meshes:
        try:
            row = compile_one(cfg, devices, spec, kind, latents, text_len, q_chunk)
        except Exception as e:  # noqa: BLE001 - a mesh that does not compile is a row of the report
            row = {"devices": devices, "mesh": spec, "attention": kind, "error": f"{type(e).__name__}: {e}"}
        rows.append(row)
        print(json.dumps(row), flush=True)
        report = {"model": "wan21_t2v_14b" + (" (2 layers)" if args.small else ""), "latents": latents,
                  "tokens": int(np.prod(latents[1:4]) // math.prod(cfg.patch_size)), "text_len": text_len,
                  "dtype": "bfloat16", "jax": jax.__version__, "backend": jax.default_backend(), "rows": rows}
        (out / "compile_report.json").write_text(json.dumps(report, indent=1))
        (out / "compile_report.md").write_text(
            f"# Wan2.1-14B compile report ({report['model']}, latents {latents}, {report['tokens']} tokens)\n\n"
            "Per device, one guided denoising step (both CFG branches), bf16. Command: "
            "`python -m experiments.parallel_report`.\n\n" + _table(rows) + "\n\n" + NOTES)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
