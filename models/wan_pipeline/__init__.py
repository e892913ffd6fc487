"""Prompt to pixels on a diffusers Wan pipeline folder (Wan2.1 T2V, SkyReels-V2 DF): umT5, the Wan transformer
and the Wan VAE loaded from the folder, sampled with any vidaccel method."""

from models.wan_pipeline.folder import PipelineFolder, SchedulerSettings, read_pipeline_folder
from models.wan_pipeline.pipeline import (
    GenerateOutput,
    Pipeline,
    check_video_size,
    decode,
    df_windows,
    encode_prompt,
    generate,
    latent_frames,
    load_pipeline,
    make_solver,
    to_uint8,
    with_causal_block_size,
)

__all__ = ["PipelineFolder", "SchedulerSettings", "read_pipeline_folder", "GenerateOutput", "Pipeline",
           "check_video_size", "decode", "df_windows", "encode_prompt", "generate", "latent_frames", "load_pipeline",
           "make_solver", "to_uint8", "with_causal_block_size"]
