"""Helpers to read the committed diffusers reference fixtures (tests/fixtures/wan, made by
scripts/fixtures/make_wan_transformer.py under python3.11 + torch 2.13.0)."""

from pathlib import Path

import numpy as np

FIXTURES = Path(__file__).parent / "fixtures" / "wan"


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def case_io(case: str):
    """(x channels-last, t, context, reference output channels-last) of one fixture case."""
    io = np.load(FIXTURES / case / "io.npz")
    return (io["x"].transpose(0, 2, 3, 4, 1), io["t"], io["context"], io["out"].transpose(0, 2, 3, 4, 1))
