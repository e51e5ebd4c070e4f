"""`embcache bench fit`: whole fit loop against the pure compute of the same model.

The cache is synthetic and MM-IMDb-sized (15,552 / 2,608 / 7,799 rows, 23 labels), built in memory
(`embcache.synthetic`), so the bench measures training, not Zarr reads. "Pure compute" is one
forward + backward + optimizer step of the same model on a fixed batch, timed over a few steps after a
warm-up, times the number of steps of the run; the ratio fit / compute is the loop's overhead
(gathers, permutations, per-epoch val scoring, best-epoch copies).
"""
from __future__ import annotations

import time

import torch

from embcache import synthetic
from embcache.evaluate import dataset_from_features, resolve_device
from embcache.models import FitConfig
from embcache.train import batch_loss, make_model, prepare, train


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pure_step_seconds(data, prep, cfg: FitConfig, *, warmup: int = 3, steps: int = 20) -> float:
    """Seconds of one training step (forward, backward, optimizer) on the loop's first batch shape."""
    model, net, optimizer, _ = make_model(data, prep, cfg)
    n_paired = prep.paired_bounds[1]
    idx = torch.cat([prep.paired[:n_paired], prep.unpaired[:prep.unpaired_bounds[1]]])
    for i in range(warmup + steps):
        if i == warmup:
            _sync(prep.device)
            start = time.perf_counter()
        loss, _ = batch_loss(net, model, prep, idx, n_paired, cfg, data.task_type)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    _sync(prep.device)
    return (time.perf_counter() - start) / steps


def run_fit_bench(*, n_train: int = synthetic.MMIMDB_SIZES["n_train"], dim: int = 768, n_classes: int = 23,
                  epochs: int = 20, batch_size: int = 256, impute: str = "predict", device: str = "auto",
                  compile: bool = False) -> dict:
    scale = n_train / synthetic.MMIMDB_SIZES["n_train"]  # val/test keep MM-IMDb's proportions
    t0 = time.perf_counter()
    features = synthetic.make_features(
        n_train=n_train, n_val=round(synthetic.MMIMDB_SIZES["n_val"] * scale),
        n_test=round(synthetic.MMIMDB_SIZES["n_test"] * scale), d_image=dim, d_text=dim,
        n_classes=n_classes, task_type="multilabel", shared_dim=64, private_dim=16)
    data = dataset_from_features(features, "synthetic:mmimdb")
    make_seconds = time.perf_counter() - t0
    cfg = FitConfig(store="synthetic:mmimdb", impute=impute, epochs=epochs, batch_size=batch_size,
                    device=device, compile=compile)
    t0 = time.perf_counter()
    prep = prepare(data, cfg, resolve_device(device))
    prepare_seconds = time.perf_counter() - t0
    result = train(data, prep, cfg, progress=False)
    fit_seconds = result.seconds
    steps = prep.resolved["steps_per_epoch"]
    step = pure_step_seconds(data, prep, cfg)
    compute_seconds = step * steps * epochs
    report = {
        "n_train": n_train, "dim": dim, "n_classes": n_classes, "epochs": epochs, "impute": impute,
        "device": str(prep.device), "torch_threads": torch.get_num_threads(), "compile": compile,
        "batch_size": prep.resolved["batch_size"], "steps_per_epoch": steps,
        "synthetic_seconds": make_seconds, "prepare_seconds": prepare_seconds,
        "fit_seconds": fit_seconds, "epochs_per_s": epochs / fit_seconds,
        "step_ms": step * 1e3, "compute_seconds": compute_seconds, "overhead": fit_seconds / compute_seconds,
    }
    report["table"] = [
        f"fit bench: {n_train} train rows, D = {dim} + {dim}, {n_classes} labels, {epochs} epochs, "
        f"batch {report['batch_size']} ({steps} steps/epoch), impute {impute}, device {report['device']} "
        f"({report['torch_threads']} threads), compile {compile}",
        f"  prepare (protocol, normalisation, to device): {prepare_seconds:.2f} s",
        f"  fit loop: {fit_seconds:.2f} s = {report['epochs_per_s']:.3f} epochs/s "
        f"(includes per-epoch val scoring)",
        f"  pure compute: {step * 1e3:.2f} ms/step x {steps * epochs} steps = {compute_seconds:.2f} s",
        f"  fit / pure compute = {report['overhead']:.2f}x (target <= 1.5x)",
    ]
    return report
