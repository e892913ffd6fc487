"""Prompt adherence on the shapes world: an analytic detector that reads a video and checks it against its prompt.

Per video (T, H, W, 3), uint8 or float on the [0, 1] scale:

1. Background: per frame, the per-channel median colour. A frame passes `background` when the prompt's
   background is the nearest palette background to that median and at least BG_MIN_FRACTION of its pixels
   are within BG_TOL (RGB distance on [0, 1]) of it.
2. Unmixing: every pixel p is explained as ``b + alpha * (c_k - b)`` for each object colour c_k (b the frame's
   median); it is labelled with the colour of smallest residual among those with alpha >= 0.5, if that
   residual is <= RESIDUAL_TOL. This inverts anti-aliasing and soft edges, so blur does not invent colours.
3. Objects are identified by colour (a scene's objects have distinct colours). Per frame, the largest
   8-connected component of the object's colour is a candidate if it has >= MIN_AREA pixels. Its soft alpha
   (the component dilated by two pixels) gives an alpha-weighted centroid, and is compared by soft IoU
   (sum of minima / sum of maxima) with the renderer's coverage of every shape x size placed at that
   centroid, sharp and blurred by TEMPLATE_BLURS. The object is *present* in the frame when the best IoU is
   >= PRESENT_IOU (noise speckles and shapeless smears are not objects); that template names the frame's
   shape and size.
4. Motion: the centroids (less the centroid offset of the most frequent template) are fitted with the
   renderer's bouncing model ``fold(u0 + v t)`` for every prompt direction x speed, by least squares with
   residuals truncated at 1.5 px; u0 runs over a 0.05 px grid of starts whose first step goes along v
   without a bounce (as the renderer's objects do), wall margins of either size. The fit is *consistent*
   when the object is present in >= MIN_TRACK_FRACTION of frames (and at least 3) and >= INLIER_FRACTION
   of those centroids lie within INLIER_TOL px of the fitted path.

Per-object checks (each in [0, 1]):
  color        fraction of frames in which the object is present (a wrong-coloured object is absent, so
               it fails every check below as well);
  shape, size  fraction of frames in which it is present and its best template has the prompt's shape / size;
  direction    1 if the fit is consistent and its direction is the prompt's, else 0;
  speed        1 if the fit is consistent and its speed is the prompt's, else 0;
  persistence  fraction of frames in which it is present, its colour has exactly one component of >= MIN_AREA
               pixels (no duplicate), and (after frame 0) it was present in the previous frame with a
               centroid jump <= MAX_JUMP px (no vanishing, no teleporting).
Per video: each criterion is the mean over the prompt's objects (`background` is the fraction of frames that
pass), and the score is the mean of the 7 criteria. Chance (a uniformly random value of the attribute) is in
CHANCE; persistence has no attribute to guess.
"""

from __future__ import annotations

import argparse
import functools
import json
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from models.shapes.prompts import (
    BACKGROUNDS,
    COLORS,
    DIRECTIONS,
    SHAPES,
    SIZES,
    SPEEDS,
    Scene,
    as_scene,
    sample_prompts,
)
from models.shapes.render import centroid_offset, coverage, fold, render_batch

CRITERIA = ("background", "color", "shape", "size", "direction", "speed", "persistence")
CHANCE = {"background": 1 / len(BACKGROUNDS), "color": 1 / len(COLORS), "shape": 1 / len(SHAPES),
          "size": 1 / len(SIZES), "direction": 1 / len(DIRECTIONS), "speed": 1 / len(SPEEDS),
          "persistence": None}
BG_TOL = 0.15
BG_MIN_FRACTION = 0.4
ALPHA_ON = 0.5
RESIDUAL_TOL = 0.3
MIN_AREA = 6
PRESENT_IOU = 0.45
# Templates are compared sharp and blurred (Gaussian sigma in px): the best of the two counts.
TEMPLATE_BLURS = (0.0, 1.0)
MAX_JUMP = 4.0
MIN_TRACK_FRACTION = 0.75
INLIER_TOL = 1.0
INLIER_FRACTION = 0.75
_TRUNCATE = 1.5
_WINDOW = 9
_SUBPIXEL = 8
_U0_STEP = 0.05
_COLOR_NAMES = list(COLORS)
_PALETTE = np.array([COLORS[c] for c in _COLOR_NAMES], np.float64) / 255.0
_BG_NAMES = list(BACKGROUNDS)
_BG_PALETTE = np.array([BACKGROUNDS[c] for c in _BG_NAMES], np.float64) / 255.0
_TEMPLATES = [(shape, size) for shape in SHAPES for size in SIZES]
_MOTIONS = [(d, s) for d in DIRECTIONS for s in SPEEDS]
_EIGHT = np.ones((3, 3), bool)


def _as_frames(video) -> np.ndarray:
    v = np.asarray(video)
    if v.ndim != 4 or v.shape[-1] != 3 or v.shape[0] < 2 or v.shape[1] < 16 or v.shape[2] < 16:
        raise ValueError(f"adherence: video shape {v.shape} is invalid; expected (T >= 2, H >= 16, W >= 16, 3)")
    if v.dtype == np.uint8:
        return v.astype(np.float64) / 255.0
    if not np.issubdtype(v.dtype, np.floating):
        raise TypeError(f"adherence: video dtype {v.dtype} is invalid; expected uint8 or float on the [0, 1] scale")
    v = v.astype(np.float64)
    if not np.all(np.isfinite(v)):
        raise ValueError("adherence: video has non-finite values (nan or inf)")
    return v


def _background_checks(frames: np.ndarray, background: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame median colour (T, 3) and whether each frame passes the background check (T,)."""
    med = np.median(frames.reshape(frames.shape[0], -1, 3), axis=1)
    nearest = np.argmin(np.linalg.norm(med[:, None, :] - _BG_PALETTE[None], axis=-1), axis=1)
    target = _BG_PALETTE[_BG_NAMES.index(background)]
    near = np.linalg.norm(frames - target, axis=-1) <= BG_TOL
    ok = (nearest == _BG_NAMES.index(background)) & (near.mean(axis=(1, 2)) >= BG_MIN_FRACTION)
    return med, ok


def _unmix(frames: np.ndarray, bg: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Alpha (T, H, W, K) clipped to [0, 1], residual (T, H, W, K) and label (T, H, W) (-1: no object colour)."""
    d = _PALETTE[None, :, :] - bg[:, None, :]  # (T, K, 3)
    diff = frames - bg[:, None, None, :]
    a = np.einsum("thwc,tkc->thwk", diff, d) / np.maximum(np.sum(d * d, axis=-1), 1e-6)[:, None, None, :]
    ac = np.clip(a, 0.0, 1.0)
    res = np.linalg.norm(diff[..., None, :] - ac[..., None] * d[:, None, None], axis=-1)
    cand = np.where(a >= ALPHA_ON, res, np.inf)
    best = np.argmin(cand, axis=-1)
    label = np.where(np.take_along_axis(cand, best[..., None], -1)[..., 0] <= RESIDUAL_TOL, best, -1)
    return ac, res, label


def _fit_axis(c: np.ndarray, t: np.ndarray, velocities: np.ndarray, lo: float, hi: float, mid_video: bool = False):
    """Truncated-LS fit of fold(u0 + v t) on [lo, hi] per velocity: (loss (V,), fitted path (V, n)).

    mid_video: the track is a later segment of a longer video, so it may start anywhere in the bounce cycle
    (u0 over a whole fold period, no first-step rule); a direction is then known only up to wall reflections.
    """
    velocities, inverse = np.unique(velocities, return_inverse=True)
    u0 = np.arange(lo, (2 * hi - lo if mid_video else hi) + 1e-9, _U0_STEP)
    path = fold(u0[:, None, None] + velocities[None, :, None] * t[None, None, :], lo, hi)  # (G, V, n)
    loss = np.minimum((path - c) ** 2, _TRUNCATE**2).sum(-1)
    if not mid_video:
        # The first step goes along v without a bounce (else "right" from the left wall equals "left" bouncing
        # at once); where no start allows that (v longer than the span), the start nearest to allowing it is kept.
        first = u0[:, None] + velocities[None, :]
        excess = np.maximum(first - hi, 0.0) + np.maximum(lo - first, 0.0)
        loss = np.where(excess <= excess.min(axis=0, keepdims=True) + 1e-9, loss, np.inf)
    best = np.argmin(loss, axis=0)
    v_idx = np.arange(len(velocities))
    return loss[best, v_idx][inverse], path[best, v_idx][inverse]


def _fit_motion(centres: np.ndarray, t: np.ndarray, width: int, height: int, mid_video: bool = False) -> dict:
    """Best prompt (direction, speed) for a track of centres (n, 2) at frames t, and its inlier fraction."""
    vel = np.array([[DIRECTIONS[d][i] * SPEEDS[s] for d, s in _MOTIONS] for i in range(2)])  # (2, M)
    best = None
    for h in SIZES.values():
        lx, px = _fit_axis(centres[:, 0], t, vel[0], h, width - h, mid_video)
        ly, py = _fit_axis(centres[:, 1], t, vel[1], h, height - h, mid_video)
        m = int(np.argmin(lx + ly))
        if best is None or lx[m] + ly[m] < best[0]:
            best = (lx[m] + ly[m], m, np.stack([px[m], py[m]], -1))
    _, m, path = best
    inliers = float(np.mean(np.linalg.norm(path - centres, axis=-1) <= INLIER_TOL))
    return {"direction": _MOTIONS[m][0], "speed": _MOTIONS[m][1], "inlier_fraction": inliers}


def _detect(mask: np.ndarray, alpha: np.ndarray, res: np.ndarray):
    """The object in one frame's colour mask: (centroid (x, y), best (shape, size), #components >= MIN_AREA),
    or None when no component of >= MIN_AREA pixels reaches PRESENT_IOU with a template."""
    comp, n = ndimage.label(mask, structure=_EIGHT)
    if n == 0:
        return None
    areas = np.bincount(comp.ravel())[1:]
    big = int(np.sum(areas >= MIN_AREA))
    if big == 0:
        return None
    height, width = mask.shape
    region = ndimage.binary_dilation(comp == 1 + int(np.argmax(areas)), structure=_EIGHT, iterations=2)
    soft = np.where(region & (res <= RESIDUAL_TOL), alpha, 0.0)
    ys, xs = np.mgrid[0:height, 0:width] + 0.5
    cx, cy = np.sum(soft * xs) / soft.sum(), np.sum(soft * ys) / soft.sum()
    # Templates (half-extent <= 5 px, plus ~3 px of blur) live in a (2 _WINDOW + 1)^2 window around their
    # centre; the soft mass outside the window counts towards the union.
    ious = []
    for shape, size in _TEMPLATES:
        ox, oy = centroid_offset(shape, SIZES[size])
        ix, fx = _split_subpixel(cx - ox)
        iy, fy = _split_subpixel(cy - oy)
        x0, y0 = ix - _WINDOW, iy - _WINDOW
        # the part of the window inside the frame
        ax0, ay0 = max(0, x0), max(0, y0)
        ax1, ay1 = min(width, x0 + 2 * _WINDOW + 1), min(height, y0 + 2 * _WINDOW + 1)
        win = soft[ay0:ay1, ax0:ax1]
        outside = soft.sum() - win.sum()
        for tmpl in _template_bank(shape, size, fx, fy):
            t = tmpl[ay0 - y0:ay1 - y0, ax0 - x0:ax1 - x0]
            ious.append((np.minimum(win, t).sum() / (np.maximum(win, t).sum() + outside), (shape, size)))
    iou, best = max(ious, key=lambda r: r[0])
    return ((cx, cy), best, big) if iou >= PRESENT_IOU else None


def _split_subpixel(c: float) -> tuple[int, int]:
    """Integer pixel and sub-pixel index (in 1/_SUBPIXEL steps) of a coordinate, rounded to the nearest step."""
    q = int(np.floor(c * _SUBPIXEL + 0.5))
    return q // _SUBPIXEL, q % _SUBPIXEL


@functools.cache
def _template_bank(shape: str, size: str, fx: int, fy: int) -> tuple[np.ndarray, ...]:
    """Coverage of a shape centred at (_WINDOW + fx/_SUBPIXEL, _WINDOW + fy/_SUBPIXEL) of a (2 _WINDOW + 1)^2
    window, once per TEMPLATE_BLURS sigma (read-only constants, cached)."""
    n = 2 * _WINDOW + 1
    sharp = coverage(shape, SIZES[size], _WINDOW + fx / _SUBPIXEL, _WINDOW + fy / _SUBPIXEL, size=n)
    out = tuple(ndimage.gaussian_filter(sharp, b, mode="constant") if b else sharp for b in TEMPLATE_BLURS)
    for t in out:
        t.setflags(write=False)
    return out


def same_up_to_reflection(a: str, b: str) -> bool:
    """Whether directions a and b differ only by wall reflections (sign flips of either component)."""
    (ax, ay), (bx, by) = DIRECTIONS[a], DIRECTIONS[b]
    return abs(ax) == abs(bx) and abs(ay) == abs(by)


# P(a uniformly random direction equals the prompt's up to reflections), averaged over prompt directions
MID_VIDEO_DIRECTION_CHANCE = float(np.mean([[same_up_to_reflection(a, b) for b in DIRECTIONS] for a in DIRECTIONS]))


def _score_object(obj, k: int, ac: np.ndarray, res: np.ndarray, label: np.ndarray, mid_video: bool = False) -> dict:
    T, H, W = label.shape
    found = [_detect(label[t] == k, ac[t, ..., k], res[t, ..., k]) for t in range(T)]
    present = np.array([f is not None for f in found])
    single = np.array([f is not None and f[2] == 1 for f in found])
    centroid = np.array([f[0] if f is not None else (np.nan, np.nan) for f in found])
    jump = np.linalg.norm(np.diff(centroid, axis=0), axis=-1)
    continuous = np.concatenate([[True], np.nan_to_num(jump, nan=np.inf) <= MAX_JUMP])
    out = {
        "color": float(present.mean()),
        "shape": float(np.mean([f is not None and f[1][0] == obj.shape for f in found])),
        "size": float(np.mean([f is not None and f[1][1] == obj.size for f in found])),
        "persistence": float(np.mean(present & single & continuous)),
        "direction": 0.0, "speed": 0.0, "detected_direction": None, "detected_speed": None,
        "inlier_fraction": 0.0,
    }
    if present.mean() >= MIN_TRACK_FRACTION and present.sum() >= 3:
        # centroid -> centre with the most frequent template (ties: the first in _TEMPLATES)
        votes = [f[1] for f in found if f is not None]
        shape, size = max(_TEMPLATES, key=lambda tp: (votes.count(tp), -_TEMPLATES.index(tp)))
        ox, oy = centroid_offset(shape, SIZES[size])
        fit = _fit_motion(centroid[present] - np.array([ox, oy]), np.flatnonzero(present).astype(float), W, H,
                          mid_video)
        consistent = fit["inlier_fraction"] >= INLIER_FRACTION
        right_way = (same_up_to_reflection(fit["direction"], obj.direction) if mid_video
                     else fit["direction"] == obj.direction)
        out.update(detected_direction=fit["direction"], detected_speed=fit["speed"],
                   inlier_fraction=fit["inlier_fraction"],
                   direction=float(consistent and right_way),
                   speed=float(consistent and fit["speed"] == obj.speed))
    return out


def score_video(video, prompt: Scene | str, *, mid_video: bool = False) -> dict:
    """Adherence of one video to its prompt: ``{"score", <criterion>: value, "objects": [per-object dicts]}``.

    mid_video: the video is a later segment of a longer one (e.g. of an AR rollout), so objects may be
    anywhere in their bounce cycle: motion is fitted from any phase and `direction` accepts the prompt's
    direction up to wall reflections (chance level MID_VIDEO_DIRECTION_CHANCE instead of 1/8).
    """
    scene = as_scene(prompt)
    frames = _as_frames(video)
    bg, bg_ok = _background_checks(frames, scene.background)
    ac, res, label = _unmix(frames, bg)
    objects = [_score_object(o, _COLOR_NAMES.index(o.color), ac, res, label, mid_video) for o in scene.objects]
    out = {"background": float(bg_ok.mean())}
    for c in CRITERIA[1:]:
        out[c] = float(np.mean([o[c] for o in objects]))
    out["score"] = float(np.mean([out[c] for c in CRITERIA]))
    out["objects"] = objects
    return out


def adherence(videos, prompts: Sequence[Scene | str], *, mid_video: bool = False) -> dict:
    """Mean adherence of videos (B, T, H, W, 3) (or a sequence of (T, H, W, 3)) to their prompts.

    mid_video: score later segments of longer videos (see `score_video`).

    Returns ``{"score": mean score, <criterion>: mean over videos for each of CRITERIA, "per_video": [...]}``
    where `per_video` holds each video's `score_video` dict.
    """
    if isinstance(prompts, (str, Scene)):
        raise TypeError("adherence: prompts must be a sequence of prompts (one per video), not a single prompt")
    prompts = list(prompts)
    if isinstance(videos, np.ndarray) and videos.ndim != 5:
        raise ValueError(f"adherence: videos shape {videos.shape} is invalid; expected (B, T, H, W, 3)")
    if len(videos) != len(prompts) or len(prompts) == 0:
        raise ValueError(f"adherence: got {len(videos)} videos and {len(prompts)} prompts; need the same "
                         "positive number of each")
    per_video = [score_video(v, p, mid_video=mid_video) for v, p in zip(videos, prompts)]
    out = {"score": float(np.mean([r["score"] for r in per_video]))}
    for c in CRITERIA:
        out[c] = float(np.mean([r[c] for r in per_video]))
    out["per_video"] = per_video
    return out


def validation(n: int = 64, seed: int = 0) -> dict:
    """The detector's validation figures on `n` held-out prompts rendered with seeds 0..n-1.

    Scenarios: ground truth; ground truth blurred (Gaussian, sigma 1 px) plus Gaussian noise (sigma 0.05),
    clipped to [0, 1]; a harsher sigma 1.5 px blur plus noise 0.1; uniform noise; frames shuffled; each
    video scored against the next video's prompt.
    """
    prompts = sample_prompts(n, seed, "heldout")
    videos = render_batch(prompts, seeds=range(n))
    rng = np.random.default_rng(seed)
    x = ndimage.gaussian_filter(videos / 255.0, sigma=(0, 0, 1, 1, 0), mode="nearest")
    scenarios = {
        "ground_truth": (videos, prompts),
        "blur1_noise0.05": (np.clip(x + rng.normal(0.0, 0.05, x.shape), 0.0, 1.0), prompts),
        "blur1.5_noise0.1": (np.clip(ndimage.gaussian_filter(videos / 255.0, sigma=(0, 0, 1.5, 1.5, 0), mode="nearest")
                                     + rng.normal(0.0, 0.1, x.shape), 0.0, 1.0), prompts),
        "uniform_noise": (rng.uniform(size=videos.shape), prompts),
        "shuffled_frames": (np.stack([v[rng.permutation(len(v))] for v in videos]), prompts),
        "other_prompt": (videos, prompts[1:] + prompts[:1]),
    }
    out = {"n": n, "seed": seed, "chance": CHANCE}
    for name, (v, p) in scenarios.items():
        r = adherence(v, p)
        out[name] = {k: round(r[k], 4) for k in ("score", *CRITERIA)}
    out["long_render_segments"] = _segment_validation(prompts, seed)
    return out


def _segment_validation(prompts, seed: int, frames: int = 128, seg: int = 16) -> dict:
    """Later `seg`-frame segments of `frames`-frame renders, scored strictly and mid-video, per segment; plus
    shuffled frames and another prompt's segments (mid-video)."""
    videos = render_batch(prompts, num_frames=frames, seeds=range(len(prompts)))
    starts = range(seg, frames, seg)
    rng = np.random.default_rng(seed)
    shuffled = np.stack([v[rng.permutation(frames)] for v in videos])

    def per_segment(v, p, mid, key):
        return [round(adherence(v[:, s:s + seg], p, mid_video=mid)[key], 4) for s in starts]

    return {"frames": frames, "segment": seg, "segment_starts": list(starts),
            "strict_direction": per_segment(videos, prompts, False, "direction"),
            "mid_video_direction": per_segment(videos, prompts, True, "direction"),
            "mid_video_score": per_segment(videos, prompts, True, "score"),
            "mid_video_shuffled_score": per_segment(shuffled, prompts, True, "score"),
            "mid_video_other_prompt_score": per_segment(videos, prompts[1:] + prompts[:1], True, "score")}


def main(argv: list[str] | None = None) -> None:
    """Print (and with --out save) `validation` as JSON. Run it as
    ``python -c "from models.shapes.adherence import main; main()" [--n 64] [--seed 0] [--out FILE.json]``."""
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    res = validation(args.n, args.seed)
    text = json.dumps(res, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
