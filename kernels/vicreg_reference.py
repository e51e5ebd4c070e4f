"""The public VICReg formula, differentiated by autograd: the ground truth of the tests and the bench's baseline.

facebookresearch/vicreg ``main_vicreg.py``, ``VICReg.forward``, on one device (no all-gather). It forms two D x D
covariance matrices in the input dtype; use ``x.double()`` / ``y.double()`` for a float64 ground truth.
"""
from __future__ import annotations

import torch


def _off_diagonal(m: torch.Tensor) -> torch.Tensor:
    """Off-diagonal entries of a square matrix, as in facebookresearch/vicreg (view trick)."""
    n = m.shape[0]
    return m.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


def vicreg_loss_reference(x: torch.Tensor, y: torch.Tensor, sim: float = 25.0, std: float = 25.0,
                          cov: float = 1.0, eps: float = 1e-4, gamma: float = 1.0) -> torch.Tensor:
    """The public VICReg loss on one device, line for line (``VICReg.forward``, no all-gather).

    Runs in the input dtype and forms two D x D covariance matrices; autograd gives the gradient.
    Use ``x.double()`` / ``y.double()`` for a float64 ground truth.
    """
    n, d = x.shape
    repr_loss = torch.nn.functional.mse_loss(x, y)
    x = x - x.mean(dim=0)
    y = y - y.mean(dim=0)
    std_x = torch.sqrt(x.var(dim=0) + eps)
    std_y = torch.sqrt(y.var(dim=0) + eps)
    std_loss = (torch.mean(torch.nn.functional.relu(gamma - std_x)) / 2
                + torch.mean(torch.nn.functional.relu(gamma - std_y)) / 2)
    cov_x = (x.T @ x) / (n - 1)
    cov_y = (y.T @ y) / (n - 1)
    cov_loss = _off_diagonal(cov_x).pow_(2).sum().div(d) + _off_diagonal(cov_y).pow_(2).sum().div(d)
    return sim * repr_loss + std * std_loss + cov * cov_loss
