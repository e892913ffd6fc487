"""Load Wan2.1 / SkyReels-V2 transformer checkpoints (diffusers or official layout) into `WanTransformer`.

- diffusers: a folder with `config.json` and `diffusion_pytorch_model.safetensors`, or shards listed in
  `diffusion_pytorch_model.safetensors.index.json`; the pipeline root with a `transformer/` subfolder works too.
- official Wan2.1: official key names (`blocks.0.self_attn.q.weight`, `head.head.weight`, ...) and the official
  `config.json` (`dim`, `num_heads`, `in_dim`, ...).

Tensors stream shard by shard, one at a time, into preallocated stacked (num_layers, ...) buffers of the
target dtype, so the checkpoint is never held twice. Every key and shape is checked; all problems are
reported together in one `ValueError`. Files are read with `safetensors.safe_open(framework="numpy")`
(BF16 comes back as ml_dtypes' bfloat16). Converted parameters can be saved and restored with Orbax; the
folder's `wan_config.json` marker records the config and the checkpoint the parameters came from.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers numpy's "bfloat16", which safe_open needs for BF16 tensors)
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from safetensors import SafetensorError, safe_open

from models.checkpoint_files import mismatch_message, part_folder, safetensors_files
from models.wan.config import WanConfig
from models.wan.transformer import WanTransformer, abstract_transformer

log = logging.getLogger(__name__)

WEIGHTS = "diffusion_pytorch_model.safetensors"
INDEX = "diffusion_pytorch_model.safetensors.index.json"
IGNORED_KEYS = re.compile(r".*norm_added_q.*")  # diffusers ignores these too
MARKER = "wan_config.json"
MARKER_FORMAT = "vidaccel-wan-converted-v2"

# Our parameter path (without the layer index) -> diffusers module name.
_TOP = {
    "patch_embedding": "patch_embedding",
    "text_embedder.linear_1": "condition_embedder.text_embedder.linear_1",
    "text_embedder.linear_2": "condition_embedder.text_embedder.linear_2",
    "time_embedder.linear_1": "condition_embedder.time_embedder.linear_1",
    "time_embedder.linear_2": "condition_embedder.time_embedder.linear_2",
    "time_embedder.time_proj": "condition_embedder.time_proj",
    "proj_out": "proj_out",
}
_BLOCK = {
    **{f"attn{a}.{p}": f"attn{a}.{p}" for a in (1, 2) for p in ("to_q", "to_k", "to_v", "norm_q", "norm_k")},
    "attn1.to_out": "attn1.to_out.0",
    "attn2.to_out": "attn2.to_out.0",
    "norm2": "norm2",
    "ffn.proj_in": "ffn.net.0.proj",
    "ffn.proj_out": "ffn.net.2",
}
# Official module names inside a block -> diffusers ones (convert_wan_to_diffusers.py's table).
_OFFICIAL_BLOCK = {
    **{f"self_attn.{p}": f"attn1.to_{p}" for p in "qkv"}, "self_attn.o": "attn1.to_out.0",
    **{f"cross_attn.{p}": f"attn2.to_{p}" for p in "qkv"}, "cross_attn.o": "attn2.to_out.0",
    **{f"{a}.norm_{p}": f"{b}.norm_{p}" for a, b in (("self_attn", "attn1"), ("cross_attn", "attn2")) for p in "qk"},
    "norm3": "norm2", "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2", "modulation": "scale_shift_table",
}
_OFFICIAL_TOP = {
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
    "patch_embedding": "patch_embedding",
}


def official_to_diffusers_key(key: str) -> str:
    """Rename one official Wan2.1 key to its diffusers name (unknown keys come back unchanged)."""
    if key == "head.modulation":
        return "scale_shift_table"
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", key) or re.fullmatch(r"blocks\.(\d+)\.(modulation)()", key)
    if m:
        i, mod, leaf = m.groups()
        mod = _OFFICIAL_BLOCK.get(mod, mod)
        return f"blocks.{i}.{mod}" + (f".{leaf}" if leaf else "")
    m = re.fullmatch(r"(.+)\.(weight|bias)", key)
    if m and m.group(1) in _OFFICIAL_TOP:
        return f"{_OFFICIAL_TOP[m.group(1)]}.{m.group(2)}"
    return key


def _diffusers_name(path: tuple[str, ...]) -> tuple[str, bool, str]:
    """Our flat param path -> (diffusers key, or template with {i} for stacked layers; stacked?; leaf kind)."""
    *mod, leaf = path
    if mod and mod[0] == "layers":
        sub = ".".join(mod[1:])
        if sub == "" and leaf == "scale_shift_table":
            return "blocks.{i}.scale_shift_table", True, "table"
        name = _BLOCK[sub]
        return f"blocks.{{i}}.{name}.{'weight' if leaf == 'kernel' else leaf}", True, leaf
    if not mod and leaf == "scale_shift_table":
        return "scale_shift_table", False, "table"
    name = _TOP[".".join(mod)]
    return f"{name}.{'weight' if leaf == 'kernel' else leaf}", False, leaf


def _to_ours(arr: np.ndarray, kind: str, target_shape: tuple[int, ...]) -> np.ndarray:
    """torch layout -> ours: Linear (out, in) -> (in, out); Conv3d (O, I, kt, kh, kw) -> (kt, kh, kw, I, O)."""
    if kind == "kernel":
        if arr.ndim == 5:
            return arr.transpose(2, 3, 4, 1, 0)
        if arr.ndim == 2:
            return arr.T
    return arr


def resolve_checkpoint(path: str | Path) -> tuple[Path, dict, str]:
    """Find the transformer folder, read its config.json and tell its layout ('diffusers' or 'official')."""
    folder, cfg = part_folder(path, "transformer", "checkpoint",
                              "a diffusers transformer folder, a diffusers pipeline root with transformer/, or an "
                              "official Wan2.1 folder")
    cfg_path = folder / "config.json"
    if "num_attention_heads" in cfg:
        layout = "diffusers"
    elif "num_heads" in cfg and "dim" in cfg:
        layout = "official"
    else:
        raise ValueError(f"{cfg_path}: neither a diffusers (num_attention_heads, ...) nor an official Wan2.1 "
                         "(dim, num_heads, ...) transformer config")
    return folder, cfg, layout


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a transformer checkpoint: the shards the index lists, the single file, or any."""
    return safetensors_files(folder, WEIGHTS, INDEX, any_safetensors=True)


def load_transformer(path: str | Path, dtype: str = "float32", *, cache_dir: str | Path | None = None,
                     **config_overrides) -> WanTransformer:
    """Load a Wan2.1 / SkyReels-V2 transformer; callable as `model(x, t, context)` on channels-last latents.

    dtype: 'float32' (everything fp32) or 'bfloat16' (matmul weights and activations bf16; time embedding,
    modulation tables and norms fp32). `config_overrides` replace config fields (e.g. `num_frame_per_block=2`
    to run a SkyReels-V2 DF checkpoint block-causally).

    `cache_dir`: where Orbax keeps the converted parameters. Its `wan_config.json` records the checkpoint
    they came from (resolved path, size and mtime of config.json and every weight file) and the dtype. When
    that matches this call and the parameters have this config's shapes, they are restored (overrides that
    do not change parameters, like `num_frame_per_block`, apply to the restored model); otherwise (another
    checkpoint, a changed file, another dtype, a cache without a marker or with one from an older version)
    the checkpoint is converted again and overwrites the cache, with a logged warning. A corrupt marker is
    a ValueError (delete the folder to convert again).
    """
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype={dtype!r}: allowed are 'float32' and 'bfloat16'")
    if cache_dir is not None and not Path(path).exists() and (Path(cache_dir) / MARKER).exists():
        raise FileNotFoundError(f"checkpoint path {path} does not exist, so the cache {cache_dir} cannot be checked "
                                f"against it; to load the cache alone use restore_converted({str(cache_dir)!r})")
    folder, raw, layout = resolve_checkpoint(path)
    make = WanConfig.from_diffusers_config if layout == "diffusers" else WanConfig.from_official_config
    cfg = make(raw, param_dtype=dtype, dtype=dtype, **config_overrides)
    files = weight_files(folder)
    source = {"checkpoint": str(folder.resolve()), "dtype": dtype, "overrides": config_overrides,
              "files": {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in [folder / "config.json", *files]}}
    source = json.loads(json.dumps(source, default=str))  # as it reads back from the marker
    if cache_dir is not None:
        why = _cache_mismatch(Path(cache_dir), source, cfg)
        if why is None:
            return _restore(Path(cache_dir).absolute(), cfg)
        if why:
            log.warning("converting %s again into the cache %s: %s", folder, cache_dir, why)
    model = _load_weights(cfg, folder, layout, files)
    if cache_dir is not None:
        save_converted(model, cache_dir, source=source)
    return model


def _cache_mismatch(cache: Path, source: dict, cfg: WanConfig) -> str | None:
    """None when `cache` holds parameters of `source` fitting `cfg`; else why not ('' for an empty folder)."""
    if not (cache / MARKER).exists():
        return f"it has no {MARKER} (an interrupted save?)" if (cache / "params").exists() else ""
    cached_cfg, cached = read_converted(cache)
    if cached is None:
        return f"its {MARKER} does not record which checkpoint it was made from"
    if cached["checkpoint"] != source["checkpoint"]:
        return f"it was made from another checkpoint, {cached['checkpoint']}"
    if cached["dtype"] != source["dtype"]:
        return f"it holds {cached['dtype']} parameters, not {source['dtype']}"
    if cached["files"] != source["files"]:
        return "the checkpoint's files changed since (sizes or modification times)"
    if _param_shapes(cached_cfg) != _param_shapes(cfg):
        return f"its parameters do not fit the config with overrides {source['overrides']}"
    return None


def _param_shapes(cfg: WanConfig) -> list:
    leaves = jax.tree_util.tree_leaves_with_path(nnx.state(abstract_transformer(cfg), nnx.Param))
    return [(jax.tree_util.keystr(k), v.shape, v.dtype) for k, v in leaves]


def _load_weights(cfg: WanConfig, folder: Path, layout: str, files: list[Path]) -> WanTransformer:
    abstract = abstract_transformer(cfg)
    graphdef, abs_state = nnx.split(abstract)
    flat = nnx.to_flat_state(abs_state)
    targets = {}   # diffusers key -> (buffer, layer index or None, kind)
    buffers = {}
    for path, var in flat:
        path = tuple(str(p) for p in path)
        name, stacked, kind = _diffusers_name(path)
        buf = np.empty(var.shape, dtype=var.dtype)
        buffers[path] = buf
        if stacked:
            for i in range(cfg.num_layers):
                targets[name.format(i=i)] = (buf, i, kind)
        else:
            targets[name] = (buf, None, kind)

    seen, unexpected, misshaped = set(), [], []
    for file in files:
        try:
            with safe_open(file, framework="numpy") as st:
                for key in st.keys():
                    dkey = official_to_diffusers_key(key) if layout == "official" else key
                    if dkey not in targets:
                        if not IGNORED_KEYS.fullmatch(key):
                            unexpected.append(key)
                        continue
                    buf, i, kind = targets[dkey]
                    want = buf.shape[1:] if i is not None else buf.shape
                    arr = _to_ours(st.get_tensor(key), kind, want)
                    if arr.shape != want:
                        misshaped.append(f"{key}: checkpoint {tuple(st.get_slice(key).get_shape())} vs model "
                                         f"{want} (ours, after transposing)")
                        continue
                    if i is None:
                        buf[...] = arr
                    else:
                        buf[i] = arr
                    seen.add(dkey)
        except SafetensorError as err:
            raise ValueError(f"{file}: not a readable safetensors file ({err}); it is truncated or corrupt "
                             "(download it again)") from err
    missing = sorted(set(targets) - seen)
    if missing or unexpected or misshaped:
        raise ValueError(_mismatch_message(folder, cfg, missing, unexpected, misshaped))
    for path, var in nnx.to_flat_state(abs_state):
        var.set_value(jnp.asarray(buffers[tuple(str(p) for p in path)]))
    return nnx.merge(graphdef, abs_state)


def _mismatch_message(folder, cfg, missing, unexpected, misshaped) -> str:
    return mismatch_message(f"checkpoint {folder} does not match the model built from its config.json "
                            f"(dim={cfg.dim}, layers={cfg.num_layers}, heads={cfg.num_attention_heads}, "
                            f"ffn_dim={cfg.ffn_dim}, in/out channels={cfg.in_channels}/{cfg.out_channels}, "
                            f"text_dim={cfg.text_dim}):", missing, unexpected, misshaped)


def save_converted(model: WanTransformer, directory: str | Path, *, source: dict | None = None) -> None:
    """Save converted parameters with Orbax, then the `wan_config.json` marker, for `restore_converted`.

    The old marker is removed first and the new one is written last and atomically (temp file + os.replace),
    so a folder with parameters but no marker is an interrupted save. `source` (from `load_transformer`)
    records which checkpoint, files and dtype the parameters came from.
    """
    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MARKER).unlink(missing_ok=True)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(directory / "params", nnx.state(model, nnx.Param), force=True)
    cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(model.cfg).items()}
    _write_atomic(directory / MARKER, json.dumps({"format": MARKER_FORMAT, "config": cfg, "source": source},
                                                 indent=2))


def _write_atomic(path: Path, text: str) -> None:
    """Write `path` so that readers see the old file or the whole new one, never a part."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_converted(directory: str | Path) -> tuple[WanConfig, dict | None]:
    """(config, source) recorded in a `save_converted` folder's marker, without restoring any parameters.

    `source` is None for folders saved without one (exports of the shapes training script, older caches).
    """
    path = Path(directory).absolute() / MARKER
    if not path.exists():
        raise ValueError(f"{path.parent}: no {MARKER}; not a directory written by save_converted, or its save "
                         "was interrupted (delete the folder and convert again)")
    fix = f"delete the folder {path.parent} and convert the checkpoint again"
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is corrupt or truncated ({err}); {fix}") from err
    if not isinstance(raw, dict):
        raise ValueError(f"{path} holds {type(raw).__name__}, not a config object; {fix}")
    source = None
    if "format" in raw:  # current format; older markers are the bare config dict
        if raw["format"] != MARKER_FORMAT or not isinstance(raw.get("config"), dict):
            raise ValueError(f"{path}: unknown marker format {raw.get('format')!r} (expected {MARKER_FORMAT!r}); "
                             f"{fix}")
        raw, source = raw["config"], raw.get("source")
    try:
        cfg = WanConfig(**raw)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: not a valid WanConfig ({err}); {fix}") from err
    return cfg, source


def restore_converted(directory: str | Path, dtype: str | None = None) -> WanTransformer:
    """Restore a model saved by `save_converted` (optionally switching between float32 and bfloat16)."""
    cfg, _ = read_converted(directory)
    if dtype is not None:
        cfg = cfg.replace(param_dtype=dtype, dtype=dtype)
    return _restore(Path(directory).absolute(), cfg)


def _restore(directory: Path, cfg: WanConfig) -> WanTransformer:
    graphdef, abs_state = nnx.split(abstract_transformer(cfg))
    with ocp.StandardCheckpointer() as ckpt:
        state = ckpt.restore(directory / "params", abs_state)
    return nnx.merge(graphdef, state)
