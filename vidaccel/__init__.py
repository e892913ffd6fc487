"""vidaccel: training-free acceleration of video diffusion transformers in JAX/Flax/Pallas.

The names a notebook needs, in one import:

    from vidaccel import sample, unipc, total_work, fidelity

Methods are made by their modules, which keep their own names (`vidaccel.sparse_attention.sparse_attention`,
`vidaccel.residual_cache.residual_cache`): exporting those functions here would hide the modules of the same
name. Models live one layer up, in `models`.
"""

from vidaccel.metrics import fidelity, psnr, relative_l1, relative_l2, ssim
from vidaccel.residual_cache import ResidualCacheConfig
from vidaccel.sampling import SampleOutput, sample
from vidaccel.solvers import Solver, euler, unipc
from vidaccel.sparse_attention import sparse_summary
from vidaccel.transforms import Denoiser, DenoiseSpec, total_work, wrap_denoiser

__version__ = "0.1.0"

__all__ = ["Denoiser", "DenoiseSpec", "ResidualCacheConfig", "SampleOutput", "Solver", "euler", "fidelity", "psnr",
           "relative_l1", "relative_l2", "sample", "sparse_summary", "ssim", "total_work", "unipc", "wrap_denoiser"]
