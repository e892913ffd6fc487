"""Load diffusers' `AutoencoderKLWan` (Wan2.1 VAE) checkpoints into `WanVAE`.

A pipeline folder with `vae/`, or the `vae/` folder itself: `config.json` plus `diffusion_pytorch_model.safetensors`
or shards listed in `diffusion_pytorch_model.safetensors.index.json`. Tensors stream one at a time with
`safetensors.safe_open(framework="numpy")` into buffers of the target dtype; every key and shape is checked and all
problems are reported together in one ValueError.
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers numpy's "bfloat16", which safe_open needs for BF16 tensors)
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open

from models.checkpoint_files import mismatch_message, part_folder
from models.wan.loader import weight_files
from models.wan_vae.config import DTYPES, WanVAEConfig
from models.wan_vae.model import WanVAE, abstract_wan_vae


def diffusers_key(path: tuple) -> str:
    """Our parameter path -> diffusers' key: `kernel` is `weight`, a Resample's spatial conv is `resample.1`."""
    parts = [str(p) for p in path]
    if parts[-1] == "kernel":
        parts[-1] = "weight"
    if len(parts) >= 2 and parts[-2] == "resample":
        parts.insert(len(parts) - 1, "1")
    return ".".join(parts)


def to_ours(arr: np.ndarray, target_shape: tuple[int, ...]) -> np.ndarray:
    """torch layout -> ours: Conv3d (O, I, kt, kh, kw) -> (kt, kh, kw, I, O); Conv2d (O, I, kh, kw) -> (kh, kw, I, O);
    RMS-norm gains (C, 1, 1[, 1]) -> (C,)."""
    if len(target_shape) == 1 and arr.ndim > 1 and all(d == 1 for d in arr.shape[1:]):
        return arr.reshape(arr.shape[0])
    if arr.ndim == 5:
        return arr.transpose(2, 3, 4, 1, 0)
    if arr.ndim == 4:
        return arr.transpose(2, 3, 1, 0)
    return arr


def resolve_vae_folder(path: str | Path) -> tuple[Path, dict]:
    """The VAE folder (`path/vae` when `path` is a pipeline root) and its parsed config.json."""
    return part_folder(path, "vae", "VAE checkpoint", "diffusers' vae/ folder or a pipeline root that holds one")


def load_wan_vae(path: str | Path, dtype: str = "float32") -> WanVAE:
    """Load a Wan2.1 VAE from a diffusers pipeline folder (its `vae/`) or the VAE folder itself.

    dtype: 'float32' or 'bfloat16' (parameters and activations; norms normalise in fp32).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: allowed are {sorted(DTYPES)}")
    folder, raw = resolve_vae_folder(path)
    cfg = WanVAEConfig.from_hf(raw, dtype=dtype)
    files = weight_files(folder)
    graphdef, abs_state = nnx.split(abstract_wan_vae(cfg))
    flat = list(nnx.to_flat_state(abs_state))
    buffers = {diffusers_key(p): np.empty(v.shape, v.dtype) for p, v in flat}
    seen, unexpected, misshaped = set(), [], []
    for file in files:
        try:
            with safe_open(file, framework="numpy") as st:
                for key in st.keys():
                    buf = buffers.get(key)
                    if buf is None:
                        unexpected.append(key)
                        continue
                    arr = to_ours(st.get_tensor(key), buf.shape)
                    if arr.shape != buf.shape:
                        seen.add(key)  # present, just mis-shaped: not "missing" too
                        misshaped.append(f"{key}: checkpoint {tuple(st.get_slice(key).get_shape())} vs model "
                                         f"{buf.shape} (ours, after transposing)")
                        continue
                    buf[...] = arr
                    seen.add(key)
        except SafetensorError as err:
            raise ValueError(f"{file}: not a readable safetensors file ({err}); it is truncated or corrupt "
                             "(download it again)") from err
    missing = sorted(set(buffers) - seen)
    if missing or unexpected or misshaped:
        raise ValueError(_mismatch_message(folder, cfg, missing, unexpected, misshaped))
    for p, var in flat:
        var.set_value(jnp.asarray(buffers[diffusers_key(p)]))
    return nnx.merge(graphdef, abs_state)


def _mismatch_message(folder, cfg: WanVAEConfig, missing, unexpected, misshaped) -> str:
    return mismatch_message(f"VAE checkpoint {folder} does not match the model built from its config.json "
                            f"(base_dim={cfg.base_dim}, z_dim={cfg.z_dim}, dim_mult={cfg.dim_mult}, "
                            f"num_res_blocks={cfg.num_res_blocks}):", missing, unexpected, misshaped)
