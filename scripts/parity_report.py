"""Prints the measured relative L2 errors against the committed diffusers fixtures (the tests assert bounds).

    PYTHONPATH=. .venv/bin/python scripts/parity_report.py

Runs on the CPU unless JAX_PLATFORMS names another platform, with float32 matmuls at full precision.
"""

import jax
import jax.numpy as jnp
import numpy as np

from models.wan import load_transformer
from models.wan.denoiser import wan_denoiser
from tests.wan_fixtures import FIXTURES, case_io, rel_l2
from vidaccel.sampling import sample
from vidaccel.solvers import unipc

CASES = ("a", "b", "c", "df1", "df2", "df3")


def channels_last(a) -> jax.Array:
    """A diffusers (B, C, F, H, W) tensor as channels-last (B, F, H, W, C); other arrays unchanged."""
    return jnp.asarray(a).transpose(0, 2, 3, 4, 1) if a.ndim == 5 else jnp.asarray(a)


def main() -> None:
    if not jax.config.jax_platforms:          # before the first computation picks a backend
        jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_default_matmul_precision", "highest")
    for case in CASES:
        model = load_transformer(FIXTURES / case / "model")
        x, t, ctx, ref = case_io(case)
        print(f"transformer {case:>4}: rel L2 {rel_l2(model(x, t, ctx), ref):.2e}")
    ref = np.load(FIXTURES / "a" / "sampling.npz")
    den = wan_denoiser(load_transformer(FIXTURES / "a" / "model"))
    out = sample(den, den.params, channels_last(ref["noise"]), channels_last(ref["cond"]),
                 solver=unipc(int(ref["steps"]), float(ref["shift"])), guidance=float(ref["guidance"]),
                 negative_context=channels_last(ref["uncond"]))
    print(f"sample() final latents vs diffusers loop: rel L2 {rel_l2(out.latents, channels_last(ref['out'])):.2e}")


if __name__ == "__main__":
    main()
