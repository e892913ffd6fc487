"""Wan2.1 / SkyReels-V2 diffusion transformers in Flax NNX, with their configs and checkpoint loaders."""

from models.wan.config import WanConfig, preset, wan21_t2v_14b, wan21_t2v_1_3b, wan_tiny
from models.wan.loader import load_transformer, restore_converted, save_converted
from models.wan.transformer import (
    Embedded,
    WanTransformer,
    abstract_transformer,
    assert_finite,
    count_params,
    init_transformer,
)

__all__ = ["load_transformer", "restore_converted", "save_converted", "WanConfig", "preset", "wan21_t2v_1_3b", "wan21_t2v_14b", "wan_tiny", "Embedded", "WanTransformer",
           "abstract_transformer", "assert_finite", "count_params", "init_transformer"]
