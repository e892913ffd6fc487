"""The shapes world: vidaccel's embedded synthetic text-to-video default (see docs/shapes_world.md).

Prompts of coloured shapes bouncing over a uniform background (`prompts`), a deterministic renderer
(`render`), an exactly invertible video<->latent map and a fixed prompt encoder standing in for Wan's VAE
and umT5 (`latents`), and an analytic prompt-adherence detector (`adherence`).
"""

from models.shapes.adherence import CHANCE, CRITERIA, adherence, score_video
from models.shapes.latents import (
    LATENT_CHANNELS,
    LATENT_FRAMES,
    LATENT_SIZE,
    PIXEL_MEAN,
    PIXEL_STD,
    SPATIAL_GROUP,
    TEMPORAL_GROUP,
    TEXT_DIM,
    TEXT_LEN,
    decode_latents,
    encode_prompts,
    encode_video,
    measure_pixel_stats,
    prompt_tokens,
    to_uint8,
)
from models.shapes.prompts import (
    BACKGROUNDS,
    COLORS,
    DIRECTIONS,
    FUNCTION_WORDS,
    MAX_OBJECTS,
    SHAPES,
    SIZES,
    SPEEDS,
    VOCABULARY,
    Scene,
    SceneObject,
    check_prompts,
    parse_prompt,
    prompt_split,
    sample_prompts,
    sample_scene,
)
from models.shapes.render import VIDEO_FRAMES, VIDEO_SIZE, render, render_batch, trajectories

__all__ = [
    "BACKGROUNDS", "CHANCE", "COLORS", "CRITERIA", "DIRECTIONS", "FUNCTION_WORDS", "LATENT_CHANNELS",
    "LATENT_FRAMES", "LATENT_SIZE", "MAX_OBJECTS", "PIXEL_MEAN", "PIXEL_STD", "SHAPES", "SIZES",
    "SPATIAL_GROUP", "SPEEDS", "TEMPORAL_GROUP", "TEXT_DIM", "TEXT_LEN", "VIDEO_FRAMES", "VIDEO_SIZE",
    "VOCABULARY", "Scene", "SceneObject", "adherence", "decode_latents", "encode_prompts", "encode_video",
    "measure_pixel_stats", "check_prompts", "parse_prompt", "prompt_split", "prompt_tokens", "render", "render_batch",
    "sample_prompts", "sample_scene", "score_video", "to_uint8", "trajectories",
]
