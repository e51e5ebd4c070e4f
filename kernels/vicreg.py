"""The VICReg loss the trainer calls: the autograd Function, the backend dispatch and the Triton self-check.

* :class:`VICRegLossFunction` / :func:`vicreg_loss` -- the ``torch.autograd.Function`` that routes to one of the
  two closed-form backends: ``kernels/vicreg_torch.py`` (plain PyTorch, the math) or ``kernels/vicreg_triton.py``
  (the same closed form as Triton kernels, the CUDA path). Same value and gradients as the public formula
  (``kernels/vicreg_reference.py``).
* :func:`resolve_backend` -- which backend a call resolves to. ``vicreg_loss(..., backend="auto")`` on
  CUDA does not trust the Triton kernels blindly: the first call per (device, dtype, fp32 precision)
  compiles them and runs :func:`run_self_check` (loss and both gradients on small random batches, N < D
  and N > D, against the closed form in float64, tolerance :data:`SELF_CHECK_TOLERANCE`). On any
  exception or an error above tolerance it warns once with the reason and uses the PyTorch closed form
  for that key for the rest of the process; ``backend="triton"`` raises instead. The result is cached, so
  a trainer calls ``resolve_backend(device, dtype, precision, backend)`` once before training, records
  the answer ("triton" or "torch") and prints it; :func:`self_check_results` gives the details (errors,
  seconds, reason) for a run's records. docs/vicreg-kernel.md section 6 explains the checks and tolerances.

``vicreg_triton`` is imported lazily (triton only when that path is used); it imports ``_common``, never this
module, so the two do not import each other.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass

import torch

from ._common import BACKENDS, FP32_PRECISIONS, VICRegCoefficients, use_gram_route  # noqa: F401 - re-exported
from .vicreg_torch import TORCH_BACKEND, closed_form_backward, closed_form_forward

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
]


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
    """VICReg loss of two (N, D) views; same value and gradients as the public formula
    (``kernels/vicreg_reference.py``).

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
