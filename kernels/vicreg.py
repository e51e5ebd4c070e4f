"""VICReg loss: public reference, closed-form PyTorch path, Triton path, autograd wrapper.

Layout (Liger-Kernel style):

* :func:`vicreg_loss_reference` -- the public formula (facebookresearch/vicreg ``main_vicreg.py``,
  ``VICReg.forward``), differentiated by autograd. Ground truth, and the "eager" baseline of the bench.
* :func:`closed_form_forward` / :func:`closed_form_backward` -- the same loss and its hand-derived
  gradient in plain PyTorch (the CPU path, and the float64 ``gradcheck`` target).
* ``kernels/vicreg_triton.py`` -- the same closed form as Triton kernels (the CUDA path).
* :class:`VICRegLossFunction` / :func:`vicreg_loss` -- the ``torch.autograd.Function`` that routes to
  one of the two closed-form backends. This is what the trainer calls.

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
so ``sum n2^2`` is subtracted -- safe there, see the kernel notes section 2.6); when N >= D the D x D
matrix M is formed and its diagonal is masked, never subtracted (subtracting cancels catastrophically
for decorrelated embeddings with N >> D).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace

import torch

__all__ = [
    "VICRegCoefficients",
    "VICRegLossFunction",
    "closed_form_backward",
    "closed_form_forward",
    "make_backend",
    "use_gram_route",
    "vicreg_loss",
    "vicreg_loss_reference",
]

BACKENDS = ("auto", "torch", "triton")
FP32_PRECISIONS = ("ieee", "tf32", "tf32x3")


# ----------------------------------------------------------------------------------------------
# Public reference formula
# ----------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------
# Shared constants of the closed form (used by the torch and the Triton path)
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VICRegCoefficients:
    """Loss weights plus the scale factors of each term, precomputed once per shape.

    ``loss = inv_scale * ||x-y||^2 + var_scale * sum_j hinge_j + cov_scale * sum_{i!=j} M_ij^2``
    (hinge and off-diagonal sums taken over both branches). The gradient factors are
    ``d_inv = 2 inv_scale``, ``d_var = var_scale * s`` (times ``a_j / sigma_j``), ``d_cov = 4 cov_scale``.
    """

    n: int
    d: int
    sim: float = 25.0
    std: float = 25.0
    cov: float = 1.0
    eps: float = 1e-4
    gamma: float = 1.0

    @property
    def inv_nm1(self) -> float:  # s = 1/(N-1), the unbiased-variance divisor
        return 1.0 / (self.n - 1)

    @property
    def inv_scale(self) -> float:
        return self.sim / (self.n * self.d)

    @property
    def var_scale(self) -> float:  # mean over D, averaged over the two branches
        return self.std / (2.0 * self.d)

    @property
    def cov_scale(self) -> float:
        return self.cov * self.inv_nm1 ** 2 / self.d

    @property
    def d_inv(self) -> float:
        return 2.0 * self.inv_scale

    @property
    def d_var(self) -> float:
        return self.var_scale * self.inv_nm1

    @property
    def d_cov(self) -> float:
        return 4.0 * self.cov_scale


def use_gram_route(n: int, d: int) -> bool:
    """Min-side rule: the N x N Gram when N < D, else the D x D matrix with a masked diagonal."""
    return n < d


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 stays float64 (gradcheck); everything else is centred and reduced in fp32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------
# Closed form in plain PyTorch
# ----------------------------------------------------------------------------------------------
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
        # Centre before any product (kernel notes 4.1); the second mean is the corrected two-pass
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


# ----------------------------------------------------------------------------------------------
# Autograd wrapper and public entry point
# ----------------------------------------------------------------------------------------------
class VICRegLossFunction(torch.autograd.Function):
    """Closed-form VICReg loss. ``impl`` has ``forward(x, y, k) -> (loss, saved)`` and
    ``backward(g, x, y, saved, k, need_x, need_y) -> (dx, dy)``: the PyTorch or the Triton backend."""

    @staticmethod
    def forward(ctx, x, y, coefficients: VICRegCoefficients, impl):
        loss, saved = impl.forward(x, y, coefficients)
        ctx.save_for_backward(x, y, *saved)
        ctx.coefficients = coefficients
        ctx.impl = impl
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        x, y, *saved = ctx.saved_tensors
        need_x, need_y = ctx.needs_input_grad[:2]
        dx, dy = ctx.impl.backward(grad_loss, x, y, saved, ctx.coefficients, need_x, need_y)
        return dx, dy, None, None


TORCH_BACKEND = SimpleNamespace(forward=closed_form_forward, backward=closed_form_backward)


def make_backend(backend: str, x: torch.Tensor, fp32_precision: str = "ieee"):
    """The backend object for ``backend`` ("auto": Triton on CUDA for fp32/bf16, else PyTorch)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if fp32_precision not in FP32_PRECISIONS:
        raise ValueError(f"fp32_precision must be one of {FP32_PRECISIONS}")
    if backend == "auto":
        backend = "triton" if x.is_cuda and x.dtype != torch.float64 else "torch"
    if backend == "torch":
        return TORCH_BACKEND
    from . import vicreg_triton  # lazy: triton is imported only when this path is used

    return vicreg_triton.TritonBackend(fp32_precision)


def vicreg_loss(x: torch.Tensor, y: torch.Tensor, sim: float = 25.0, std: float = 25.0,
                cov: float = 1.0, eps: float = 1e-4, gamma: float = 1.0, *,
                backend: str = "auto", fp32_precision: str = "ieee") -> torch.Tensor:
    """VICReg loss of two (N, D) views; same value and gradients as :func:`vicreg_loss_reference`.

    Args:
        x, y: (N, D) embeddings, same shape/dtype/device; fp32 or bf16 (float64 on the torch path).
            Either may be detached; only inputs that require grad receive one.
        sim, std, cov: weights of the invariance, variance and covariance terms.
        eps, gamma: variance floor inside the sqrt, and the hinge target of the std.
        backend: ``"auto"`` (Triton on CUDA, PyTorch otherwise), ``"torch"`` or ``"triton"``. On CPU
            tensors ``"triton"`` needs the Triton interpreter: ``TRITON_INTERPRET=1`` set before
            ``embcache.kernels.vicreg_triton`` is first imported.
        fp32_precision: ``tl.dot`` input precision for fp32 inputs on the Triton path: ``"ieee"``
            (exact fp32, the default), ``"tf32"`` or ``"tf32x3"``. bf16 inputs use bf16 operands.

    Returns:
        0-dim tensor: fp32, or float64 for float64 inputs.
    """
    if x.dim() != 2 or x.shape != y.shape:
        raise ValueError(f"x and y must both be (N, D); got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.dtype != y.dtype or x.device != y.device:
        raise ValueError("x and y must have the same dtype and device")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float64):
        raise TypeError(f"unsupported dtype {x.dtype}; use float32 or bfloat16 (float64 on the torch path)")
    n, d = x.shape
    if n < 2:
        raise ValueError("VICReg needs at least 2 rows (unbiased variance)")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError("eps must be a positive finite number")
    coefficients = VICRegCoefficients(n, d, float(sim), float(std), float(cov), float(eps), float(gamma))
    return VICRegLossFunction.apply(x, y, coefficients, make_backend(backend, x, fp32_precision))
