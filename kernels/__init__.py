"""The VICReg loss kernels: ``vicreg_loss`` is the entry point the trainer uses.

    _common.py           option values (BACKENDS, FP32_PRECISIONS), coefficients, route rule; stdlib only
    vicreg_torch.py      the closed form and its gradient in plain PyTorch (the math)
    vicreg_triton.py     the same closed form as Triton kernels (the CUDA path)
    vicreg.py            the autograd Function, the backend dispatch, the Triton self-check
    vicreg_reference.py  the public formula by autograd (the tests' ground truth, the bench's baseline)

``resolve_backend`` says which backend ("triton" after its self-check, or "torch") a call on a device and dtype
runs on. The option values import without torch; the rest loads torch on first use (so `embcache --help` and
the config dataclasses stay light).
"""
from ._common import BACKENDS, FP32_PRECISIONS, VICRegCoefficients

# name -> the submodule that defines it, imported on first access (PEP 562)
_LAZY = {"resolve_backend": "vicreg", "self_check_results": "vicreg", "vicreg_loss": "vicreg",
         "vicreg_loss_reference": "vicreg_reference"}

__all__ = ["BACKENDS", "FP32_PRECISIONS", "VICRegCoefficients", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
