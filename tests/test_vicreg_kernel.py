"""Closed-form VICReg loss (PyTorch and Triton paths) against the public formula in float64.

The Triton path runs on CUDA tensors when CUDA is there and TRITON_INTERPRET is off (the GPU check
script), else on CPU tensors under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
Every Triton call allocates its outputs filled with NaN, so an element no kernel wrote fails the test.
"""
from __future__ import annotations

import contextlib
import json
import os
import warnings

import pytest
import torch

from embcache.kernels import vicreg, vicreg_loss, vicreg_loss_reference
from embcache.kernels.vicreg import TORCH_BACKEND, VICRegCoefficients, VICRegLossFunction

try:
    from embcache.kernels import vicreg_triton
except ImportError:  # triton not installed: only the PyTorch path is tested
    vicreg_triton = None


def _triton_device() -> str | None:
    if vicreg_triton is None:
        return None
    if vicreg_triton.INTERPRET:
        return "cpu"
    return "cuda" if torch.cuda.is_available() else None


TRITON_DEVICE = _triton_device()
EXPECT_CUDA = os.environ.get("EMBCACHE_EXPECT_CUDA_TRITON") == "1"  # set by scripts/gpu_check.sh
needs_triton = pytest.mark.skipif(TRITON_DEVICE is None, reason="needs CUDA, or TRITON_INTERPRET=1")
needs_cuda_triton = pytest.mark.skipif(TRITON_DEVICE != "cuda", reason="GPU-size check, needs CUDA")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
# N < D (Gram route), N = D and N > D (masked D x D route), sizes that are not block multiples, N = 2, D = 1.
# (150, 230) and (230, 150) span several tiles, so the mirrored lower-triangle stores are exercised.
SHAPES = [(37, 101), (64, 64), (101, 37), (2, 20), (130, 70), (20, 200), (5, 1), (150, 230), (230, 150)]
_seed = iter(range(10_000, 1_000_000))  # a fresh draw for every check


def make_views(n, d, dtype=torch.float32, device="cpu", shift=3.0, noise=0.5, col_scale=None):
    """Two correlated views with non-zero column means; column stds spread around 1 so the
    variance hinge is active on some columns only."""
    g = torch.Generator().manual_seed(next(_seed))
    scale = torch.linspace(0.4, 1.6, d, dtype=torch.float64) if col_scale is None else col_scale
    means = shift * (1 + torch.randn(d, generator=g, dtype=torch.float64))
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * scale + means
    y = x + noise * torch.randn(n, d, generator=g, dtype=torch.float64)
    return x.to(device=device, dtype=dtype), y.to(device=device, dtype=dtype)


def float64_reference(x, y, **coeffs):
    """Loss and both gradients of the public formula, in float64, on the (already rounded) inputs."""
    xd = x.detach().cpu().double().requires_grad_()
    yd = y.detach().cpu().double().requires_grad_()
    loss = vicreg_loss_reference(xd, yd, **coeffs)
    loss.backward()
    return loss.detach(), xd.grad, yd.grad


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """||a - ref|| / ||ref||; NaN (e.g. an unwritten output) propagates and fails the comparison."""
    return ((a.detach().cpu().double() - ref).norm() / ref.norm()).item()


def run_loss(x, y, impl=None, **coeffs):
    """Loss and gradients through the autograd Function (``impl`` None: the public entry point)."""
    xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
    if impl is None:
        loss = vicreg_loss(xr, yr, **coeffs)
    else:
        k = VICRegCoefficients(*x.shape, **coeffs)
        loss = VICRegLossFunction.apply(xr, yr, k, impl)
    loss.backward()
    return loss, xr.grad, yr.grad


def assert_matches_float64(x, y, impl=None, tol=None, **coeffs):
    loss, dx, dy = run_loss(x, y, impl, **coeffs)
    assert loss.dim() == 0 and loss.dtype == (torch.float64 if x.dtype == torch.float64 else torch.float32)
    assert dx.dtype == x.dtype and dy.dtype == y.dtype
    ref = float64_reference(x, y, **coeffs)
    errs = [rel_err(loss, ref[0]), rel_err(dx, ref[1]), rel_err(dy, ref[2])]
    # all(), not max(): max() can drop a NaN, and NaN must fail
    assert all(e <= (tol or TOL[x.dtype]) for e in errs), f"rel err (loss, dx, dy) = {errs}"
    return loss, dx, dy


def triton_impl(**kwargs):
    return vicreg_triton.TritonBackend(**kwargs)


@pytest.mark.skipif(not EXPECT_CUDA, reason="scripts/gpu_check.sh only")
def test_gpu_check_runs_the_compiled_kernels_on_cuda():
    """On the GPU check, the Triton tests must run compiled on CUDA, not in the interpreter or not at all."""
    assert TRITON_DEVICE == "cuda" and not vicreg_triton.INTERPRET


# ----------------------------------------------------------------------------------------------
# PyTorch closed form (runs everywhere)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_torch_path_matches_float64(shape, dtype):
    x, y = make_views(*shape, dtype)
    assert_matches_float64(x, y, TORCH_BACKEND)


def _standardized_views(n, d, scale):
    """Columns with sample std exactly ``scale``: far from the hinge kink at std = 1, where the loss
    is not differentiable and gradcheck would fail."""
    g = torch.Generator().manual_seed(next(_seed))

    def standardize(z):
        return (z - z.mean(0)) / z.std(0) * scale + torch.randn(d, generator=g, dtype=torch.float64)

    x = standardize(torch.randn(n, d, generator=g, dtype=torch.float64))
    y = standardize(x + 0.5 * torch.randn(n, d, generator=g, dtype=torch.float64))
    return x.requires_grad_(), y.requires_grad_()


@pytest.mark.parametrize("scale", [0.5, 2.0], ids=["hinge-active", "hinge-inactive"])
@pytest.mark.parametrize("shape", [(6, 10), (10, 6), (7, 7)], ids=str)
def test_gradcheck_closed_form_float64(shape, scale):
    x, y = _standardized_views(*shape, scale)
    k = VICRegCoefficients(*shape)
    assert torch.autograd.gradcheck(lambda a, b: VICRegLossFunction.apply(a, b, k, TORCH_BACKEND), (x, y),
                                    eps=1e-6, atol=1e-5, rtol=1e-3)


def test_public_entry_point_defaults_to_torch_on_cpu():
    x, y = make_views(16, 24)
    loss = vicreg_loss(x, y)
    ref = float64_reference(x, y)[0]
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert rel_err(loss, ref) <= 1e-5


def test_non_default_coefficients():
    coeffs = dict(sim=3.0, std=7.0, cov=0.5, eps=1e-3, gamma=1.3)
    x, y = make_views(23, 41)
    assert_matches_float64(x, y, TORCH_BACKEND, **coeffs)
    if TRITON_DEVICE is not None:
        with vicreg_triton.poisoned_outputs():
            assert_matches_float64(x.to(TRITON_DEVICE), y.to(TRITON_DEVICE), triton_impl(), **coeffs)


def test_input_validation():
    x, y = make_views(8, 4)
    with pytest.raises(ValueError):
        vicreg_loss(x, y[:, :3])
    with pytest.raises(ValueError):
        vicreg_loss(x[:1], y[:1])
    with pytest.raises(ValueError):
        vicreg_loss(x, y.double())
    with pytest.raises(ValueError):
        vicreg_loss(x, y, backend="cuda")


# ----------------------------------------------------------------------------------------------
# Both paths
# ----------------------------------------------------------------------------------------------
def _backends():
    out = [pytest.param("torch", id="torch")]
    out.append(pytest.param("triton", id="triton", marks=needs_triton))
    return out


def _impl_and_device(backend):
    if backend == "torch":
        return TORCH_BACKEND, "cpu"
    return triton_impl(), TRITON_DEVICE


@pytest.mark.parametrize("backend", _backends())
def test_detached_y_gets_no_grad(backend):
    impl, device = _impl_and_device(backend)
    x, y = make_views(37, 53, device=device)
    xr = x.clone().requires_grad_()
    k = VICRegCoefficients(37, 53)
    with vicreg_triton.poisoned_outputs() if backend == "triton" else contextlib.nullcontext():
        loss = VICRegLossFunction.apply(xr, y, k, impl)
        loss.backward()
    ref_loss, ref_dx, _ = float64_reference(x, y)
    assert y.grad is None
    assert rel_err(loss, ref_loss) <= 1e-5 and rel_err(xr.grad, ref_dx) <= 1e-5


@pytest.mark.parametrize("backend", _backends())
def test_non_contiguous_inputs(backend):
    impl, device = _impl_and_device(backend)
    xt, yt = make_views(40, 30, device=device)
    x, y = xt.T.contiguous().T, yt.T.contiguous().T  # same values, column-major
    assert not x.is_contiguous()
    assert_matches_float64(x, y, impl)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("shift", [10.0, 100.0])
def test_large_column_means(backend, shift):
    """Centring in fp32 before any product: one-pass Z^T Z - N mu mu^T would lose digits here."""
    impl, device = _impl_and_device(backend)
    for shape in [(48, 80), (80, 48)]:
        x, y = make_views(*shape, device=device, shift=shift)
        assert_matches_float64(x, y, impl)


@pytest.mark.parametrize("backend", _backends())
def test_invariance_term_alone(backend):
    """fit's default weights (FitConfig: vicreg_std = vicreg_cov = 0): the loss is sim x the mean squared error."""
    impl, device = _impl_and_device(backend)
    x, y = make_views(48, 40, device=device)
    loss, dx, _ = assert_matches_float64(x, y, impl, sim=25.0, std=0.0, cov=0.0)
    mse = torch.nn.functional.mse_loss(x.double(), y.double())
    assert rel_err(loss, 25.0 * mse) <= TOL[x.dtype]


@pytest.mark.parametrize("backend", _backends())
def test_whitened_inputs_covariance_term(backend):
    """N >> D, nearly decorrelated columns: the off-diagonal mass is ~1e-4 of the diagonal, so
    subtracting the diagonal instead of masking it would fail this check (docs/vicreg-kernel.md section 3)."""
    impl, device = _impl_and_device(backend)
    n, d = 1024, 16
    g = torch.Generator().manual_seed(next(_seed))
    q, _ = torch.linalg.qr(torch.randn(n, d, generator=g, dtype=torch.float64))
    q = q - q.mean(0)
    x = q * (n - 1) ** 0.5 + 0.05 * torch.randn(n, d, generator=g, dtype=torch.float64)
    y = x + 0.01 * torch.randn(n, d, generator=g, dtype=torch.float64)
    x, y = x.float().to(device), y.float().to(device)
    assert_matches_float64(x, y, impl, sim=0.0, std=0.0, cov=1.0)  # covariance term alone


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_triton_path_matches_float64(shape, dtype):
    x, y = make_views(*shape, dtype, device=TRITON_DEVICE)
    with vicreg_triton.poisoned_outputs():
        assert_matches_float64(x, y, triton_impl())


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("split_k", [1, 3], ids=["fused-epilogue", "split-k-reduce"])
@pytest.mark.parametrize("config", ["SMALL_TILES", "LARGE_TILES"])
@pytest.mark.parametrize("shape", [(37, 101), (101, 37)], ids=str)
def test_triton_launch_configs(shape, config, split_k, dtype):
    """Both tile configs, with and without the split-K reduce kernel, on both routes."""
    x, y = make_views(*shape, dtype, device=TRITON_DEVICE)
    impl = triton_impl(split_k=split_k, config=getattr(vicreg_triton, config))
    with vicreg_triton.poisoned_outputs():
        assert_matches_float64(x, y, impl)


@needs_triton
def test_triton_matches_public_api_and_is_deterministic():
    x, y = make_views(45, 77, device=TRITON_DEVICE)
    first = run_loss(x, y, triton_impl(split_k=2))
    second = run_loss(x, y, triton_impl(split_k=2))
    for a, b in zip(first, second):
        assert torch.equal(a, b)  # fixed-order reductions: bitwise reproducible
    public = run_loss(x, y, backend="triton")
    assert rel_err(public[0], first[0].double()) <= 1e-6


@needs_triton
def test_triton_upstream_gradient_is_applied():
    x, y = make_views(30, 50, device=TRITON_DEVICE)
    xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
    (3.0 * vicreg_loss(xr, yr, backend="triton")).backward()
    _, ref_dx, ref_dy = float64_reference(x, y)
    assert rel_err(xr.grad, 3.0 * ref_dx) <= 1e-5 and rel_err(yr.grad, 3.0 * ref_dy) <= 1e-5


@needs_cuda_triton
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", [(256, 768), (1024, 2048), (512, 512), (4096, 256), (2048, 1024)], ids=str)
def test_triton_cuda_sizes(shape, dtype):
    x, y = make_views(*shape, dtype, device="cuda")
    with vicreg_triton.poisoned_outputs():
        assert_matches_float64(x, y, triton_impl())


@needs_cuda_triton
@pytest.mark.parametrize("precision", ["tf32", "tf32x3"])
@pytest.mark.parametrize("shape", [(256, 768), (1024, 2048), (2048, 512)], ids=str)
def test_triton_cuda_tf32(shape, precision):
    """TF32 operands, rounded to nearest in the kernel, so the result does not depend on whether the
    tensor cores round or truncate: loss within 3e-4 (issue 12), gradients within 1e-3."""
    x, y = make_views(*shape, device="cuda")
    loss, dx, dy = run_loss(x, y, triton_impl(fp32_precision=precision))
    ref = float64_reference(x, y)
    errs = [rel_err(loss, ref[0]), rel_err(dx, ref[1]), rel_err(dy, ref[2])]
    tol = (3e-4, 1e-3, 1e-3) if precision == "tf32" else (1e-5, 1e-5, 1e-5)
    assert all(e <= t for e, t in zip(errs, tol)), f"rel err (loss, dx, dy) = {errs}"


# ----------------------------------------------------------------------------------------------
# Bench command (smoke test, CPU, one tiny size)
# ----------------------------------------------------------------------------------------------
def test_bench_kernels_cli_smoke(tmp_path):
    from click.testing import CliRunner

    from embcache.cli.bench_kernels import kernels_command

    out = tmp_path / "bench.json"
    result = CliRunner().invoke(kernels_command, ["--device", "cpu", "--sizes", "64x96", "--dtypes", "fp32",
                                                  "--repeat", "2", "--no-compile", "--json", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["results"]
    variants = {r["variant"] for r in rows if r.get("median_ms") is not None}
    assert {"eager_reference", "closed_form_torch"} <= variants
    assert all(r["max_rel_err"] <= 1e-4 for r in rows if r.get("median_ms") is not None)


# ----------------------------------------------------------------------------------------------
# Backend resolution: the self-check and the fallback (issue 12)
# ----------------------------------------------------------------------------------------------
# On the CPU, vicreg._on_cuda is patched so that "auto" treats the interpreter like a GPU; on a GPU
# (scripts/gpu_check.sh) the same tests run the compiled kernels on CUDA tensors.
TINY_CHECKS = (vicreg.SelfCheckCase(20, 140, "SMALL_TILES", 2), vicreg.SelfCheckCase(44, 20, "SMALL_TILES", 1))


@pytest.fixture
def fresh_checks():
    vicreg.clear_backend_cache()
    yield
    vicreg.clear_backend_cache()


@pytest.fixture
def forced_gpu(monkeypatch, fresh_checks):
    """"auto" considers Triton on TRITON_DEVICE; tiny self-check cases (the real ones have their own test)."""
    if TRITON_DEVICE is None:
        pytest.skip("needs CUDA, or TRITON_INTERPRET=1")
    monkeypatch.setattr(vicreg, "_on_cuda", lambda device: True)
    monkeypatch.setattr(vicreg, "SELF_CHECK_CASES", TINY_CHECKS)
    return torch.device(TRITON_DEVICE)


def _count_self_checks(monkeypatch) -> list:
    calls = []
    real = vicreg.run_self_check

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(vicreg, "run_self_check", counting)
    return calls


def _auto_loss_matches_float64(device, **kwargs):
    x, y = make_views(30, 50, device=device)
    loss, dx, dy = run_loss(x, y, backend="auto", **kwargs)
    ref = float64_reference(x, y)
    assert all(rel_err(a, r) <= 1e-5 for a, r in zip((loss, dx, dy), ref))


def test_auto_is_torch_off_cuda_and_for_float64(fresh_checks):
    assert vicreg.resolve_backend("cpu", torch.float32) == "torch"
    assert vicreg.resolve_backend("cpu", torch.bfloat16, "tf32") == "torch"
    assert vicreg.resolve_backend("cuda:0", torch.float64) == "torch"  # no check, no CUDA call
    assert vicreg.resolve_backend("cuda:0", torch.float32, backend="torch") == "torch"
    assert vicreg.self_check_results() == {}
    with pytest.raises(ValueError):
        vicreg.resolve_backend("cpu", torch.float32, backend="cuda")
    with pytest.raises(ValueError):
        vicreg.resolve_backend("cpu", torch.float32, precision="fp16")


def test_self_check_passes_once_then_auto_uses_triton(forced_gpu, monkeypatch):
    calls = _count_self_checks(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a passing check warns about nothing
        assert vicreg.resolve_backend(forced_gpu, torch.float32, "ieee") == "triton"
        assert vicreg.resolve_backend(forced_gpu, torch.float32, "ieee") == "triton"
        assert isinstance(vicreg.make_backend("auto", torch.zeros(2, 2, device=forced_gpu)),
                          vicreg_triton.TritonBackend)
        _auto_loss_matches_float64(forced_gpu)
    assert len(calls) == 1  # cached per (device, dtype, precision)
    vicreg.resolve_backend(forced_gpu, torch.float32, "tf32")
    assert len(calls) == 2
    results = vicreg.self_check_results()
    assert len(results) == 2 and all(r["ok"] and r["reason"] == "" for r in results.values())
    assert all(len(r["errors"]) == 3 * len(TINY_CHECKS) for r in results.values())


def test_self_check_leaves_the_global_rng_alone(forced_gpu):
    before = torch.get_rng_state()
    vicreg.resolve_backend(forced_gpu, torch.float32)
    assert torch.equal(before, torch.get_rng_state())


class _RaisingLaunch:
    """Stands in for a @triton.jit kernel whose compile fails: ``kernel[grid](...)`` raises."""

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            raise RuntimeError("simulated compile error\nsecond line")
        return launch


def _assert_falls_back_once(device, match: str):
    with pytest.warns(RuntimeWarning, match=match) as caught:
        assert vicreg.resolve_backend(device, torch.float32) == "torch"
    assert len([w for w in caught if "self-check" in str(w.message)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the rest of the process: no second warning
        assert vicreg.resolve_backend(device, torch.float32) == "torch"
        assert vicreg.make_backend("auto", torch.zeros(2, 2, device=device)) is TORCH_BACKEND
        _auto_loss_matches_float64(device)
    with pytest.raises(RuntimeError, match="self-check"):  # "triton": no fallback
        vicreg.resolve_backend(device, torch.float32, backend="triton")
    x, y = make_views(8, 12, device=device)
    with pytest.raises(RuntimeError, match="self-check"):
        vicreg_loss(x, y, backend="triton")


def test_kernel_that_raises_falls_back_with_one_warning(forced_gpu, monkeypatch):
    monkeypatch.setattr(vicreg_triton, "_small_matrix_kernel", _RaisingLaunch())
    _assert_falls_back_once(forced_gpu, "RuntimeError: simulated compile error;")
    reason = next(iter(vicreg.self_check_results().values()))["reason"]
    assert "second line" not in reason


def test_kernel_with_a_wrong_loss_falls_back(forced_gpu, monkeypatch):
    real = vicreg_triton.TritonBackend._forward

    def slightly_wrong(self, x, y, k):
        loss, saved = real(self, x, y, k)
        return loss * 1.001, saved  # 1e-3: above the fp32 tolerance, a plausible silent bug

    monkeypatch.setattr(vicreg_triton.TritonBackend, "_forward", slightly_wrong)
    _assert_falls_back_once(forced_gpu, r"loss at \(N, D\) = \(20, 140\).*relative error 1\.0+e-03 > tolerance")


def test_kernel_with_a_wrong_gradient_falls_back(forced_gpu, monkeypatch):
    real = vicreg_triton.TritonBackend._backward

    def wrong_dy(self, *args):
        dx, dy = real(self, *args)
        return dx, dy * 1.01

    monkeypatch.setattr(vicreg_triton.TritonBackend, "_backward", wrong_dy)
    _assert_falls_back_once(forced_gpu, r"dy at \(N, D\)")


def test_kernel_that_leaves_nan_falls_back(forced_gpu, monkeypatch):
    real = vicreg_triton.TritonBackend._backward

    def unwritten(self, *args):
        dx, dy = real(self, *args)
        dx[-1, -1] = float("nan")
        return dx, dy

    monkeypatch.setattr(vicreg_triton.TritonBackend, "_backward", unwritten)
    _assert_falls_back_once(forced_gpu, r"dx at .* relative error inf")


def test_one_failed_key_does_not_decide_the_others(forced_gpu, monkeypatch):
    real = vicreg_triton.TritonBackend._forward

    def wrong_for_fp32_only(self, x, y, k):
        loss, saved = real(self, x, y, k)
        return (loss * 2 if x.dtype == torch.float32 else loss), saved

    monkeypatch.setattr(vicreg_triton.TritonBackend, "_forward", wrong_for_fp32_only)
    with pytest.warns(RuntimeWarning):
        assert vicreg.resolve_backend(forced_gpu, torch.float32) == "torch"
    assert vicreg.resolve_backend(forced_gpu, torch.bfloat16) == "triton"
    assert vicreg.resolve_backend(forced_gpu, torch.bfloat16, "tf32") == "triton"  # same key as above
    assert len(vicreg.self_check_results()) == 2


@needs_triton
def test_default_self_check_cases_pass(fresh_checks, monkeypatch):
    """The real cases: on the CPU with a dot that *truncates* TF32 operands (the worst hardware case);
    on a GPU for every dtype and precision, compiled."""
    monkeypatch.setattr(vicreg, "_on_cuda", lambda device: True)
    if TRITON_DEVICE == "cpu":
        _truncating_tf32_dot(monkeypatch)
        cases = [(torch.float32, "tf32")]
    else:
        cases = [(torch.float32, p) for p in vicreg.FP32_PRECISIONS] + [(torch.bfloat16, "ieee")]
    launched, _ = _watch_launches(monkeypatch)
    for dtype, precision in cases:
        result = vicreg.run_self_check(TRITON_DEVICE, dtype, precision)
        assert result["ok"], result
        assert len(result["errors"]) == 3 * len(vicreg.SELF_CHECK_CASES)
        assert vicreg.resolve_backend(TRITON_DEVICE, dtype, precision) == "triton"
    assert {name for name, _ in launched} == set(KERNELS)  # the cases reach every kernel
    assert {c.config for c in vicreg.SELF_CHECK_CASES} == {"SMALL_TILES", "LARGE_TILES"}
    assert {vicreg.use_gram_route(c.n, c.d) for c in vicreg.SELF_CHECK_CASES} == {True, False}


# ----------------------------------------------------------------------------------------------
# TF32: operands rounded in the kernel, n2r from the rounded values (issue 12)
# ----------------------------------------------------------------------------------------------
def _truncating_tf32_dot(monkeypatch):
    """Make the interpreter's tl.dot read fp32 operands the way a truncating TF32 tensor core does:
    the low 13 mantissa bits dropped. (The interpreter's own dot ignores input_precision.)"""
    import numpy as np
    from triton.runtime import interpreter

    real = interpreter.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if str(input_precision).rsplit(".", 1)[-1] == "TF32" and a.data.dtype == np.float32:
            def truncate(t):
                return interpreter.TensorHandle((t.data.view(np.uint32) & np.uint32(0xFFFFE000)).view(np.float32),
                                                t.dtype)
            a, b = truncate(a), truncate(b)
        return real(self, a, b, d, input_precision, max_num_imprecise_acc)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot)


@pytest.mark.skipif(TRITON_DEVICE != "cpu", reason="emulates TF32 in the Triton interpreter")
def test_tf32_gram_route_is_exact_on_truncating_tensor_cores(monkeypatch):
    """(256, 768), Gram route, fp32 inputs at "tf32" on a dot that truncates its operands: with the
    operands rounded in the kernel (and n2r from them) the loss error is ~1e-6; without, ~1e-3."""
    _truncating_tf32_dot(monkeypatch)
    x, y = make_views(256, 768)
    ref = float64_reference(x, y)
    loss, dx, dy = run_loss(x, y, triton_impl(fp32_precision="tf32"))
    errs = [rel_err(loss, ref[0]), rel_err(dx, ref[1]), rel_err(dy, ref[2])]
    assert errs[0] < 3e-4 and errs[1] < 1e-3 and errs[2] < 1e-3, errs

    unrounded = triton_impl(fp32_precision="tf32")  # the kernels as they were: operands left to the dot
    dot_args = unrounded._dot_args
    monkeypatch.setattr(unrounded, "_dot_args", lambda dtype: {**dot_args(dtype), "OP_TF32": False})
    before = rel_err(run_loss(x, y, unrounded)[0], ref[0])
    assert before > 3e-4, f"the emulation should show the old error, got {before:.1e}"


@needs_triton
def test_round_tf32_is_round_to_nearest():
    import triton
    import triton.language as tl

    @triton.jit
    def round_kernel(src, dst, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(dst + offs, vicreg_triton._round_tf32(tl.load(src + offs, mask=offs < n)), mask=offs < n)

    g = torch.Generator().manual_seed(next(_seed))
    values = torch.cat([torch.tensor([1 + 3 * 2**-12, 1 + 2**-12, -(1 + 3 * 2**-12), 0.0, 2**-130]),
                        torch.randn(251, generator=g) * 100]).float()
    out = torch.empty_like(values, device=TRITON_DEVICE)
    round_kernel[(1,)](values.to(TRITON_DEVICE), out, values.numel(), BLOCK=256)
    expected = torch.from_numpy(((values.numpy().view("uint32") + 0x1000) & 0xFFFFE000).view("float32"))
    assert torch.equal(out.cpu(), expected)
    assert out[0].item() == 1 + 2**-10 and out[2].item() == -(1 + 2**-10)  # nearest, not truncated
    nearest = (out.cpu().double() - values.double()).abs() <= values.double().abs() * 2**-11 + 1e-45
    assert bool(nearest.all())


# ----------------------------------------------------------------------------------------------
# Device guard: every launch under torch.cuda.device(x.device) (issue 12)
# ----------------------------------------------------------------------------------------------
KERNELS = ("_column_stats_kernel", "_small_matrix_kernel", "_splitk_reduce_kernel", "_finalize_kernel",
           "_grad_kernel")


def test_device_guard_is_a_cuda_device_context_for_cuda_and_a_no_op_otherwise():
    if vicreg_triton is None:
        pytest.skip("triton not installed")
    guard = vicreg_triton._device_guard(torch.device("cuda", 1))  # built, not entered: no GPU needed
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    with vicreg_triton._device_guard(torch.device("cpu")):
        pass


def _watch_launches(monkeypatch):
    """Record every kernel launch with the device-guard depth at that moment, and every guard entered."""
    launched, entered, depth = [], [], [0]
    real_guard = vicreg_triton._device_guard

    @contextlib.contextmanager
    def recording_guard(device):
        entered.append(device)
        depth[0] += 1
        try:
            with real_guard(device):
                yield
        finally:
            depth[0] -= 1

    class Watched:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            launch = self.kernel[grid]

            def checked(*args, **kwargs):
                launched.append((self.name, depth[0]))
                return launch(*args, **kwargs)
            return checked

    monkeypatch.setattr(vicreg_triton, "_device_guard", recording_guard)
    for name in KERNELS:
        monkeypatch.setattr(vicreg_triton, name, Watched(name, getattr(vicreg_triton, name)))
    return launched, entered


@needs_triton
@pytest.mark.parametrize("shape", [(20, 140), (140, 20)], ids=str)
def test_every_launch_runs_under_the_device_guard(shape, monkeypatch):
    launched, entered = _watch_launches(monkeypatch)
    x, y = make_views(*shape, device=TRITON_DEVICE)
    assert_matches_float64(x, y, triton_impl(split_k=2))
    assert {name for name, _ in launched} == set(KERNELS)
    assert all(d == 1 for _, d in launched), launched  # inside exactly one guard
    assert entered == [x.device, x.device]  # forward, backward
