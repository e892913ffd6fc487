"""Write and read video files: MP4 (H.264 through the ffmpeg binary that `imageio-ffmpeg` ships) and GIF
(imageio's Pillow plugin). Frames are (F, H, W, 3) uint8."""

from __future__ import annotations

from pathlib import Path

import imageio.v2 as iio2
import imageio.v3 as iio
import numpy as np

FORMATS = (".mp4", ".gif")


def check_frames(frames) -> np.ndarray:
    """`frames` as (F, H, W, 3) uint8, or a ValueError saying what is expected."""
    arr = np.asarray(frames)
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8 or arr.shape[0] < 1:
        raise ValueError(f"frames must be (F, H, W, 3) uint8 with F >= 1, got shape {arr.shape} dtype {arr.dtype}")
    return arr


def write_video(path: str | Path, frames, fps: int = 16, *, quality: int = 8) -> Path:
    """Write `frames` to `path`; the suffix picks the format (.mp4: H.264 yuv420p, needs even H and W; .gif).

    quality: ffmpeg's 0-10 scale for MP4 (8 is near-transparent on these sizes)."""
    path = Path(path)
    frames = check_frames(frames)
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"{path}: unsupported video format {suffix!r}; use one of {FORMATS}")
    if fps < 1:
        raise ValueError(f"fps must be >= 1, got {fps}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".gif":
        iio.imwrite(path, frames, extension=".gif", duration=int(round(1000 / fps)), loop=0)
        return path
    h, w = frames.shape[1:3]
    if h % 2 or w % 2:
        raise ValueError(f"MP4 (H.264, yuv420p) needs even height and width, got {h}x{w}; write a .gif instead")
    # macro_block_size=1: keep the exact size (imageio would otherwise resize to multiples of 16).
    with iio2.get_writer(path, format="FFMPEG", fps=fps, codec="libx264", quality=quality, macro_block_size=1,
                         pixelformat="yuv420p") as writer:
        for frame in frames:
            writer.append_data(frame)
    return path


def read_video(path: str | Path) -> np.ndarray:
    """All frames of an MP4 or GIF as (F, H, W, 3) uint8."""
    path = Path(path)
    if path.suffix.lower() == ".gif":
        return np.asarray(iio.imread(path, extension=".gif", mode="RGB"))
    with iio2.get_reader(path, format="FFMPEG") as reader:
        return np.stack([np.asarray(frame) for frame in reader])
