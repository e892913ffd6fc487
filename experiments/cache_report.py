"""The caching table's report: the markdown table and the papers' orderings checked, from its result dict.

`experiments.cache_table` runs the experiment and writes `cache_table.json`; `markdown(report)` is its
`cache_table.md`.
"""

from __future__ import annotations

import numpy as np

from experiments.harness import fmt, markdown_table

MIB = 2**20
AR_COLUMNS = {"method": "method", "threshold": lambda r: fmt(r["threshold"], ".4g"),
              "block passes / video": lambda r: f"{r['block_passes_per_video']:.0f}",
              "FLOPs vs vanilla": lambda r: f"{100 * r['flops_fraction']:.0f}%",
              "speed-up": lambda r: f"{r['speedup']:.2f}x", "PSNR (dB)": lambda r: fmt(r["psnr"], ".2f"),
              "SSIM": lambda r: fmt(r["ssim"], ".3f"), "adherence": lambda r: f"{r['adherence']:.3f}",
              "KV MiB / video": lambda r: f"{r['kv_bytes_per_video'] / MIB:.2f}"}
T2V_COLUMNS = {"method": "method", "block passes": "block_passes",
               "compute": lambda r: f"{100 * r['compute_fraction']:.0f}%", "speed-up": lambda r: f"{r['speedup']:.2f}x",
               "PSNR (dB)": lambda r: fmt(r["psnr"], ".2f"), "SSIM": lambda r: fmt(r["ssim"], ".3f"),
               "adherence": lambda r: f"{r['adherence']:.3f}"}


def row_markdown(r: dict) -> str:
    """One AR row as a line of the table."""
    return markdown_table([r], AR_COLUMNS).splitlines()[-1]


def verdict(a: dict, b: dict, tol: float = 0.03) -> str:
    """Whether row a beats row b: in PSNR at equal FLOPs (within `tol`), or by dominance when they differ."""
    fa, fb = a["flops_fraction"], b["flops_fraction"]
    if abs(fa - fb) <= tol:
        return "holds" if a["psnr"] > b["psnr"] else "does not hold"
    if a["psnr"] >= b["psnr"] and fa <= fb:
        return "holds (better at less compute)"
    if a["psnr"] <= b["psnr"] and fa >= fb:
        return "does not hold (worse at more compute)"
    return "inconclusive (the compute differs: the better one spends more)"


def claims(rows: list[dict]) -> list[str]:
    """The papers' orderings, checked at equal compute targets, with the numbers."""
    by = {r["method"]: r for r in rows}
    out = []
    for speed in ("slow", "fast"):
        t, f, m, g = (by[f"{k}-{speed}"] for k in ("teacache", "flowcache", "motioncache", "flowcache-magi"))
        for a, b, claim in ((f, t, "FlowCache beats TeaCache"), (m, f, "MotionCache beats FlowCache"),
                            (g, t, "FlowCache (MAGI variant) beats TeaCache")):
            out.append(f"- {speed}: {claim}: **{verdict(a, b)}** ({a['method']} {a['psnr']:.2f} dB / SSIM "
                       f"{a['ssim']:.3f} at {100 * a['flops_fraction']:.0f}% FLOPs vs {b['method']} {b['psnr']:.2f} "
                       f"dB / SSIM {b['ssim']:.3f} at {100 * b['flops_fraction']:.0f}%).")
    k, w = by["flowcache-slow+kvc"], by["flowcache-slow+window"]
    out.append(f"- KV compression vs a plain window of the same budget: {k['psnr']:.2f} dB vs {w['psnr']:.2f} dB "
               f"({k['kv_bytes_per_video'] / MIB:.2f} vs {w['kv_bytes_per_video'] / MIB:.2f} MiB per video; "
               f"vanilla {by['vanilla']['kv_bytes_per_video'] / MIB:.2f} MiB).")
    kept = k["counters"].get("kept_frame_counts")
    if kept:
        share = np.asarray(kept, float) / max(sum(kept), 1)
        out.append("- Frames the compressed cache holds at the end (share of kept (layer, head, slot) entries, "
                   "latent frame 0 first): " + " ".join(f"{100 * x:.0f}%" for x in share) + ".")
    return out


def markdown(report: dict) -> str:
    """`cache_table.md` from the report of `experiments.cache_table.run_table`."""
    s = report["setup"]
    lines = [f"AR shapes model ({report['model'].get('steps')} training steps), {s['n']} held-out prompts, "
             f"{report['frames']} latent frames ({report['chunks']} chunks), UniPC {s['steps']} steps, CFG "
             f"{s['guidance']}, batch {s['batch']}; thresholds chosen for {dict(s['targets'])} of the vanilla "
             f"denoising compute from {s['calib_n']} calibration prompts. Speed-up: wall clock on "
             f"{report['machine']}, compiled runs in one process.", "",
             markdown_table(report["rows"], AR_COLUMNS), "", *claims(report["rows"]),
             "", "What limits these orderings on the tiny model: see docs/caching.md, section 'The table'."]
    if report.get("t2v"):
        t = report["t2v"]
        lines += ["", f"TeaCache on the text-to-video model ({t['n']} held-out prompts, polynomial fitted on "
                      f"{s['calib_n']} calibration prompts):", "", markdown_table(t["rows"], T2V_COLUMNS)]
    return "\n".join(lines) + "\n"
