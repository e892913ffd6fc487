"""Shared by the kernel tests: lower a Pallas kernel for an H100 target on a CPU-only machine."""

import jax
import pytest
from jax import export


@pytest.fixture
def abstract_h100(monkeypatch):
    """Let the Pallas Triton lowering run on this CPU-only machine by telling it the target is an H100
    (private JAX API: skipped if it moved). This checks that the kernel lowers to Triton IR; compiling that
    IR to PTX and running it needs a real GPU."""
    try:
        from jax._src.pallas.triton import gpu_info  # noqa: PLC0415  private JAX API, may move: skip if gone
        from jax._src.pallas.triton import pallas_call_registration as reg  # noqa: PLC0415  (same)
        info = gpu_info._get_gpu_info_impl(gpu_info.GpuVersion.H100)
    except (ImportError, AttributeError) as e:
        pytest.skip(f"private Triton lowering hooks not found: {e}")
    monkeypatch.setattr(reg.gpu_info_lib, "get_gpu_info", lambda *a, **k: info)


def lower_for_cuda(f, *args) -> str:
    exp = export.export(jax.jit(f), platforms=["cuda"],
                        disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*args)
    return exp.mlir_module()
