"""Wan2.1 VAE configuration: a frozen, validated dataclass, the real preset, and `from_hf` for diffusers' config."""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

import jax.numpy as jnp

from vidaccel.checks import check_field, is_int, is_real

log = logging.getLogger(__name__)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
FRAME_CHUNK = 4  # encode runs frames 1, then chunks of 4 (diffusers hard-codes it whatever the config)

# The per-channel latent statistics of the released Wan2.1 VAE (diffusers' AutoencoderKLWan defaults).
WAN21_LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                      0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                     3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)

# diffusers config.json keys that carry no architecture (or that this port derives itself).
_INFORMATIONAL = {"scale_factor_temporal", "scale_factor_spatial", "dropout"}


_check = functools.partial(check_field, "WanVAEConfig")




def _as_tuple(v: Any) -> Any:
    return tuple(v) if isinstance(v, list | tuple) else v


@dataclasses.dataclass(frozen=True)
class WanVAEConfig:
    """Architecture and dtype of a Wan2.1 causal 3D VAE (field names follow diffusers' `AutoencoderKLWan`).

    `temperal_downsample[i]` (diffusers' spelling) says whether encoder level i also halves time; the decoder
    mirrors it. Space shrinks by 2 at every level but the last: `spatial_ratio = 2 ** (len(dim_mult) - 1)`.
    `attn_scales` must stay empty (attention only in the mid blocks; diffusers fails on anything else).
    `dtype` is the parameters' and activations' dtype (norms normalise in fp32).
    """

    base_dim: int = 96
    decoder_base_dim: int | None = None
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
    latents_std: tuple[float, ...] = WAN21_LATENTS_STD
    in_channels: int = 3
    out_channels: int = 3
    dtype: str = "float32"

    def __post_init__(self):
        for name in ("dim_mult", "attn_scales", "temperal_downsample", "latents_mean", "latents_std"):
            object.__setattr__(self, name, _as_tuple(getattr(self, name)))
        for name in ("base_dim", "z_dim", "num_res_blocks", "in_channels", "out_channels"):
            v = getattr(self, name)
            _check(is_int(v) and v >= 1, name, v, "a positive int")
        _check(self.decoder_base_dim is None or (is_int(self.decoder_base_dim) and self.decoder_base_dim >= 1),
               "decoder_base_dim", self.decoder_base_dim, "None (same as base_dim) or a positive int")
        _check(isinstance(self.dim_mult, tuple) and len(self.dim_mult) >= 1
               and all(is_int(m) and m >= 1 for m in self.dim_mult), "dim_mult", self.dim_mult,
               "a non-empty sequence of positive ints")
        _check(self.attn_scales == (), "attn_scales", self.attn_scales,
               "empty: the Wan2.1 VAE has attention only in its mid blocks (diffusers' AutoencoderKLWan cannot run "
               "encoder attention either)")
        n_down = len(self.dim_mult) - 1 if isinstance(self.dim_mult, tuple) else 0
        _check(isinstance(self.temperal_downsample, tuple) and len(self.temperal_downsample) == n_down
               and all(isinstance(t, bool) for t in self.temperal_downsample), "temperal_downsample",
               self.temperal_downsample, f"a sequence of {n_down} bools (one per downsampling level, "
               "len(dim_mult) - 1)")
        _check(sum(self.temperal_downsample) <= 2, "temperal_downsample", self.temperal_downsample,
               f"at most 2 True: encode runs chunks of {FRAME_CHUNK} frames, which 3 halvings cannot divide")
        for name in ("latents_mean", "latents_std"):
            v = getattr(self, name)
            _check(isinstance(v, tuple) and len(v) == self.z_dim and all(is_real(x) for x in v), name, v,
                   f"z_dim={self.z_dim} real numbers")
        _check(all(s > 0 for s in self.latents_std), "latents_std", self.latents_std, "positive numbers")
        _check(self.dtype in DTYPES, "dtype", self.dtype, f"one of {sorted(DTYPES)}")

    @property
    def decoder_dim(self) -> int:
        return self.base_dim if self.decoder_base_dim is None else self.decoder_base_dim

    @property
    def spatial_ratio(self) -> int:
        """Pixels per latent, along H and along W."""
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_ratio(self) -> int:
        """Frames per latent frame after the first."""
        return 2 ** sum(self.temperal_downsample)

    @property
    def jnp_dtype(self):
        return DTYPES[self.dtype]

    def latent_frames(self, frames: int) -> int:
        """Latent frames for a video of `frames = 1 + 4k` frames: 1 + k * 4 / temporal_ratio."""
        return 1 + (frames - 1) // FRAME_CHUNK * (FRAME_CHUNK // self.temporal_ratio)

    def video_frames(self, latent_frames: int) -> int:
        """Frames decoded from `latent_frames`: 1 + (latent_frames - 1) * temporal_ratio."""
        return 1 + (latent_frames - 1) * self.temporal_ratio

    def replace(self, **changes) -> WanVAEConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf(cls, cfg: dict, **overrides) -> WanVAEConfig:
        """Build from diffusers' `vae/config.json` dict (`AutoencoderKLWan`); Wan2.2 variants are refused."""
        if not isinstance(cfg, dict):
            raise ValueError(f"from_hf expects the parsed config.json dict, got {type(cfg).__name__}")
        name = cfg.get("_class_name", "AutoencoderKLWan")
        if name != "AutoencoderKLWan":
            raise ValueError(f"config.json _class_name={name!r}: only 'AutoencoderKLWan' (the Wan2.1 VAE) is supported")
        unsupported = {}
        if cfg.get("is_residual"):
            unsupported["is_residual"] = cfg["is_residual"]
        if cfg.get("patch_size") not in (None, 1):
            unsupported["patch_size"] = cfg["patch_size"]
        if unsupported:
            raise ValueError(f"config.json asks for Wan2.2 VAE features this port does not implement: {unsupported} "
                             "(only the Wan2.1 VAE: is_residual false, patch_size null)")
        fields = {f.name for f in dataclasses.fields(cls)}
        kw, ignored = {}, []
        for k, v in cfg.items():
            if k in fields and k != "dtype":
                kw[k] = v
            elif not k.startswith("_") and k not in _INFORMATIONAL and k not in ("is_residual", "patch_size"):
                ignored.append(k)
        if ignored:
            log.warning("WanVAEConfig.from_hf ignores unknown config.json keys %s", ignored)
        kw.update(overrides)
        return cls(**kw)


def wan21_vae(**overrides) -> WanVAEConfig:
    """The released Wan2.1 VAE (Wan-AI/Wan2.1-T2V-*-Diffusers `vae/`): base 96, z 16, mults (1,2,4,4)."""
    return WanVAEConfig(**overrides)


def wan_vae_tiny(**overrides) -> WanVAEConfig:
    """A tiny VAE with the real one's structure (4 levels, time halved at levels 1 and 2), for tests and demos."""
    kw = dict(base_dim=4, z_dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=1,
              latents_mean=(0.1, -0.2, 0.3, 0.0), latents_std=(1.5, 0.5, 2.0, 1.0))
    kw.update(overrides)
    return WanVAEConfig(**kw)
