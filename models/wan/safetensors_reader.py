"""A minimal, validating safetensors reader: memory-maps one tensor at a time (bf16 via ml_dtypes).

The library's own reader would need torch for bf16 on numpy; this one also turns a truncated or corrupt
file into a `ValueError` that names the file and what is wrong.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class SafetensorsFile:
    """Header of one .safetensors file; `read(key)` maps that tensor's bytes without loading the rest."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        size = self.path.stat().st_size
        if size < 8:
            raise ValueError(f"{self.path}: not a safetensors file ({size} bytes; truncated?)")
        with open(self.path, "rb") as fh:
            (hlen,) = struct.unpack("<Q", fh.read(8))
            if hlen > size - 8 or hlen > 100_000_000:
                raise ValueError(f"{self.path}: header length {hlen} exceeds the file ({size} bytes); "
                                 "the file is truncated or corrupt")
            try:
                header = json.loads(fh.read(hlen))
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise ValueError(f"{self.path}: unreadable safetensors header ({err}); the file is corrupt") from err
        header.pop("__metadata__", None)
        self.data_start = 8 + hlen
        self.entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for key, info in header.items():
            try:
                dtype = _DTYPES[info["dtype"]]
                shape = tuple(int(s) for s in info["shape"])
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError) as err:
                raise ValueError(f"{self.path}: malformed header entry for {key!r}: {info}") from err
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            if end - begin != nbytes:
                raise ValueError(f"{self.path}: tensor {key!r} declares {end - begin} bytes but shape {shape} "
                                 f"of {info['dtype']} needs {nbytes}; the file is corrupt")
            if self.data_start + end > size:
                raise ValueError(f"{self.path}: tensor {key!r} ends at byte {self.data_start + end} but the file has "
                                 f"{size} bytes; the file is truncated")
            self.entries[key] = (dtype, shape, begin, end)

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.entries[key][1]

    def read(self, key: str) -> np.ndarray:
        dtype, shape, begin, end = self.entries[key]
        if end == begin:
            return np.zeros(shape, dtype)
        mm = np.memmap(self.path, dtype=np.uint8, mode="r", offset=self.data_start + begin, shape=(end - begin,))
        return mm.view(dtype).reshape(shape)
