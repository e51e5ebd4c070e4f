"""VICReg loss: public reference, closed-form PyTorch path, Triton path, autograd wrapper.

Layout (Liger-Kernel style):

* :func:`vicreg_loss_reference` -- the public formula (facebookresearch/vicreg ``main_vicreg.py``,
  ``VICReg.forward``), differentiated by autograd. Ground truth, and the "eager" baseline of the bench.
* :func:`closed_form_forward` / :func:`closed_form_backward` -- the same loss and its hand-derived
  gradient in plain PyTorch (the CPU path, and the float64 ``gradcheck`` target).
* ``kernels/vicreg_triton.py`` -- the same closed form as Triton kernels (the CUDA path).
* :class:`VICRegLossFunction` / :func:`vicreg_loss` -- the ``torch.autograd.Function`` that routes to
  one of the two closed-form backends. This is what the trainer calls.
* :func:`resolve_backend` -- which backend a call resolves to. ``vicreg_loss(..., backend="auto")`` on
  CUDA does not trust the Triton kernels blindly: the first call per (device, dtype, fp32 precision)
  compiles them and runs :func:`run_self_check` (loss and both gradients on small random batches, N < D
  and N > D, against the closed form in float64, tolerance :data:`SELF_CHECK_TOLERANCE`). On any
  exception or an error above tolerance it warns once with the reason and uses the PyTorch closed form
  for that key for the rest of the process; ``backend="triton"`` raises instead. The result is cached, so
  a trainer calls ``resolve_backend(device, dtype, precision, backend)`` once before training, records
  the answer ("triton" or "torch") and prints it; :func:`self_check_results` gives the details (errors,
  seconds, reason) for a run's records. docs/vicreg-kernel.md section 6 explains the checks and tolerances.

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

import math
import time
import warnings
from dataclasses import dataclass
from types import SimpleNamespace

import torch

__all__ = [
    "VICRegCoefficients",
    "VICRegLossFunction",
    "closed_form_backward",
    "closed_form_forward",
    "clear_backend_cache",
    "make_backend",
    "resolve_backend",
    "run_self_check",
    "self_check_results",
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


# ----------------------------------------------------------------------------------------------
# Backend resolution and the Triton self-check
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SelfCheckCase:
    """One self-check problem: shape, Triton launch config (name in vicreg_triton) and K-split."""

    n: int
    d: int
    config: str
    split_k: int | None


# Both routes, each with the fused epilogue and the split-K reduce, each tile config once; one shape of
# each route has N and D multiples of 16 (Triton compiles those as a separate specialisation).
SELF_CHECK_CASES = (
    SelfCheckCase(48, 208, "SMALL_TILES", 2),    # Gram route (N < D), split-K reduce kernel
    SelfCheckCase(200, 72, "SMALL_TILES", 1),    # D x D route (N > D), fused epilogue
    SelfCheckCase(136, 300, "LARGE_TILES", 1),   # Gram route, 128-tiles, fused epilogue
    SelfCheckCase(320, 144, "LARGE_TILES", 2),   # D x D route, 128-tiles, split-K reduce kernel
)

# Largest relative error (loss, dx, dy) against the closed form in float64 that the self-check accepts.
# About 10x what the tests see on correct kernels (fp32 "ieee" ~1e-6, TF32 ~3e-4, bf16 ~3e-3), far below
# what a wrong index, a missed tile or an unwritten output gives (order 1).
SELF_CHECK_TOLERANCE = {"ieee": 1e-4, "tf32x3": 1e-4, "tf32": 3e-3, "bf16": 3e-2}

_checks: dict[tuple[str, torch.dtype, str], dict] = {}


def _on_cuda(device: torch.device) -> bool:
    """Whether "auto" considers Triton for this device (the tests patch it to run the check on the CPU)."""
    return device.type == "cuda"


def _check_key(device: torch.device, dtype: torch.dtype, precision: str) -> tuple[str, torch.dtype, str]:
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    # bf16 inputs always use bf16 operands: the fp32 precision setting does not change their kernels
    return str(device), dtype, "bf16" if dtype == torch.bfloat16 else precision


def _self_check_views(n: int, d: int, dtype: torch.dtype, device: torch.device, seed: int):
    """Two correlated views with column means and stds around 1 (hinge active on some columns). A private
    CPU generator: the check never moves the global RNG, so a run is the same with or without it."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.4, 1.6, d, dtype=torch.float64)
    means = 3 * torch.randn(d, generator=g, dtype=torch.float64)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * scale + means
    y = x + 0.5 * torch.randn(n, d, generator=g, dtype=torch.float64)
    return x.to(device=device, dtype=dtype), y.to(device=device, dtype=dtype)


def _relative_error(a: torch.Tensor, ref: torch.Tensor) -> float:
    err = ((a.detach().double() - ref).norm() / ref.norm()).item()
    return err if math.isfinite(err) else float("inf")  # NaN (an unwritten output) must fail


def run_self_check(device: torch.device | str, dtype: torch.dtype, precision: str = "ieee") -> dict:
    """Compile and run the Triton kernels on the :data:`SELF_CHECK_CASES`, against the closed form in
    float64 on the same inputs (so neither torch's own TF32 setting nor autocast enters the reference).

    Returns ``{"ok", "reason", "errors", "seconds", "tolerance"}``; never raises (the reason says why).
    Not cached: :func:`resolve_backend` is the cached entry point.
    """
    device = torch.device(device)
    tol = SELF_CHECK_TOLERANCE["bf16" if dtype == torch.bfloat16 else precision]
    errors: dict[str, float] = {}
    started = time.perf_counter()
    reason = ""
    try:
        from . import vicreg_triton

        for i, case in enumerate(SELF_CHECK_CASES):
            x, y = _self_check_views(case.n, case.d, dtype, device, seed=20_240 + i)
            k = VICRegCoefficients(case.n, case.d)
            impl = vicreg_triton.TritonBackend(precision, split_k=case.split_k,
                                               config=getattr(vicreg_triton, case.config))
            with torch.enable_grad(), torch.autocast(device.type, enabled=False):
                xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
                loss = VICRegLossFunction.apply(xr, yr, k, impl)
                dx, dy = torch.autograd.grad(loss, (xr, yr))
                xd, yd = x.double(), y.double()
                ref_loss, saved = closed_form_forward(xd, yd, k)
                ref_dx, ref_dy = closed_form_backward(torch.ones((), dtype=torch.float64, device=device),
                                                      xd, yd, saved, k)
            for name, got, ref in (("loss", loss, ref_loss), ("dx", dx, ref_dx), ("dy", dy, ref_dy)):
                err = errors[f"{case.n}x{case.d} {name}"] = _relative_error(got, ref)
                if not err <= tol:
                    reason = (f"{name} at (N, D) = ({case.n}, {case.d}), {case.config}, split_k={case.split_k}: "
                              f"relative error {err:.2e} > tolerance {tol:.0e}")
                    break
            if reason:
                break
    except Exception as exc:  # noqa: BLE001 - any failure (import, compile, launch, resources) means "do not use"
        first_line = (str(exc).strip().splitlines() or [""])[0][:300]
        reason = f"{type(exc).__name__}: {first_line}"
    return {"ok": not reason, "reason": reason, "errors": errors, "tolerance": tol,
            "seconds": round(time.perf_counter() - started, 3)}


def resolve_backend(device: torch.device | str, dtype: torch.dtype, precision: str = "ieee",
                    backend: str = "auto") -> str:
    """The backend ("triton" or "torch") that :func:`vicreg_loss` uses for inputs of ``dtype`` on ``device``.

    ``"auto"`` on CUDA (fp32/bf16): the first call per (device, dtype, precision) runs
    :func:`run_self_check`; if it fails, one ``RuntimeWarning`` with the reason, and "torch" from then on
    for that key, for the rest of the process. ``"triton"`` runs the same check but raises
    ``RuntimeError`` instead of falling back. CPU tensors and float64 resolve to "torch" under "auto";
    ``"triton"`` on CPU tensors (the interpreter, for tests) is not self-checked. Cached: cheap to call per
    step; call it once before training to pay the check (a few compiles) up front and to record the result.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if precision not in FP32_PRECISIONS:
        raise ValueError(f"fp32_precision must be one of {FP32_PRECISIONS}, got {precision!r}")
    device = torch.device(device)
    if backend == "torch" or (backend == "auto" and (dtype == torch.float64 or not _on_cuda(device))):
        return "torch"
    if not _on_cuda(device):
        return "triton"  # explicit request on CPU tensors: the interpreter (tests), unchecked
    key = _check_key(device, dtype, precision)
    result = _checks.get(key)
    if result is None:
        result = _checks[key] = run_self_check(device, dtype, precision)
        if not result["ok"] and backend == "auto":
            warnings.warn(f"VICReg Triton kernels failed their self-check on {key[0]} ({key[1]}, precision "
                          f"{key[2]}): {result['reason']}; using the PyTorch closed form for the rest of this "
                          "process", RuntimeWarning, stacklevel=2)
    if result["ok"]:
        return "triton"
    if backend == "triton":
        raise RuntimeError(f"backend='triton': the VICReg Triton kernels failed their self-check on {key[0]} "
                           f"({key[1]}, precision {key[2]}): {result['reason']}")
    return "torch"


def self_check_results() -> dict[str, dict]:
    """Every self-check run so far in this process, keyed "device/dtype/precision" (JSON-ready)."""
    return {f"{dev}/{str(dt).removeprefix('torch.')}/{prec}": dict(r) for (dev, dt, prec), r in _checks.items()}


def clear_backend_cache() -> None:
    """Forget the self-check results (tests; or after changing the device's state)."""
    _checks.clear()


def make_backend(backend: str, x: torch.Tensor, fp32_precision: str = "ieee"):
    """The backend object for ``backend`` on ``x`` (see :func:`resolve_backend`)."""
    if resolve_backend(x.device, x.dtype, fp32_precision, backend) == "torch":
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
        backend: ``"auto"`` (Triton on CUDA once it has passed its self-check, PyTorch otherwise),
            ``"torch"`` or ``"triton"`` (self-checked on CUDA too, but raises instead of falling back); see
            :func:`resolve_backend`. On CPU tensors ``"triton"`` needs the Triton interpreter:
            ``TRITON_INTERPRET=1`` set before ``embcache.kernels.vicreg_triton`` is first imported.
        fp32_precision: ``tl.dot`` input precision for fp32 inputs on the Triton path: ``"ieee"``
            (exact fp32, the default), ``"tf32"`` (operands rounded to TF32 to nearest in the kernel) or
            ``"tf32x3"``. bf16 inputs use bf16 operands. The PyTorch path ignores it.

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
