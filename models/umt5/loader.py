"""Load a transformers umT5 encoder checkpoint (Wan pipelines' `text_encoder/`) into `UMT5Encoder`.

The folder holds `config.json` and `model.safetensors`, or shards listed in `model.safetensors.index.json`;
a pipeline root with a `text_encoder/` subfolder works too. Tensors stream one at a time with
`safetensors.safe_open(framework="numpy")` into preallocated stacked (num_layers, ...) buffers of the target
dtype, so the checkpoint is never held twice. Every key and shape is checked and all problems are reported
together in one `ValueError`. The token embedding is accepted under either name transformers uses for the
tied table (`shared.weight`, `encoder.embed_tokens.weight`); a full encoder-decoder checkpoint's
`decoder.*` and `lm_head.*` tensors are skipped.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers numpy's "bfloat16", which safe_open needs for BF16 tensors)
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open

from models.checkpoint_files import mismatch_message, part_folder, safetensors_files
from models.umt5.config import UMT5Config
from models.umt5.encoder import UMT5Encoder, abstract_umt5

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
SUBFOLDER = "text_encoder"
EMBED_KEYS = ("shared.weight", "encoder.embed_tokens.weight")
SKIPPED = re.compile(r"(decoder\.|lm_head\.).*")

# Our per-layer parameter -> (transformers module under encoder.block.{i}., is a Linear kernel to transpose).
_LAYER = {
    "attn_norm": ("layer.0.layer_norm", False),
    "q": ("layer.0.SelfAttention.q", True),
    "k": ("layer.0.SelfAttention.k", True),
    "v": ("layer.0.SelfAttention.v", True),
    "o": ("layer.0.SelfAttention.o", True),
    "relative_bias": ("layer.0.SelfAttention.relative_attention_bias", False),
    "ffn_norm": ("layer.1.layer_norm", False),
    "wi_0": ("layer.1.DenseReluDense.wi_0", True),
    "wi_1": ("layer.1.DenseReluDense.wi_1", True),
    "wo": ("layer.1.DenseReluDense.wo", True),
}


def resolve_text_encoder(path: str | Path) -> tuple[Path, dict]:
    """Find the text-encoder folder (`path` or `path/text_encoder`) and read its config.json."""
    return part_folder(path, SUBFOLDER, "text encoder",
                       f"a transformers umT5 folder or a pipeline root with {SUBFOLDER}/")


def text_encoder_files(folder: Path) -> list[Path]:
    """The safetensors files: those the shard index lists if there is one, else model.safetensors."""
    return safetensors_files(folder, WEIGHTS, INDEX)


def load_umt5(path: str | Path, dtype: str = "bfloat16", **config_overrides) -> UMT5Encoder:
    """Load a umT5 encoder from a transformers folder or a pipeline root with `text_encoder/`.

    dtype: 'bfloat16' (weights bf16, residual stream fp32; see `UMT5Config`) or 'float32'.
    """
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype={dtype!r}: allowed are 'float32' and 'bfloat16'")
    folder, raw = resolve_text_encoder(path)
    cfg = UMT5Config.from_hf(raw, dtype=dtype, **config_overrides)
    return _load_weights(cfg, folder, text_encoder_files(folder))


def _load_weights(cfg: UMT5Config, folder: Path, files: list[Path]) -> UMT5Encoder:
    graphdef, abs_state = nnx.split(abstract_umt5(cfg))
    buffers = {tuple(str(p) for p in path): np.empty(var.shape, var.dtype)
               for path, var in nnx.to_flat_state(abs_state)}
    targets = {"encoder.final_layer_norm.weight": (buffers[("final_norm",)], None, False)}
    for name, (module, transpose) in _LAYER.items():
        for i in range(cfg.num_layers):
            targets[f"encoder.block.{i}.{module}.weight"] = (buffers[("layers", name)], i, transpose)
    embed = buffers[("embed",)]

    seen, unexpected, misshaped, skipped = set(), [], [], 0
    for file in files:
        try:
            with safe_open(file, framework="numpy") as st:
                for key in st.keys():
                    if key in EMBED_KEYS:
                        buf, i, transpose = embed, None, False
                    elif key in targets:
                        buf, i, transpose = targets[key]
                    elif SKIPPED.fullmatch(key):
                        skipped += 1
                        continue
                    else:
                        unexpected.append(key)
                        continue
                    want = buf.shape[1:] if i is not None else buf.shape
                    shape = tuple(st.get_slice(key).get_shape())
                    if (shape[::-1] if transpose else shape) != want:
                        misshaped.append(f"{key}: checkpoint {shape} vs model {want[::-1] if transpose else want}"
                                         " (torch layout)")
                        seen.add("embed" if key in EMBED_KEYS else key)   # reported as mis-shaped, not missing
                        continue
                    if key in EMBED_KEYS and "embed" in seen:
                        continue        # the tied table under its second name
                    arr = st.get_tensor(key)
                    arr = arr.T if transpose else arr
                    if i is None:
                        buf[...] = arr
                    else:
                        buf[i] = arr
                    seen.add("embed" if key in EMBED_KEYS else key)
        except SafetensorError as err:
            raise ValueError(f"{file}: not a readable safetensors file ({err}); it is truncated or corrupt "
                             "(download it again)") from err
    missing = sorted(set(targets) - seen) + ([] if "embed" in seen else [" or ".join(EMBED_KEYS)])
    if missing or unexpected or misshaped:
        raise ValueError(_mismatch_message(folder, cfg, missing, unexpected, misshaped))
    if skipped:
        log.info("%s: skipped %d decoder / lm_head tensors (only the encoder is used)", folder, skipped)
    for path, var in nnx.to_flat_state(abs_state):
        var.set_value(jnp.asarray(buffers[tuple(str(p) for p in path)]))
    return nnx.merge(graphdef, abs_state)


def _mismatch_message(folder, cfg: UMT5Config, missing, unexpected, misshaped) -> str:
    return mismatch_message(f"checkpoint {folder} does not match the umT5 encoder built from its config.json "
                            f"(vocab={cfg.vocab_size}, d_model={cfg.d_model}, layers={cfg.num_layers}, "
                            f"heads={cfg.num_heads}x{cfg.d_kv}, d_ff={cfg.d_ff}, "
                            f"buckets={cfg.relative_attention_num_buckets}):", missing, unexpected, misshaped)
