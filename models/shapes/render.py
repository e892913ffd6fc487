"""Deterministic numpy renderer of the shapes world: a static background and objects bouncing off the walls.

Coordinates are continuous pixels: pixel (row i, col j) covers [j, j+1) x [i, i+1), x to the right, y down.
An object's centre moves linearly and reflects off the walls, i.e. on each axis it is
``fold(p0 + v t)`` on the interval [h, size - h] (h = the object's half-extent), so the whole object always
stays in the frame. Coverage is anti-aliased by 4x4 supersampling and objects are alpha-composited over the
background in scene order, then rounded to uint8.
"""

from __future__ import annotations

import numpy as np

from models.shapes.prompts import BACKGROUNDS, Scene, SceneObject, as_scene

VIDEO_FRAMES = 16
VIDEO_SIZE = 32
SUPERSAMPLE = 4
# Each object travels at least this fraction of the video before its first bounce, so the prompt's
# direction is visible from the start (an object that bounces at once would look like the opposite one).
FREE_FRACTION = 0.25
_PLACEMENT_TRIES = 64


def fold(u: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Reflect unfolded coordinates `u` into [lo, hi] (motion with elastic bounces off both ends)."""
    span = hi - lo
    m = np.mod(np.asarray(u, np.float64) - lo, 2.0 * span)
    return lo + np.where(m <= span, m, 2.0 * span - m)


def centroid_offset(shape: str, half_extent: float) -> tuple[float, float]:
    """Area centroid minus the shape's centre (only the upward triangle's differs: h/3 below the centre)."""
    return (0.0, half_extent / 3.0) if shape == "triangle" else (0.0, 0.0)


def coverage(shape: str, half_extent: float, cx, cy, size: int = VIDEO_SIZE,
             supersample: int = SUPERSAMPLE) -> np.ndarray:
    """Fraction of each pixel covered by the shape centred at (cx, cy); cx, cy of shape (...) -> (..., size, size)."""
    cx = np.asarray(cx, np.float64)[..., None, None, None, None]
    cy = np.asarray(cy, np.float64)[..., None, None, None, None]
    sub = (np.arange(supersample) + 0.5) / supersample
    grid = np.arange(size)
    # sample point coordinates, axes (..., row, col, sub_y, sub_x)
    xs = (grid[None, :, None, None] + sub[None, None, None, :]) - cx
    ys = (grid[:, None, None, None] + sub[None, None, :, None]) - cy
    h = half_extent
    if shape == "square":
        inside = (np.abs(xs) <= h) & (np.abs(ys) <= h)
    elif shape == "circle":
        inside = xs**2 + ys**2 <= h * h
    elif shape == "diamond":
        inside = np.abs(xs) + np.abs(ys) <= h
    elif shape == "triangle":  # apex up at (0, -h), base from (-h, h) to (h, h)
        inside = (ys <= h) & (np.abs(xs) <= (ys + h) / 2.0)
    else:
        raise ValueError(f"coverage: shape={shape!r} is unknown; allowed: square, circle, diamond, triangle")
    return inside.mean(axis=(-2, -1))


def _validate(num_frames: int, size: int) -> None:
    if not isinstance(num_frames, (int, np.integer)) or isinstance(num_frames, bool) or num_frames < 1:
        raise ValueError(f"render: num_frames={num_frames!r} is invalid; allowed: an int >= 1")
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 16:
        raise ValueError(f"render: size={size!r} is invalid; allowed: an int >= 16 (objects are up to 10 px)")


def _initial_position(obj: SceneObject, size: int, num_frames: int, rng: np.random.Generator) -> np.ndarray:
    """A centre drawn uniformly from positions that leave FREE_FRACTION of the video before the first bounce."""
    h = obj.half_extent
    lo, hi = h, size - h
    free = FREE_FRACTION * (num_frames - 1)
    p = np.empty(2)
    for axis, v in enumerate(obj.velocity):
        a, b = lo, hi
        if v > 0:
            b = max(lo, hi - v * free)
        elif v < 0:
            a = min(hi, lo - v * free)
        p[axis] = rng.uniform(a, b)
    return p


def trajectories(scene_or_prompt: Scene | str, num_frames: int = VIDEO_FRAMES, size: int = VIDEO_SIZE,
                 seed: int = 0) -> np.ndarray:
    """Object centres (num_objects, num_frames, 2) as (x, y), deterministic in `seed`.

    Initial positions are drawn from `seed`; of up to 64 draws the first whose objects' bounding boxes
    never overlap is kept (else the one with the fewest overlapping frame-pairs), so objects rarely occlude.
    """
    scene = as_scene(scene_or_prompt)
    _validate(num_frames, size)
    rng = np.random.default_rng(seed)
    t = np.arange(num_frames, dtype=np.float64)
    best, best_overlap = None, None
    for _ in range(_PLACEMENT_TRIES):
        paths = []
        for obj in scene.objects:
            p0 = _initial_position(obj, size, num_frames, rng)
            h = obj.half_extent
            v = np.asarray(obj.velocity)
            paths.append(fold(p0[None, :] + v[None, :] * t[:, None], h, size - h))
        paths = np.stack(paths)
        overlap = 0
        for i in range(len(scene.objects)):
            for j in range(i):
                reach = scene.objects[i].half_extent + scene.objects[j].half_extent
                d = np.abs(paths[i] - paths[j])
                overlap += int(np.sum((d[:, 0] < reach) & (d[:, 1] < reach)))
        if best_overlap is None or overlap < best_overlap:
            best, best_overlap = paths, overlap
        if overlap == 0:
            break
    return best


def render(scene_or_prompt: Scene | str, num_frames: int = VIDEO_FRAMES, size: int = VIDEO_SIZE,
           seed: int = 0) -> np.ndarray:
    """Render a prompt (or `Scene`) to a uint8 video (num_frames, size, size, 3); deterministic in `seed`."""
    scene = as_scene(scene_or_prompt)
    paths = trajectories(scene, num_frames, size, seed)
    frame = np.empty((num_frames, size, size, 3), np.float64)
    frame[:] = np.asarray(BACKGROUNDS[scene.background], np.float64)
    for obj, path in zip(scene.objects, paths):
        alpha = coverage(obj.shape, obj.half_extent, path[:, 0], path[:, 1], size)[..., None]
        frame = frame * (1.0 - alpha) + np.asarray(obj.rgb, np.float64) * alpha
    return np.rint(frame).astype(np.uint8)


def render_batch(prompts, num_frames: int = VIDEO_FRAMES, size: int = VIDEO_SIZE, seeds=None) -> np.ndarray:
    """Render many prompts to (B, T, size, size, 3) uint8; `seeds` defaults to 0..B-1."""
    prompts = list(prompts)
    seeds = range(len(prompts)) if seeds is None else list(seeds)
    if len(seeds) != len(prompts):
        raise ValueError(f"render_batch: {len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt")
    out = np.empty((len(prompts), num_frames, size, size, 3), np.uint8)
    for i, (p, s) in enumerate(zip(prompts, seeds)):
        out[i] = render(p, num_frames, size, int(s))
    return out
