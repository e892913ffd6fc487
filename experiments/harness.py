"""The harness every result command shares: compiled runs, interleaved timing, video fidelity and reports.

    runner = CompiledRunner(noise, context, solver=unipc(50), guidance=5.0)   # one prompt per call
    run = runner.run("xattention", den, thresholds=table)   # compiles once per key (a denoiser structure)
    times = runner.retime(rounds=2)                         # every run again, round-robin
    fid = video_fidelity(videos, dense_videos)              # PSNR (capped), SSIM, relative L1 / L2
    write_results(out_dir, "table", report, markdown_text)  # table.json and table.md

Timing follows one rule everywhere: methods are timed round-robin (`interleaved_times`), so a change of the
machine's background load falls on every method alike, and only compiled, warmed-up calls are timed.
Fidelity is `vidaccel.metrics.fidelity` of the decoded videos against the reference run, averaged over
videos, with each video's PSNR capped at `PSNR_CAP` (identical videos give +inf, which would swamp a mean).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vidaccel.metrics import fidelity
from vidaccel.sampling import denoise_loop, init_branches
from vidaccel.sparse_attention import SparseState, with_thresholds
from vidaccel.transforms import DenoiseSpec, replace_state

PSNR_CAP = 100.0   # dB: an identical video (PSNR +inf) counts as 100 dB in means


# ------------------------------------------------------------------------------------------------ timing
def interleaved_times(fns: Mapping[str, Callable[[], Any]], reps: int, *, warmup: int = 0,
                      after_round: Callable[[int, dict[str, list[float]]], None] | None = None
                      ) -> dict[str, list[float]]:
    """Wall seconds of `reps` calls of every function, timed round-robin (each function once per round).

    Each call is blocked on its result (`jax.block_until_ready`). `warmup` untimed rounds run first (compile
    and warm up what has not run yet). `after_round(r, times)` is called after timed round r (for logging).
    Returns {name: [seconds of round 0, round 1, ...]}.
    """
    for _ in range(warmup):
        for fn in fns.values():
            jax.block_until_ready(fn())
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - t0)
        if after_round is not None:
            after_round(r, times)
    return times


def median_times(times: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """The median of each entry of `interleaved_times`' result."""
    return {name: float(np.median(t)) for name, t in times.items()}


# ------------------------------------------------------------------------------------------------ runner
@dataclasses.dataclass
class Run:
    """One sampled batch: latents (n, ...) per prompt, the denoiser state summed over prompts (counters),
    the wall seconds of this (compiled) run and of compiling, and the job number for `CompiledRunner.retime`."""

    latents: np.ndarray
    state: Any
    seconds: float
    compile_seconds: float
    job: int


def prompt_sampler(den, solver, guidance: float):
    """A traceable `fn(params, noise, context, thresholds)` that samples each prompt on its own (`lax.map`,
    batch 1 per call, CFG against a zero context): noise (n, 1, F, H, W, C), context (n, 1, L, D).

    `thresholds` is None or a (layers, heads) table for the denoiser's sparse attention (a traced input, so
    sweeps and calibrated tables reuse one compiled function). Returns (latents (n, 1, ...), states (n, ...)).
    """
    def one(params, thresholds, noise, context):
        spec = DenoiseSpec(jax.ShapeDtypeStruct(noise.shape, noise.dtype),
                           jax.ShapeDtypeStruct(context.shape, context.dtype), solver.num_steps)
        state = init_branches(den, spec, True)
        if thresholds is not None:
            state = state.map(lambda s: replace_state(s, SparseState, lambda sp: with_thresholds(sp, thresholds),
                                                      "; thresholds were given but the denoiser has no sparse "
                                                      "attention"))
        return denoise_loop(den, solver, True, params, noise, context, jnp.zeros_like(context),
                            jnp.float32(guidance), state, jnp.int32(0))

    def run(params, noise, context, thresholds):
        return jax.lax.map(lambda xs: one(params, thresholds, *xs), (noise, context))

    return run


class CompiledRunner:
    """Samples fixed prompts (one per call, see `prompt_sampler`) with any text-to-video denoiser.

    One function is compiled per `key`: runs with the same key reuse the first run's compiled code, so the
    key must name the denoiser's structure (runs under one key may differ only in parameters and
    thresholds). Every run is recorded for `retime`.

    Args:
      noise: (n, F, H, W, C) latent noise, one row per prompt.
      context: (n, L, D) text embeddings.
      solver: the sampler's solver (`vidaccel.solvers.unipc(steps)`).
      guidance: the CFG scale (the unconditional branch gets a zero context).
    """

    def __init__(self, noise, context, *, solver, guidance: float):
        self.noise = jnp.asarray(noise)[:, None]
        self.context = jnp.asarray(context)[:, None]
        self.solver, self.guidance = solver, float(guidance)
        self._compiled: dict[tuple[str, bool], Any] = {}
        self._jobs: list[tuple[tuple[str, bool], tuple, float]] = []

    @property
    def compilations(self) -> int:
        """How many functions were compiled so far (one per distinct key)."""
        return len(self._compiled)

    def run(self, key: str, den, thresholds=None) -> Run:
        """Sample every prompt with `den` (and a (layers, heads) `thresholds` table for sparse attention)."""
        table = None if thresholds is None else jnp.asarray(thresholds, jnp.float32)
        args = (den.params, self.noise, self.context, table)
        key = (key, table is None)          # with and without a thresholds input are different programs
        t0 = time.perf_counter()
        if key not in self._compiled:
            self._compiled[key] = jax.jit(prompt_sampler(den, self.solver, self.guidance)).lower(*args).compile()
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        latents, state = self._compiled[key](*args)
        jax.block_until_ready(latents)
        seconds = time.perf_counter() - t0
        self._jobs.append((key, args, seconds))
        state = jax.tree.map(lambda x: x.sum(0) if x.ndim else x, state)
        return Run(np.asarray(latents[:, 0]), state, seconds, compile_s, len(self._jobs) - 1)

    def retime(self, rounds: int) -> list[list[float]]:
        """Every recorded run again `rounds` times, round-robin (`interleaved_times`); returns each job's
        wall seconds, its first run's included."""
        fns = {str(i): (lambda key=key, args=args: self._compiled[key](*args)[0])
               for i, (key, args, _) in enumerate(self._jobs)}
        times = interleaved_times(fns, rounds)
        return [[first, *times[str(i)]] for i, (_, _, first) in enumerate(self._jobs)]


# ------------------------------------------------------------------------------------------------ fidelity
def as_unit_float(videos) -> np.ndarray:
    """Videos as float32 in [0, 1]: uint8 pixels are divided by 255, float videos are taken as they are."""
    v = np.asarray(videos)
    return v.astype(np.float32) / 255.0 if v.dtype == np.uint8 else v.astype(np.float32)


def video_fidelity(videos, ref, *, cap: float = PSNR_CAP) -> dict:
    """Fidelity of `videos` against `ref` (both (B, T, H, W, C), uint8 or floats in [0, 1]), averaged over videos.

    `vidaccel.metrics.fidelity` per video; each PSNR is capped at `cap` dB before the mean. Returns psnr,
    ssim, relative_l1, relative_l2 (means, floats) and psnr_per_video (the capped values, a float32 array).
    """
    per = fidelity(as_unit_float(videos), as_unit_float(ref))
    p = np.minimum(np.asarray(per["psnr"]), cap)
    out = {"psnr": float(np.mean(p))}
    out.update({k: float(np.mean(np.asarray(per[k]))) for k in ("ssim", "relative_l1", "relative_l2")})
    out["psnr_per_video"] = p
    return out


# ------------------------------------------------------------------------------------------------ reports
def fmt(value, spec: str = "", missing: str = "-") -> str:
    """`format(value, spec)`, or `missing` for None."""
    return missing if value is None else format(value, spec)


def markdown_table(rows: Sequence[Mapping], columns: Mapping[str, str | Callable[[Mapping], Any]],
                   align: str | None = None) -> str:
    """A markdown table: one line per row, one cell per column.

    Args:
      rows: the rows (dicts).
      columns: header -> a row key (the value is shown with `str`, None as "-") or a function of the row.
      align: one letter per column, "l" (left) or "r" (right); default: the first column left, the rest right.
    """
    heads = list(columns)
    align = align or "l" + "r" * (len(heads) - 1)
    if len(align) != len(heads) or set(align) - {"l", "r"}:
        raise ValueError(f"align={align!r} must hold one of 'l' or 'r' per column ({len(heads)} columns)")
    lines = ["| " + " | ".join(heads) + " |", "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|"]
    for row in rows:
        cells = [c(row) if callable(c) else fmt(row.get(c)) for c in columns.values()]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def _json_default(value):
    if isinstance(value, (np.ndarray, np.generic, jax.Array)):
        return np.asarray(value).tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def write_results(out_dir, name: str, report: Mapping, markdown: str | None = None) -> list[Path]:
    """Write `<out_dir>/<name>.json` (the report; NumPy and JAX values as lists and numbers) and, when given,
    `<out_dir>/<name>.md`; returns the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.json"]
    paths[0].write_text(json.dumps(report, indent=1, default=_json_default))
    if markdown is not None:
        paths.append(out_dir / f"{name}.md")
        paths[1].write_text(markdown if markdown.endswith("\n") else markdown + "\n")
    return paths


def publish(json_path, report: Mapping, markdown: str) -> list[Path]:
    """`write_results` to `json_path` and its `.md` sibling, then print the markdown and where it went (what a
    study command ends with)."""
    json_path = Path(json_path)
    paths = write_results(json_path.parent, json_path.stem, report, markdown)
    print(markdown)
    print(f"wrote {paths[0]} and {paths[1].name}")
    return paths


class PlotsUnavailable(ModuleNotFoundError):
    """matplotlib, the optional `plots` extra, is not installed."""


def pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend; `PlotsUnavailable` (saying how to install it)
    when matplotlib is missing."""
    try:
        import matplotlib  # noqa: PLC0415  optional plotting dependency
    except ModuleNotFoundError as err:
        raise PlotsUnavailable("plots need matplotlib, an optional dependency: pip install 'vidaccel[plots]' "
                               "(or pip install matplotlib)") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415  optional plotting dependency

    return plt


def plot_or_skip(plot: Callable[..., Any], *args, log=print) -> bool:
    """`plot(*args)`, or, when matplotlib is missing, a logged line saying the plots were skipped and why (the
    numbers of a long run are written either way). Returns whether it plotted."""
    try:
        plot(*args)
    except PlotsUnavailable as err:
        log(f"plots skipped: {err}")
        return False
    return True


def machine() -> str:
    """The machine the numbers come from: CPU architecture and count, JAX version and backend."""
    return (f"{platform.machine()} x {os.cpu_count()} CPUs, python {platform.python_version()}, jax "
            f"{jax.__version__}, backend {jax.default_backend()}")
