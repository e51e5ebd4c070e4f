"""Fused loss kernels. ``vicreg_loss`` is the entry point the trainer uses."""
from .vicreg import VICRegCoefficients, vicreg_loss, vicreg_loss_reference

__all__ = ["VICRegCoefficients", "vicreg_loss", "vicreg_loss_reference"]
