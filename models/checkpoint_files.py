"""What every checkpoint loader here does with a diffusers / transformers folder before reading tensors: find the
part's folder (a pipeline root or the part itself), read its config.json, list its safetensors files (one file,
or the shards an index names), and report every key mismatch in one message."""

from __future__ import annotations

import json
from pathlib import Path


def part_folder(path: str | Path, subfolder: str, what: str, expected: str) -> tuple[Path, dict]:
    """(folder, parsed config.json) of a checkpoint part: `path/subfolder` when `path` is a pipeline root that
    has one, else `path`. `what` names the part in errors; `expected` says which folders are accepted."""
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"{what} path {root} does not exist")
    folder = root / subfolder if (root / subfolder / "config.json").exists() else root
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise ValueError(f"{root}: no config.json (looked in {folder}); expected {expected}")
    try:
        return folder, json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{cfg_path}: invalid JSON ({err})") from err


def safetensors_files(folder: Path, weights: str, index: str, *, any_safetensors: bool = False) -> list[Path]:
    """The weight files of a checkpoint folder: the shards `index` lists if it exists, else the single file
    `weights`, else (with `any_safetensors`) every *.safetensors file in the folder."""
    index_path = folder / index
    if index_path.exists():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
            files = sorted({folder / f for f in weight_map.values()})
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{index_path}: unreadable shard index ({err})") from err
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise ValueError(f"{index_path} lists shards that are not there: {missing}")
        return files
    if (folder / weights).exists():
        return [folder / weights]
    found = sorted(folder.glob("*.safetensors")) if any_safetensors else []
    if not found:
        also = " and no *.safetensors files" if any_safetensors else " (only safetensors checkpoints are supported)"
        raise ValueError(f"{folder}: neither {weights} nor {index}{also}")
    return found


def mismatch_message(header: str, missing, unexpected, misshaped, shown: int = 12) -> str:
    """`header` followed by the missing, unexpected and mis-shaped keys (the first `shown` of each, and how many)."""
    def part(title, items):
        if not items:
            return ""
        listed = ", ".join(items[:shown]) + (f", ... ({len(items)} in all)" if len(items) > shown else "")
        return f"\n  {title} ({len(items)}): {listed}"
    return (header + part("missing keys", missing) + part("unexpected keys", unexpected)
            + part("mis-shaped keys", misshaped))
