"""umT5 encoder configuration: a frozen, validated dataclass, the `umt5_xxl` preset Wan2.1 uses, a tiny one."""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp

from vidaccel.checks import check_field, is_int

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
FEED_FORWARD = ("gated-gelu",)


_check = functools.partial(check_field, "UMT5Config")



@dataclasses.dataclass(frozen=True)
class UMT5Config:
    """Architecture and dtype policy of a umT5 encoder (field names follow transformers' UMT5Config).

    umT5 differs from T5 in one place that matters here: every layer has its own relative position bias
    table (T5 shares layer 0's). Attention logits are not scaled by 1/sqrt(d_kv) (T5 folds that into init).

    Dtype policy: `dtype` is the weights' and the matmul inputs' dtype. With 'bfloat16' the residual stream,
    the norms' statistics, the attention logits and softmax and the FFN output projection's accumulation stay
    fp32 (transformers runs a bf16 checkpoint all in bf16; this is closer to the fp32 function, measured in
    tests/test_umt5.py); the output is bf16.
    """

    vocab_size: int = 256384
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"
    pad_token_id: int = 0
    eos_token_id: int = 1
    dtype: str = "float32"

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads"):
            v = getattr(self, name)
            _check(is_int(v) and v >= 1, name, v, "a positive int")
        nb = self.relative_attention_num_buckets
        _check(is_int(nb) and nb >= 4 and nb % 4 == 0, "relative_attention_num_buckets", nb,
               "a multiple of 4 >= 4 (half per direction, half of those exact, half logarithmic)")
        md = self.relative_attention_max_distance
        _check(is_int(md) and md > nb // 4, "relative_attention_max_distance", md,
               f"an int > relative_attention_num_buckets // 4 = {nb // 4} (where the logarithmic buckets start)")
        eps = self.layer_norm_epsilon
        _check(isinstance(eps, int | float) and not isinstance(eps, bool) and 0 < eps < 1, "layer_norm_epsilon",
               eps, "a float in (0, 1)")
        _check(self.feed_forward_proj in FEED_FORWARD, "feed_forward_proj", self.feed_forward_proj,
               f"one of {FEED_FORWARD} (umT5's gated FFN with tanh-approximated GELU)")
        for name in ("pad_token_id", "eos_token_id"):
            v = getattr(self, name)
            _check(is_int(v) and 0 <= v < self.vocab_size, name, v, f"an int in [0, vocab_size={self.vocab_size})")
        _check(self.dtype in _DTYPES, "dtype", self.dtype, f"one of {sorted(_DTYPES)}")

    @property
    def inner_dim(self) -> int:
        """Width of the attention projections: num_heads * d_kv."""
        return self.num_heads * self.d_kv

    @property
    def jnp_dtype(self):
        return _DTYPES[self.dtype]

    def replace(self, **changes) -> UMT5Config:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf(cls, cfg: dict, **overrides) -> UMT5Config:
        """Build from a transformers `config.json` dict of a umT5 model (UMT5EncoderModel or the full model).

        Rejects what this port does not implement (T5's shared position bias, other FFN kinds) by name.
        """
        if not isinstance(cfg, dict):
            raise ValueError(f"config must be a dict read from config.json, got {type(cfg).__name__}")
        model_type = cfg.get("model_type")
        if model_type != "umt5":
            raise ValueError(f"config.json model_type={model_type!r}: only 'umt5' is supported (T5 shares one "
                             "position bias across layers, umT5 has one per layer)")
        ffp = cfg.get("feed_forward_proj", "gated-gelu")
        if ffp not in FEED_FORWARD:
            raise ValueError(f"config.json feed_forward_proj={ffp!r}: only {FEED_FORWARD} is supported")
        missing = [k for k in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads") if k not in cfg]
        if missing:
            raise ValueError(f"config.json lacks fields {missing} (a transformers UMT5Config has them all)")
        fields = {f.name for f in dataclasses.fields(cls)} - {"dtype"}
        kw = {k: v for k, v in cfg.items() if k in fields and v is not None}
        kw.update(overrides)
        return cls(**kw)


def umt5_xxl(**overrides) -> UMT5Config:
    """google/umt5-xxl's encoder, Wan2.1's text encoder: d_model 4096, 24 layers, 64 heads x 64, d_ff 10240."""
    return UMT5Config(**overrides)


def umt5_tiny(**overrides) -> UMT5Config:
    """A tiny umT5 for tests: vocab 64, d_model 32, 2 layers, 4 heads x 8, d_ff 48, 8 buckets, distance 16."""
    kw = dict(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
              relative_attention_num_buckets=8, relative_attention_max_distance=16)
    kw.update(overrides)
    return UMT5Config(**kw)


PRESETS = {"umt5_xxl": umt5_xxl, "umt5_tiny": umt5_tiny}
