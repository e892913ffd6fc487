"""Wan2.1 / SkyReels-V2 diffusion transformers in Flax NNX, with their configs, checkpoint loaders and the dense
`Denoiser` that methods wrap."""

from models.wan.config import WanConfig, preset, wan21_t2v_1_3b, wan21_t2v_14b, wan_tiny
from models.wan.denoiser import wan_denoiser
from models.wan.loader import load_transformer, read_converted, restore_converted, save_converted
from models.wan.transformer import Embedded, WanTransformer, abstract_transformer, count_params, init_transformer

__all__ = ["WanConfig", "preset", "wan21_t2v_1_3b", "wan21_t2v_14b", "wan_tiny", "wan_denoiser",
           "load_transformer", "read_converted", "restore_converted", "save_converted", "Embedded", "WanTransformer",
           "abstract_transformer", "count_params", "init_transformer"]
