"""Wan2.1 transformer configuration: a frozen, validated dataclass and named presets."""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp

from vidaccel.checks import check_field

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


_check = functools.partial(check_field, "WanConfig")


@dataclasses.dataclass(frozen=True)
class WanConfig:
    """Architecture and dtype policy of a Wan2.1-style DiT (field names follow diffusers' config.json).

    `num_frame_per_block > 1` turns on SkyReels-V2 block-causal self-attention: a token of frame f sees
    keys of frames g with g // n <= f // n. As in diffusers, `num_frame_per_block == 1` means no mask.

    Dtype policy: `param_dtype`/`dtype` are the weights and activations of the big matmuls (bf16 for real
    runs); the time embedding, modulation tables and norms stay fp32 as official Wan keeps them.
    """

    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_attention_heads: int = 12
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 8960
    num_layers: int = 30
    cross_attn_norm: bool = True
    qk_norm: str | None = "rms_norm_across_heads"
    eps: float = 1e-6
    rope_max_seq_len: int = 1024
    rope_theta: float = 10000.0   # RoPE base (Wan's value; a tiny grid may want a smaller one)
    num_frame_per_block: int = 1
    param_dtype: str = "float32"
    dtype: str = "float32"

    def __post_init__(self):
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        _check(len(self.patch_size) == 3 and all(p >= 1 for p in self.patch_size), "patch_size",
               self.patch_size, "three positive ints (t, h, w)")
        for name in ("num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "text_dim",
                     "ffn_dim", "num_layers", "rope_max_seq_len", "num_frame_per_block"):
            v = getattr(self, name)
            _check(isinstance(v, int) and v >= 1, name, v, "a positive int")
        _check(self.attention_head_dim % 2 == 0 and self.attention_head_dim >= 6, "attention_head_dim",
               self.attention_head_dim, "an even int >= 6 (3D RoPE needs pairs on t, h and w)")
        _check(isinstance(self.freq_dim, int) and self.freq_dim >= 2 and self.freq_dim % 2 == 0, "freq_dim",
               self.freq_dim, "an even int >= 2")
        _check(self.qk_norm in ("rms_norm_across_heads", None), "qk_norm", self.qk_norm,
               "'rms_norm_across_heads' or None")
        _check(self.eps > 0, "eps", self.eps, "a positive float")
        _check(isinstance(self.rope_theta, int | float) and not isinstance(self.rope_theta, bool)
               and self.rope_theta > 1, "rope_theta", self.rope_theta, "a float > 1")
        for name in ("param_dtype", "dtype"):
            _check(getattr(self, name) in _DTYPES, name, getattr(self, name), f"one of {sorted(_DTYPES)}")

    @property
    def dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def block_causal(self) -> bool:
        return self.num_frame_per_block > 1

    @property
    def jnp_param_dtype(self):
        return _DTYPES[self.param_dtype]

    @property
    def jnp_dtype(self):
        return _DTYPES[self.dtype]

    def replace(self, **changes) -> WanConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_diffusers_config(cls, cfg: dict, **overrides) -> WanConfig:
        """Build from a diffusers `config.json` dict (WanTransformer3DModel / SkyReelsV2Transformer3DModel)."""
        unsupported = {k: cfg[k] for k in ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len")
                       if cfg.get(k) is not None}
        if cfg.get("inject_sample_info"):
            unsupported["inject_sample_info"] = True
        if unsupported:
            raise ValueError(f"config.json asks for features this port does not implement: {unsupported} "
                             "(only text-to-video Wan2.1 / SkyReels-V2 DF transformers are supported)")
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {k: (tuple(v) if k == "patch_size" else v) for k, v in cfg.items() if k in fields}
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def from_official_config(cls, cfg: dict, **overrides) -> WanConfig:
        """Build from an official Wan2.1 `config.json` (`dim`, `num_heads`, `in_dim`, ...)."""
        if cfg.get("model_type", "t2v") != "t2v":
            raise ValueError(f"official config model_type={cfg.get('model_type')!r}: only 't2v' is supported")
        missing = [k for k in ("dim", "num_heads", "num_layers", "ffn_dim") if k not in cfg]
        if missing:
            raise ValueError(f"official config.json lacks fields {missing}")
        if cfg["dim"] % cfg["num_heads"]:
            raise ValueError(f"official config dim={cfg['dim']} is not divisible by num_heads={cfg['num_heads']}")
        kw = dict(
            patch_size=tuple(cfg.get("patch_size", (1, 2, 2))),
            num_attention_heads=cfg["num_heads"],
            attention_head_dim=cfg["dim"] // cfg["num_heads"],
            in_channels=cfg.get("in_dim", 16),
            out_channels=cfg.get("out_dim", 16),
            text_dim=cfg.get("text_dim", 4096),
            freq_dim=cfg.get("freq_dim", 256),
            ffn_dim=cfg["ffn_dim"],
            num_layers=cfg["num_layers"],
            cross_attn_norm=cfg.get("cross_attn_norm", True),
            qk_norm="rms_norm_across_heads" if cfg.get("qk_norm", True) else None,
            eps=cfg.get("eps", 1e-6),
            num_frame_per_block=cfg.get("num_frame_per_block", 1),
        )
        kw.update(overrides)
        return cls(**kw)


def wan21_t2v_1_3b(**overrides) -> WanConfig:
    """Wan2.1 T2V 1.3B: dim 1536, 30 layers, 12 heads, ffn 8960 (1,418,996,800 parameters)."""
    return WanConfig(num_attention_heads=12, ffn_dim=8960, num_layers=30, **overrides)


def wan21_t2v_14b(**overrides) -> WanConfig:
    """Wan2.1 T2V 14B: dim 5120, 40 layers, 40 heads, ffn 13824 (14,288,491,584 parameters)."""
    return WanConfig(num_attention_heads=40, ffn_dim=13824, num_layers=40, **overrides)


def wan_tiny(**overrides) -> WanConfig:
    """A tiny Wan for tests: dim 32 (2 heads x 16), 2 layers, 4 latent channels, text_dim 16."""
    kw = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, text_dim=16,
              freq_dim=32, ffn_dim=64, num_layers=2)
    kw.update(overrides)
    return WanConfig(**kw)


PRESETS = {"wan21_t2v_1_3b": wan21_t2v_1_3b, "wan21_t2v_14b": wan21_t2v_14b, "wan_tiny": wan_tiny}


def preset(name: str, **overrides) -> WanConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown Wan preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name](**overrides)
