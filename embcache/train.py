"""`embcache fit`: train the feature predictors and the late-fusion classifier on a feature cache.

Read top to bottom: `prepare` (protocol, normalisation, tensors on the device), the loss of one batch,
the training loop (`train`), and `fit`, which runs the seeds and writes the run folder atomically.

Speed: cached features fit in memory, so the whole training split lives on the device and batches are
index gathers (no DataLoader). Each batch puts its rows with both modalities first, in a count fixed on
the host, so VICReg sees a static slice and the step has no host sync; the losses are summed on the
device and read once per epoch.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm.auto import tqdm

from embcache import plots
from embcache.evaluate import (MAIN_METRIC, Dataset, SplitTensors, load_dataset, masks_to,
                               predict_logits, resolve_device, scenario_metrics, summarize, task_metrics)
from embcache.missing import MODALITIES, apply_missing, scenario_of, scenario_present
from embcache.models import FitConfig, FitError, FusionModel
from embcache.prompts import attach_prompt_predictors, resolve_predictors

MIN_PAIRED_PER_BATCH = 16   # VICReg's variance and covariance need a few rows per batch
MIN_STEPS_PER_EPOCH = 8     # small train sets get smaller batches rather than 1-2 steps per epoch
MIN_BATCH = 32


# ------------------------------------------------------------------------------------------------
# Preparation: what every seed shares
# ------------------------------------------------------------------------------------------------
@dataclass
class Prepared:
    device: torch.device
    train: SplitTensors                 # the training rows that have at least one modality
    has: dict[str, torch.Tensor]        # their modalities after the training protocol
    paired: torch.Tensor                # indices (into train) of rows with both modalities
    unpaired: torch.Tensor              # rows with exactly one
    paired_bounds: list[int]            # step s uses paired[b[s]:b[s+1]] of the epoch's permutation
    unpaired_bounds: list[int]
    val: SplitTensors
    val_has: dict[str, torch.Tensor]    # val modalities under the selection scenario
    mean: dict[str, torch.Tensor]       # normalisation: train rows that have the modality
    std: dict[str, torch.Tensor]
    resolved: dict                      # derived settings, saved in config.json


def prepare(data: Dataset, cfg: FitConfig, device: torch.device) -> Prepared:
    """Apply the training protocol, check the data can train this config, move everything to the device."""
    split = data.splits["train"]
    has = apply_missing(split.ids, split.present, cfg.train_missing_rate, cfg.train_missing_type,
                        cfg.missing_seed)
    usable = has["image"] | has["text"]  # rows the data left with nothing teach nothing
    split = split.rows(usable)
    has = {m: has[m][usable] for m in MODALITIES}
    paired = has["image"] & has["text"]
    n_rows, n_paired = len(split), int(paired.sum())
    if n_rows == 0:
        raise FitError(f"{data.sources['train']}: no training row has an image or a text")
    if cfg.impute == "predict" and n_paired < 2:
        raise FitError(
            f"{data.sources['train']}: {n_paired} training rows have both modalities after the missing "
            f"protocol (rate {cfg.train_missing_rate}, type {cfg.train_missing_type}), so the predictors "
            "cannot be trained; use --impute mean (or zero), or a lower --train-missing-rate")
    if data.task_type != "multilabel" and not (split.labels >= 0).any():
        raise FitError(f"{data.sources['train']}: no labeled training rows")
    for m in MODALITIES:
        if not has[m].any():
            raise FitError(f"{data.sources['train']}: no training row has the {m} after the missing protocol")

    batch = min(cfg.batch_size, max(MIN_BATCH, math.ceil(n_rows / MIN_STEPS_PER_EPOCH)))
    steps = math.ceil(n_rows / batch)
    if cfg.impute == "predict":
        steps = max(1, min(steps, n_paired // MIN_PAIRED_PER_BATCH))

    def bounds(n: int) -> list[int]:  # split n rows into `steps` near-equal, contiguous parts
        return np.linspace(0, n, steps + 1).round().astype(int).tolist()

    mean = {m: torch.as_tensor(split.emb[m][has[m]].mean(0), device=device) for m in MODALITIES}
    std = {m: scale_of(split.emb[m][has[m]], device) for m in MODALITIES}
    val = data.splits["val"]
    scenario = scenario_of(cfg.test_missing_type, cfg.test_missing_rate)
    val_has = scenario_present(val.ids, val.present, scenario, cfg.test_missing_rate, cfg.missing_seed)
    resolved = {
        "device": str(device), "batch_size": int(math.ceil(n_rows / steps)), "steps_per_epoch": steps,
        "dims": data.dims, "n_outputs": data.n_outputs, "task": data.task_type, "classes": data.classes,
        "fingerprint": data.fingerprint, "sources": data.sources, "selection_scenario": scenario,
        "rows": {"train": n_rows, "train_paired": n_paired, "train_without_modality": int((~usable).sum()),
                 "val": len(val), "test": len(data.splits["test"])},
        **resolve_predictors(data, cfg),  # --predictor prompts: which direction uses which
    }
    return Prepared(
        device=device, train=SplitTensors.of(split, data.task_type, device), has=masks_to(has, device),
        paired=torch.as_tensor(np.flatnonzero(paired), device=device),
        unpaired=torch.as_tensor(np.flatnonzero(~paired), device=device),
        paired_bounds=bounds(n_paired), unpaired_bounds=bounds(n_rows - n_paired),
        val=SplitTensors.of(val, data.task_type, device), val_has=masks_to(val_has, device),
        mean=mean, std=std, resolved=resolved)


# ------------------------------------------------------------------------------------------------
# The loss of one batch
# ------------------------------------------------------------------------------------------------
def scale_of(emb: np.ndarray, device: torch.device) -> torch.Tensor:
    """Per-dimension std for standardising; dimensions (nearly) constant on the train rows keep scale 1.

    Dead ReLU units and float16 rounding leave dimensions whose train std is ~0; dividing by it would blow
    the tiny differences of other rows up to huge standardised values (and ruin MSE, R2 and the classifier).
    """
    std = torch.as_tensor(emb.std(0), device=device)
    floor = 1e-3 * std.median() if len(std) else 0.0
    return torch.where(std > floor, std, torch.ones_like(std))


def task_loss(task_type: str, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if task_type == "multilabel":
        return F.binary_cross_entropy_with_logits(logits, y)
    # Unlabeled rows (-1) still train the predictors; divide by a clamped count, not .mean(), so a batch
    # without labels gives 0 instead of NaN and nothing syncs with the host.
    total = F.cross_entropy(logits, y, ignore_index=-1, reduction="sum")
    return total / (y >= 0).sum().clamp(min=1)


def batch_loss(net, model: FusionModel, prep: Prepared, idx: torch.Tensor, n_paired: int,
               cfg: FitConfig, task_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to backpropagate, detached [loss, task, vicreg]); rows idx[:n_paired] have both modalities.

    `net` is the model or its torch.compile'd version.
    """
    out = net({m: x[idx] for m, x in prep.train.x.items()}, {m: prep.has[m][idx] for m in MODALITIES})
    task = task_loss(task_type, out.logits, prep.train.y[idx])
    if cfg.impute == "predict":
        vicreg = model.vicreg(out, n_paired)
    else:
        vicreg = torch.zeros((), device=task.device)
    loss = task + cfg.alpha * vicreg
    return loss, torch.stack([loss, task, vicreg]).detach()


def make_model(data: Dataset, prep: Prepared, cfg: FitConfig):
    """(model, its compiled version or itself, optimizer, cosine learning-rate schedule)."""
    torch.manual_seed(cfg.seed)
    model = FusionModel(data.dims, data.n_outputs, cfg).to(prep.device)
    model.set_normalization(prep.mean, prep.std)
    if prep.resolved.get("predictors"):
        attach_prompt_predictors(model, prep.resolved["prompt_encoders"], cfg, data)
    net = torch.compile(model) if cfg.compile else model
    # fused AdamW: one kernel per step instead of several per parameter (launch-bound on a GPU)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  fused=prep.device.type == "cuda")
    total = cfg.epochs * prep.resolved["steps_per_epoch"]
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    return model, net, optimizer, schedule


# ------------------------------------------------------------------------------------------------
# The training loop
# ------------------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    model: FusionModel                  # holding the best epoch's weights
    curves: list[dict]                  # one row per epoch
    best_epoch: int
    best_value: float | None            # val main metric under the selection scenario
    seconds: float


def train(data: Dataset, prep: Prepared, cfg: FitConfig, progress: bool = True) -> TrainResult:
    """Train one seed; keep the epoch with the best val main metric (the last one if val has no labels)."""
    model, net, optimizer, schedule = make_model(data, prep, cfg)
    main = MAIN_METRIC[data.task_type]
    generator = torch.Generator(device=prep.device).manual_seed(cfg.seed)
    pb, ub = prep.paired_bounds, prep.unpaired_bounds
    steps = prep.resolved["steps_per_epoch"]
    curves, best_epoch, best_value, best_state = [], 0, None, None
    start = time.perf_counter()
    bar = tqdm(range(1, cfg.epochs + 1), desc=f"fit seed {cfg.seed}", unit="epoch", disable=not progress)
    for epoch in bar:
        t0 = time.perf_counter()
        model.train()
        paired = prep.paired[torch.randperm(len(prep.paired), device=prep.device, generator=generator)]
        unpaired = prep.unpaired[torch.randperm(len(prep.unpaired), device=prep.device, generator=generator)]
        sums = torch.zeros(3, device=prep.device)
        for s in range(steps):
            idx = torch.cat([paired[pb[s]:pb[s + 1]], unpaired[ub[s]:ub[s + 1]]])
            loss, parts = batch_loss(net, model, prep, idx, pb[s + 1] - pb[s], cfg, data.task_type)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            sums += parts
        mean_loss, mean_task, mean_vicreg = (sums / steps).tolist()  # the epoch's one host sync
        value = task_metrics(data.task_type, predict_logits(model, prep.val.x, prep.val_has), prep.val.y)[main]
        if value is None or best_value is None or value > best_value:
            best_epoch, best_value = epoch, value
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        curves.append({"epoch": epoch, "loss": mean_loss, "task_loss": mean_task, "vicreg_loss": mean_vicreg,
                       f"val_{main}": value, "lr": schedule.get_last_lr()[0],
                       "seconds": time.perf_counter() - t0})
        bar.set_postfix(loss=f"{mean_loss:.4f}", **{f"val_{main}": "n/a" if value is None else f"{value:.4f}"})
    model.load_state_dict(best_state)
    return TrainResult(model, curves, best_epoch, best_value, time.perf_counter() - start)


# ------------------------------------------------------------------------------------------------
# fit: seeds, outputs
# ------------------------------------------------------------------------------------------------
def fit(cfg: FitConfig, out: str | Path, *, seeds: list[int] | None = None, overwrite: bool = False,
        progress: bool = True) -> dict:
    """Train one run per seed and write RUN_DIR (docs/metrics-format.md); returns its metrics.json.

    One seed: RUN_DIR holds the run. Several: RUN_DIR/seed-<s>/ each, and RUN_DIR/metrics.json holds
    the mean and std over seeds. Everything is checked before anything is written, and written to a
    temporary folder renamed to RUN_DIR at the end, so a failed or interrupted fit leaves nothing behind.
    """
    seeds = list(seeds) if seeds else [cfg.seed]
    # Record local stores as absolute paths so `embcache eval RUN` works from any folder.
    cfg = replace(cfg, **{k: os.path.abspath(v) for k in ("store", "val_store", "test_store")
                          if (v := getattr(cfg, k)) and "://" not in v})
    out = Path(out)
    if out.exists() and not overwrite:
        raise FitError(f"{out} already exists; pass --overwrite to replace it")
    data = load_dataset(cfg.store, cfg.val_store, cfg.test_store, hidden=cfg.predictor == "prompts")
    prep = prepare(data, cfg, resolve_device(cfg.device))
    with staged_dir(out) as tmp:
        runs = []
        for seed in seeds:
            run_cfg = replace(cfg, seed=seed)
            result = train(data, prep, run_cfg, progress)
            runs.append(write_run(tmp if len(seeds) == 1 else tmp / f"seed-{seed}", data, prep, run_cfg, result))
        if len(seeds) == 1:
            return runs[0]
        summary = summarize(runs)
        write_json(tmp / "metrics.json", summary)
        plots.plot_scenarios(summary, tmp / "scenarios.png")
        return summary


def write_run(run_dir: Path, data: Dataset, prep: Prepared, cfg: FitConfig, result: TrainResult) -> dict:
    """config.json, model.safetensors, curves.jsonl, metrics.json and the two plots of one seed."""
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = {**prep.resolved, "seconds": result.seconds, "selection": {
        "split": "val", "scenario": prep.resolved["selection_scenario"], "metric": MAIN_METRIC[data.task_type],
        "best_epoch": result.best_epoch, "value": result.best_value, "epochs": cfg.epochs}}
    write_json(run_dir / "config.json", {**asdict(cfg), "resolved": resolved})
    save_file({k: v.detach().cpu().contiguous() for k, v in result.model.state_dict().items()},
              str(run_dir / "model.safetensors"), metadata={"format": "embcache.fit/1"})
    with open(run_dir / "curves.jsonl", "w") as fh:
        fh.writelines(json.dumps(row) + "\n" for row in result.curves)
    metrics = scenario_metrics(result.model, data, cfg, resolved)
    write_json(run_dir / "metrics.json", metrics)
    plots.plot_curves(result.curves, MAIN_METRIC[data.task_type], run_dir / "curves.png")
    plots.plot_scenarios(metrics, run_dir / "scenarios.png")
    return metrics


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


@contextmanager
def staged_dir(out: Path):
    """Yield a fresh sibling temp folder; on success it replaces `out`, on any error it is removed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield tmp
        tmp.chmod(0o755)
        old = None
        if out.exists():  # --overwrite: swap, then delete the old run
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
