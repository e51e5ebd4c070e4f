"""The closed-form VICReg loss and its hand-derived gradient in plain PyTorch (the CPU path, the gradcheck target).

The math, for one branch ``Z`` (N x D), ``Zc = Z - 1 mean(Z)``, ``s = 1/(N-1)``,
``n2_j = ||Zc[:, j]||^2`` (so the unbiased variance is ``s * n2_j``)::

    sigma_j = sqrt(s n2_j + eps)
    v(Z)    = (1/D) sum_j relu(gamma - sigma_j)
    c(Z)    = (s^2/D) sum_{i != j} M_ij^2,          M = Zc^T Zc  (D x D)
            = (s^2/D) (||G||_F^2 - sum_j n2_j^2),     G = Zc Zc^T  (N x N), since ||M||_F = ||G||_F
    L       = sim/(N D) ||x - y||^2 + std (v(x) + v(y))/2 + cov (c(x) + c(y))

and, with ``g`` the upstream gradient and ``a_j = [gamma - sigma_j > 0]`` (strict, like relu's backward)::

    dL/dx = g [ 2 sim/(N D) (x - y)  -  std s/(2 D) a/sigma * Zc_x  +  4 cov s^2/D * Zc_x M_off,x ]
    dL/dy = the same with x <-> y (the invariance term changes sign)

    Zc M_off = Zc M - Zc diag(n2) = G Zc - Zc diag(n2)     (one product, two association orders)

The centring Jacobian drops out of both gradient terms because the columns of Zc sum to zero.
"Min-side" route: when N < D only the N x N Gram G is formed (the diagonal of M is not visible in G,
so ``sum n2^2`` is subtracted -- safe there, see docs/vicreg-kernel.md section 2); when N >= D the D x D
matrix M is formed and its diagonal is masked, never subtracted (subtracting cancels catastrophically
for decorrelated embeddings with N >> D).
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

from ._common import VICRegCoefficients, use_gram_route


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 stays float64 (gradcheck); everything else is centred and reduced in fp32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def closed_form_forward(x: torch.Tensor, y: torch.Tensor, k: VICRegCoefficients):
    """Loss and what the backward needs: ``(loss, (mu, n2, mat))`` with a leading branch axis of 2.

    ``mat[b]`` is ``G`` (N x N) on the Gram route, or ``M_off`` (D x D, diagonal zeroed) otherwise.
    """
    ct = _compute_dtype(x)
    x, y = x.to(ct), y.to(ct)
    gram = use_gram_route(k.n, k.d)
    mus, n2s, mats = [], [], []
    hinge_sum = x.new_zeros(())
    off_sum = x.new_zeros(())
    for z in (x, y):
        # Centre before any product (docs/vicreg-kernel.md section 4); the second mean is the corrected two-pass
        # step that removes the first mean's rounding error (it matters for large column means).
        mu = z.mean(0)
        mu = mu + (z - mu).mean(0)
        zc = z - mu
        n2 = zc.square().sum(0)
        sigma = torch.sqrt(n2 * k.inv_nm1 + k.eps)
        hinge_sum = hinge_sum + torch.relu(k.gamma - sigma).sum()
        if gram:
            mat = zc @ zc.T
            off_sum = off_sum + (mat.square().sum() - n2.square().sum())
        else:
            mat = zc.T @ zc
            mat.fill_diagonal_(0.0)
            off_sum = off_sum + mat.square().sum()
        mus.append(mu)
        n2s.append(n2)
        mats.append(mat)
    loss = k.inv_scale * (x - y).square().sum() + k.var_scale * hinge_sum + k.cov_scale * off_sum
    return loss, (torch.stack(mus), torch.stack(n2s), torch.stack(mats))


def closed_form_backward(grad: torch.Tensor, x: torch.Tensor, y: torch.Tensor, saved,
                         k: VICRegCoefficients, need_x: bool = True, need_y: bool = True):
    """``(dx, dy)`` of :func:`closed_form_forward` (``None`` where not needed), in the input dtype."""
    ct = _compute_dtype(x)
    mu, n2, mat = saved
    xc, yc = x.to(ct), y.to(ct)
    g = grad.to(ct)
    gram = use_gram_route(k.n, k.d)
    out = []
    for b, (need, sign) in enumerate(((need_x, 1.0), (need_y, -1.0))):
        if not need:
            out.append(None)
            continue
        zc = (xc, yc)[b] - mu[b]
        sigma = torch.sqrt(n2[b] * k.inv_nm1 + k.eps)
        var_coef = torch.where(k.gamma - sigma > 0, k.d_var / sigma, torch.zeros_like(sigma))
        cov_term = mat[b] @ zc - zc * n2[b] if gram else zc @ mat[b]
        dz = sign * k.d_inv * (xc - yc) - var_coef * zc + k.d_cov * cov_term
        out.append((g * dz).to(x.dtype))
    return out[0], out[1]


# The backend object `VICRegLossFunction` (kernels/vicreg.py) calls: forward(x, y, k), backward(g, x, y, saved, k, ...).
TORCH_BACKEND = SimpleNamespace(forward=closed_form_forward, backward=closed_form_backward)
