"""`embcache bench fit`: whole fit loop against the pure compute of the same model.

The cache is synthetic and MM-IMDb-sized (15,552 / 2,608 / 7,799 rows, 23 labels), built in memory
(`embcache.bench.synthetic`), so the bench measures training, not Zarr reads. "Pure compute" is one
forward + backward + optimizer step of the same model on a fixed batch, timed over a few steps after a
warm-up, times the number of steps of the run; the ratio fit / compute is the loop's overhead
(gathers, permutations, per-epoch val scoring, best-epoch copies).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import replace

import torch

from embcache.bench import synthetic
from embcache.config import FitBenchConfig, FitConfig, FitError
from embcache.data import dataset_from_features
from embcache.kernels import vicreg as vicreg_kernels
from embcache.runtime import resolve_device
from embcache.train import batch_loss, make_model, prepare, train

B = FitBenchConfig  # run_fit_bench's defaults (also the CLI's)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pure_step_seconds(data, prep, cfg: FitConfig, *, warmup: int = 3, windows: int = 5,
                      steps: int = 8) -> tuple[float, float]:
    """One training step (forward, backward, optimizer) on the loop's first batch shape:
    (wall seconds, best of `windows` windows; process CPU seconds, mean).

    The best window is the machine's unloaded speed; CPU time is less sensitive to other processes.
    """
    model, net, optimizer, _ = make_model(data, prep, cfg)
    n_paired = prep.paired_bounds[1]
    idx = torch.cat([prep.paired[:n_paired], prep.unpaired[:prep.unpaired_bounds[1]]])

    def step():
        loss, _ = batch_loss(net, model, prep, idx, n_paired, cfg, data.task_type)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    walls, cpu_start = [], time.process_time()
    for _ in range(windows):
        _sync(prep.device)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(prep.device)
        walls.append((time.perf_counter() - start) / steps)
    return min(walls), (time.process_time() - cpu_start) / (windows * steps)


def vicreg_settings(vicreg_backend: str | None, vicreg_precision: str | None) -> dict:
    """FitConfig fields for the VICReg backend flags (issue 12 item 1 adds `vicreg_backend` and
    `vicreg_precision` to FitConfig); None leaves FitConfig's default."""
    wanted = {"vicreg_backend": vicreg_backend, "vicreg_precision": vicreg_precision}
    wanted = {k: v for k, v in wanted.items() if v is not None}
    have = {f.name for f in dataclasses.fields(FitConfig)}
    missing = sorted(set(wanted) - have)
    if missing:
        raise FitError(f"this version of FitConfig has no {', '.join(missing)} field: fit cannot choose the "
                       "VICReg backend yet")
    return wanted


def run_fit_bench(*, n_train: int = B.n_train, dim: int = B.dim, n_classes: int = B.n_classes, epochs: int = B.epochs,
                  batch_size: int = B.batch_size, impute: str = B.impute, device: str = B.device,
                  compile: bool = B.compile, threads: int | None = B.threads, predictor: str = B.predictor,
                  prompts: int = B.prompts, cache_layers: int = B.cache_layers, tokens: int = B.tokens,
                  vicreg_backend: str | None = B.vicreg_backend,
                  vicreg_precision: str | None = B.vicreg_precision) -> dict:
    """predictor "prompts": the text comes with synthetic hidden states of `tokens` tokens for the last
    `cache_layers` blocks of the default text encoder (MiniLM, so text is 384 wide); the report adds the step
    time of the MLP predictor on the same data.

    vicreg_backend / vicreg_precision: the fit's VICReg backend ("auto", "triton", "torch") and fp32 dot
    precision; None keeps FitConfig's defaults. The backend the loss resolves to (after the Triton
    self-check on CUDA) is reported as `vicreg_backend_used`, the check's cost as `vicreg_check_seconds`.
    """
    vicreg_kw = vicreg_settings(vicreg_backend, vicreg_precision)
    if threads:  # on a shared machine, fewer threads than cores gives steadier timings
        torch.set_num_threads(threads)
    scale = n_train / synthetic.MMIMDB_SIZES["n_train"]  # val/test keep MM-IMDb's proportions
    t0 = time.perf_counter()
    features = synthetic.make_features(
        n_train=n_train, n_val=round(synthetic.MMIMDB_SIZES["n_val"] * scale),
        n_test=round(synthetic.MMIMDB_SIZES["n_test"] * scale), d_image=dim,
        d_text=dim if predictor == "mlp" else 384, n_classes=n_classes, task_type="multilabel", shared_dim=64,
        private_dim=16)
    data = mlp_data = dataset_from_features(features, "synthetic:mmimdb")
    if predictor == "prompts":
        from embcache.bench.synthetic import add_bench_text_states

        add_bench_text_states(features, tokens, cache_layers)
        data = dataset_from_features(features, "synthetic:mmimdb")
    make_seconds = time.perf_counter() - t0
    cfg = FitConfig(store="synthetic:mmimdb", impute=impute, epochs=epochs, batch_size=batch_size,
                    device=device, compile=compile, predictor=predictor, prompts=prompts, **vicreg_kw)
    t0 = time.perf_counter()
    prep = prepare(data, cfg, resolve_device(device))
    prepare_seconds = time.perf_counter() - t0
    # What the loss will run on (fp32 embeddings); on CUDA this pays the Triton self-check before the timed fit.
    requested = getattr(cfg, "vicreg_backend", "auto")
    precision = getattr(cfg, "vicreg_precision", "ieee")
    t0 = time.perf_counter()
    backend_used = vicreg_kernels.resolve_backend(prep.device, torch.float32, precision, requested)
    check_seconds = time.perf_counter() - t0
    cpu_start = time.process_time()
    result = train(data, prep, cfg, progress=False)
    fit_seconds, fit_cpu = result.seconds, time.process_time() - cpu_start
    steps = prep.resolved["steps_per_epoch"]
    step, step_cpu = pure_step_seconds(data, prep, cfg)
    compute_seconds, compute_cpu = step * steps * epochs, step_cpu * steps * epochs
    report = {
        "n_train": n_train, "dim": dim, "n_classes": n_classes, "epochs": epochs, "impute": impute,
        "device": str(prep.device), "torch_threads": torch.get_num_threads(), "compile": compile,
        "vicreg_backend": requested, "vicreg_precision": precision, "vicreg_backend_used": backend_used,
        "vicreg_check_seconds": check_seconds, "vicreg_self_checks": vicreg_kernels.self_check_results(),
        "batch_size": prep.resolved["batch_size"], "steps_per_epoch": steps,
        "synthetic_seconds": make_seconds, "prepare_seconds": prepare_seconds,
        "fit_seconds": fit_seconds, "fit_cpu_seconds": fit_cpu, "epochs_per_s": epochs / fit_seconds,
        "step_ms": step * 1e3, "step_cpu_ms": step_cpu * 1e3,
        "compute_seconds": compute_seconds, "compute_cpu_seconds": compute_cpu,
        "overhead": fit_seconds / compute_seconds, "overhead_cpu": fit_cpu / compute_cpu,
    }
    report["table"] = [
        f"fit bench: {n_train} train rows, D = {dim} + {data.dims['text']}, {n_classes} labels, {epochs} epochs, "
        f"batch {report['batch_size']} ({steps} steps/epoch), impute {impute}, device {report['device']} "
        f"({report['torch_threads']} threads), compile {compile}",
        f"  VICReg backend: {requested} -> {backend_used} (fp32 precision {precision}; "
        f"backend check {check_seconds:.2f} s, before the timed fit)",
        f"  prepare (protocol, normalisation, to device): {prepare_seconds:.2f} s",
        f"  fit loop: {fit_seconds:.2f} s = {report['epochs_per_s']:.3f} epochs/s, process CPU {fit_cpu:.2f} s "
        "(includes per-epoch val scoring)",
        f"  pure compute: {step * 1e3:.2f} ms/step (best window), CPU {step_cpu * 1e3:.2f} ms/step; "
        f"x {steps * epochs} steps = {compute_seconds:.2f} s, CPU {compute_cpu:.2f} s",
        f"  fit / pure compute = {report['overhead']:.2f}x wall, {report['overhead_cpu']:.2f}x CPU "
        "(target <= 1.5x)",
    ]
    if prep.resolved.get("predictors"):  # the MLP predictor's step on the same data, for comparison
        mlp_cfg = replace(cfg, predictor="mlp")
        mlp_step, mlp_cpu = pure_step_seconds(mlp_data, prepare(mlp_data, mlp_cfg, prep.device), mlp_cfg)
        report.update(predictors=prep.resolved["predictors"], prompts=prompts, cache_layers=cache_layers,
                      tokens=tokens, mlp_step_ms=mlp_step * 1e3, mlp_step_cpu_ms=mlp_cpu * 1e3)
        report["table"].append(
            f"  step time: prompts {step * 1e3:.2f} ms (text -> image: K = {prompts} prompts in the last "
            f"{cache_layers} blocks of MiniLM, T = {tokens}; image -> text: MLP) vs MLP predictor "
            f"{mlp_step * 1e3:.2f} ms on the same data = {step / mlp_step:.1f}x wall; CPU {step_cpu * 1e3:.2f} "
            f"vs {mlp_cpu * 1e3:.2f} ms = {step_cpu / mlp_cpu:.1f}x")
    return report
