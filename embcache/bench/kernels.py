"""Benchmark of the VICReg loss implementations: forward + backward time, peak memory, float64 error.

Variants (all compute the same loss):

* ``eager_reference``     the public formula (``vicreg_loss_reference``), eager PyTorch;
* ``compiled_reference``  the same under ``torch.compile(dynamic=False)``; compile seconds reported;
* ``closed_form_torch``   the min-side closed form in plain PyTorch (``backend="torch"``);
* ``triton``              the Triton kernels (``backend="triton"``; CUDA only).

Timing: on CUDA ``triton.testing.do_bench`` (median, hot cache: inputs below ~60 MB stay in L2);
on CPU a plain timer loop (median of ``repeat`` runs after one warm-up). Peak extra memory:
``torch.cuda.max_memory_allocated`` above the inputs' baseline on CUDA; not measured on CPU.
Error: relative Frobenius error of the loss and both gradients against the public formula in
float64 on the same (rounded) inputs; ``max_rel_err`` is the largest of the three.

Dtype modes: ``fp32`` (TF32 off everywhere, Triton ``ieee``), ``tf32`` (fp32 inputs, TF32 matmuls in
PyTorch, Triton ``input_precision="tf32"``), ``bf16``.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import math
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from embcache.kernels import vicreg_loss, vicreg_loss_reference

VARIANTS = ("eager_reference", "compiled_reference", "closed_form_torch", "triton")
GPU_SIZES = ((256, 768), (256, 8192), (1024, 2048), (2048, 8192), (4096, 4096), (8192, 8192))
CPU_SIZES = ((256, 768), (512, 512), (1024, 256))
DTYPE_MODES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class BenchRow:
    variant: str
    n: int
    d: int
    dtype: str
    device: str
    median_ms: float | None = None
    peak_extra_mib: float | None = None
    loss_rel_err: float | None = None
    dx_rel_err: float | None = None
    dy_rel_err: float | None = None
    max_rel_err: float | None = None
    compile_s: float | None = None
    note: str = ""


@dataclass
class BenchSettings:
    sizes: tuple[tuple[int, int], ...]
    dtypes: tuple[str, ...] = ("fp32", "bf16")
    device: str = "cpu"
    variants: tuple[str, ...] = VARIANTS
    repeat: int = 5  # CPU: timed runs; CUDA: do_bench's rep, in ms, is 20x this
    compile: bool = True
    compile_budget_s: float = 120.0  # total; compiled cases after it is spent are skipped
    seed: int = 0
    _compile_spent_s: float = field(default=0.0, repr=False)


def parse_sizes(text: str) -> tuple[tuple[int, int], ...]:
    """``"256x768,512x512"`` -> ``((256, 768), (512, 512))``."""
    sizes = []
    for item in text.split(","):
        n, d = item.lower().strip().split("x")
        sizes.append((int(n), int(d)))
    return tuple(sizes)


def make_inputs(n: int, d: int, dtype: torch.dtype, device: str, seed: int):
    """Two correlated views, column stds spread over [0.5, 1.5] (hinge active on about half)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * torch.linspace(0.5, 1.5, d) + torch.randn(d, generator=g)
    y = x + 0.5 * torch.randn(n, d, generator=g)
    return x.to(device=device, dtype=dtype), y.to(device=device, dtype=dtype)


def float64_reference(x: torch.Tensor, y: torch.Tensor):
    xd = x.detach().double().requires_grad_()
    yd = y.detach().double().requires_grad_()
    loss = vicreg_loss_reference(xd, yd)
    loss.backward()
    return loss.detach(), xd.grad, yd.grad


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.detach().double() - ref).norm() / ref.norm()).item()


@contextlib.contextmanager
def _matmul_precision(dtype_mode: str):
    """TF32 for PyTorch matmuls in the ``tf32`` mode only."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if dtype_mode == "tf32" else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def _loss_fn(variant: str, dtype_mode: str, device: str) -> tuple[Callable | None, str]:
    """The loss callable of a variant, or None and the reason it is skipped."""
    if variant == "eager_reference":
        return vicreg_loss_reference, ""
    if variant == "compiled_reference":
        return torch.compile(vicreg_loss_reference, dynamic=False), ""
    if variant == "closed_form_torch":
        return (lambda x, y: vicreg_loss(x, y, backend="torch")), ""
    if variant == "triton":
        if device != "cuda":
            return None, "needs CUDA (the Triton interpreter is a test tool, not a benchmark)"
        precision = "tf32" if dtype_mode == "tf32" else "ieee"
        return (lambda x, y: vicreg_loss(x, y, backend="triton", fp32_precision=precision)), ""
    raise ValueError(f"unknown variant {variant!r}")


def _timed_median_ms(step: Callable[[], None], x, y, device: str, repeat: int) -> float:
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(step, warmup=25, rep=20 * repeat, grad_to_none=[x, y],
                                             return_mode="median"))
    step()  # warm-up
    times = []
    for _ in range(repeat):
        x.grad = y.grad = None
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _peak_extra_mib(step: Callable[[], None], x, y, device: str) -> float | None:
    if device != "cuda":
        return None
    x.grad = y.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def bench_case(variant: str, n: int, d: int, dtype_mode: str, settings: BenchSettings, inputs, reference):
    row = BenchRow(variant, n, d, dtype_mode, settings.device)
    if variant == "compiled_reference":
        if not settings.compile:
            row.note = "skipped (--no-compile)"
            return row
        if settings._compile_spent_s >= settings.compile_budget_s:
            row.note = f"skipped: compile budget of {settings.compile_budget_s:.0f} s spent"
            return row
    fn, why = _loss_fn(variant, dtype_mode, settings.device)
    if fn is None:
        row.note = why
        return row
    x, y = (t.detach().clone().requires_grad_() for t in inputs)

    def step():
        fn(x, y).backward()

    def sync():
        if settings.device == "cuda":
            torch.cuda.synchronize()

    try:
        # First call: accuracy (and, for torch.compile, the compile time).
        t0 = time.perf_counter()
        loss = fn(x, y)
        loss.backward()
        sync()
        if variant == "compiled_reference":
            row.compile_s = time.perf_counter() - t0
            settings._compile_spent_s += row.compile_s
        row.loss_rel_err = _rel_err(loss, reference[0])
        row.dx_rel_err = _rel_err(x.grad, reference[1])
        row.dy_rel_err = _rel_err(y.grad, reference[2])
        errs = (row.loss_rel_err, row.dx_rel_err, row.dy_rel_err)
        row.max_rel_err = math.nan if any(map(math.isnan, errs)) else max(errs)  # max() may drop a NaN
        row.median_ms = _timed_median_ms(step, x, y, settings.device, settings.repeat)
        row.peak_extra_mib = _peak_extra_mib(step, x, y, settings.device)
    except Exception as exc:  # a variant that fails (e.g. compile error, OOM) is reported, not fatal
        row.note = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        if variant == "compiled_reference":
            settings._compile_spent_s = settings.compile_budget_s  # do not retry every size
    finally:
        x.grad = y.grad = None
        if settings.device == "cuda":
            torch.cuda.empty_cache()
    return row


def run_bench(settings: BenchSettings, echo: Callable[[str], None] = print) -> list[BenchRow]:
    rows = []
    for dtype_mode in settings.dtypes:
        with _matmul_precision(dtype_mode):
            for i, (n, d) in enumerate(settings.sizes):
                inputs = make_inputs(n, d, DTYPE_MODES[dtype_mode], settings.device, settings.seed + i)
                reference = float64_reference(*inputs)
                for variant in settings.variants:
                    row = bench_case(variant, n, d, dtype_mode, settings, inputs, reference)
                    echo(format_row(row))
                    rows.append(row)
                del inputs, reference
    return rows


HEADER = f"{'N':>5} {'D':>5} {'dtype':>5}  {'variant':<19} {'median ms':>10} {'peak MiB':>9} {'max rel err':>11}  note"


def format_row(r: BenchRow) -> str:
    def num(v, fmt):
        width = int(fmt.split(".")[0])
        return format(v, fmt) if v is not None else "-".rjust(width)

    note = r.note or (f"compile {r.compile_s:.1f} s" if r.compile_s is not None else "")
    return (f"{r.n:>5} {r.d:>5} {r.dtype:>5}  {r.variant:<19} {num(r.median_ms, '10.3f')} "
            f"{num(r.peak_extra_mib, '9.1f')} {num(r.max_rel_err, '11.1e')}  {note}")


def environment() -> dict:
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "processor": platform.processor(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


def write_json(path: str, settings: BenchSettings, rows: list[BenchRow]) -> None:
    payload = {
        "environment": environment(),
        "settings": {k: v for k, v in asdict(settings).items() if not k.startswith("_")},
        "results": [asdict(r) for r in rows],
    }
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
