"""Fused loss kernels. ``vicreg_loss`` is the entry point the trainer uses; ``resolve_backend`` says which
backend ("triton" after its self-check, or "torch") a call on a device and dtype runs on."""
from .vicreg import BACKENDS, FP32_PRECISIONS, VICRegCoefficients, resolve_backend, self_check_results, vicreg_loss, vicreg_loss_reference

__all__ = ["BACKENDS", "FP32_PRECISIONS", "VICRegCoefficients", "resolve_backend", "self_check_results", "vicreg_loss", "vicreg_loss_reference"]
