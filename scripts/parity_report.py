"""Prints the measured relative L2 errors against the committed diffusers fixtures (the tests assert bounds).

    PYTHONPATH=. .venv/bin/python scripts/parity_report.py
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from models.wan import load_transformer  # noqa: E402
from tests.wan_fixtures import FIXTURES, case_io, rel_l2  # noqa: E402
from vidaccel.sampling import sample  # noqa: E402
from vidaccel.solvers import unipc  # noqa: E402
from models.wan.denoiser import wan_denoiser  # noqa: E402


def main() -> None:
    for case in ("a", "b", "c", "df1", "df2", "df3"):
        model = load_transformer(FIXTURES / case / "model")
        x, t, ctx, ref = case_io(case)
        print(f"transformer {case:>4}: rel L2 {rel_l2(model(x, t, ctx), ref):.2e}")
    ref = np.load(FIXTURES / "a" / "sampling.npz")
    den = wan_denoiser(load_transformer(FIXTURES / "a" / "model"))
    cl = lambda a: jnp.asarray(a).transpose(0, 2, 3, 4, 1) if a.ndim == 5 else jnp.asarray(a)  # noqa: E731
    out = sample(den, den.params, cl(ref["noise"]), cl(ref["cond"]), solver=unipc(int(ref["steps"]), float(ref["shift"])),
                 guidance=float(ref["guidance"]), negative_context=cl(ref["uncond"]))
    print(f"sample() final latents vs diffusers loop: rel L2 {rel_l2(out.latents, cl(ref['out'])):.2e}")


if __name__ == "__main__":
    main()
