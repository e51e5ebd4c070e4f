"""`embcache tune`: BitFit, i.e. adapt one frozen encoder to the task by training only its bias terms.

Each encoder is tuned alone, on the training rows that have its modality (no pairs needed), with a temporary
linear head on its pooled embedding and the task loss. "Have" is under the missing-modality protocol that `fit`
trains with (embcache/missing.py, the same rate, type and seed, defaults those of `FitConfig`): a row the protocol
takes the modality from is not seen by the encoder, in `tune` as in `fit`. Validation rows follow the scenario
`fit` selects its best epoch on (test rate and type). Every parameter but the biases stays frozen, and so do
the normalisation statistics (BatchNorm runs in eval mode). The result is a small file of bias deltas
(docs/bitfit-format.md) that `embcache extract --image-bitfit/--text-bitfit` adds to the same base checkpoint.

Each epoch ends with the validation metric and a resume state beside the output (`<out>.state.pt`), so a killed
run, or a rerun with more --epochs, continues where it stopped; shuffling and dropout are seeded per epoch, so a
resumed run gives the same result as a straight one.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader

from embcache import datasets as ds
from embcache.config import TuneConfig, check_protocol
from embcache.encoders import Encoder, to_device, load_image_encoder, load_text_encoder
from embcache.errors import EmbcacheError
from embcache.extract import Collate, SampleSource
from embcache.metrics import MAIN_METRIC, task_loss, task_metrics
from embcache.missing import MODALITIES, apply_missing, scenario_of, scenario_present
from embcache.runtime import resolve_device, save_safetensors, staged_file


FORMAT = "embcache.bitfit/1"
# Batch keys of `extract.Collate` per modality: (positions of the rows that have it, the encoder's input).
INPUTS = {"image": ("image_pos", "pixels"), "text": ("text_pos", "tokens")}
PROTOCOL_FIELDS = ("train_missing_rate", "train_missing_type", "test_missing_rate", "test_missing_type",
                   "missing_seed")


class TuneError(EmbcacheError):
    """A tuning run that cannot start (no rows to train on, a resume state made with other arguments)."""


@dataclass
class TuneReport:
    out: str
    trainable: int                     # encoder parameters trained (the biases)
    total: int                         # all encoder parameters
    head: int                          # head parameters (trained, not part of the encoder)
    start_epoch: int                   # 0 for a fresh run, else the epochs a resume state had done
    history: list[dict]                # per epoch: epoch (1-based), loss, val (the metric, None without val rows)
    metric: str                        # the validation metric's name
    best_epoch: int
    best_val: float | None
    unreadable: int                    # rows skipped in the last epoch because their image did not decode
    rows: dict                         # train / val: rows tuned and validated on (after the missing protocol)
    encoder: Encoder                   # the tuned encoder (best epoch), frozen again, ready to `encode`


def state_path(out: str) -> str:
    return f"{out}.state.pt"


def is_bias(name: str) -> bool:
    """Bias terms, normalisation biases and open_clip/torch attention's `in_proj_bias` included."""
    return name.endswith("bias")


def load_encoder(cfg: TuneConfig) -> Encoder:
    if cfg.modality == "image":
        return load_image_encoder(cfg.image_encoder, cfg.image_checkpoint)
    if cfg.modality == "text":
        return load_text_encoder(cfg.text_encoder, cfg.text_pooling, cfg.text_max_length)
    raise TuneError(f"modality must be image or text, got {cfg.modality!r}")


def set_training(module: torch.nn.Module) -> None:
    """Train mode (dropout on, HF gradient checkpointing active) with BatchNorm statistics frozen: they are
    buffers, not biases."""
    module.train()
    for sub in module.modules():
        if isinstance(sub, torch.nn.modules.batchnorm._BatchNorm):
            sub.eval()


def enable_checkpointing(module: torch.nn.Module) -> None:
    """Gradient checkpointing where the model offers it: timm and open_clip, or Hugging Face (v5 name, v4 name)."""
    if hasattr(module, "set_grad_checkpointing"):
        module.set_grad_checkpointing(True)
    elif hasattr(module, "activation_checkpointing_enable"):
        module.activation_checkpointing_enable()
    elif hasattr(module, "gradient_checkpointing_enable"):
        module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def usable_rows(dataset: ds.Dataset, split: str, modality: str) -> list[ds.Sample]:
    """The split's rows that have the modality and a label (-1 = unlabeled in single-label tasks)."""
    return [s for s in dataset.samples if s.split == split and getattr(s, modality) is not None
            and (dataset.task == "multilabel" or s.label >= 0)]


def protocol(cfg: TuneConfig) -> dict:
    """The missing-modality protocol of the run (recorded in the BitFit file and the resume state)."""
    return {**{name: getattr(cfg, name) for name in PROTOCOL_FIELDS},
            "val_scenario": scenario_of(cfg.test_missing_type, cfg.test_missing_rate)}


def protocol_rows(dataset: ds.Dataset, split: str, cfg: TuneConfig) -> list[ds.Sample]:
    """`usable_rows` minus the rows the missing protocol takes the modality from: on `train` the training
    protocol, on `val` fit's selection scenario. Presence is what the reader found (an image that will not decode
    counts as present here, while `fit` sees it absent: such rows are rare and skipped when they fail to load)."""
    rows = [s for s in dataset.samples if s.split == split]
    ids = [s.id for s in rows]
    present = {m: np.array([getattr(s, m) is not None for s in rows], dtype=bool) for m in MODALITIES}
    if split == "train":
        has = apply_missing(ids, present, cfg.train_missing_rate, cfg.train_missing_type, cfg.missing_seed)
    else:
        scenario = scenario_of(cfg.test_missing_type, cfg.test_missing_rate)
        has = scenario_present(ids, present, scenario, cfg.test_missing_rate, cfg.missing_seed)
    kept = {id(s) for s, keep in zip(rows, has[cfg.modality]) if keep}
    return [s for s in usable_rows(dataset, split, cfg.modality) if id(s) in kept]


def targets(samples: list[ds.Sample], task: str, n_classes: int) -> torch.Tensor:
    if task == "multilabel":
        y = torch.zeros(len(samples), n_classes)
        for row, sample in enumerate(samples):
            y[row, list(sample.label)] = 1.0
        return y
    return torch.tensor([s.label for s in samples], dtype=torch.long)


class Tuner:
    """The encoder, its head and their optimizer; one object so that resume state is one dict."""

    def __init__(self, cfg: TuneConfig, encoder: Encoder, n_outputs: int, device: torch.device):
        self.cfg, self.encoder, self.device = cfg, encoder, device
        module = encoder.module.to(device)
        self.biases = {n: p for n, p in module.named_parameters() if is_bias(n)}
        self.base = {n: p.detach().clone() for n, p in self.biases.items()}
        torch.manual_seed(cfg.seed)
        self.head = torch.nn.Linear(encoder.dim, n_outputs).to(device)
        groups = [{"params": list(self.head.parameters()), "lr": cfg.head_lr}]
        if cfg.tune_biases:
            for p in self.biases.values():
                p.requires_grad_(True)
            groups.append({"params": list(self.biases.values()), "lr": cfg.lr})
        self.optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
        if device.type == "cuda":
            enable_checkpointing(module)

    def embed(self, inputs) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            return self.encoder.forward(self.encoder.module, inputs).float()

    def delta(self) -> dict[str, torch.Tensor]:
        return {n: (p.detach() - self.base[n]).cpu() for n, p in self.biases.items()}

    def state(self) -> dict:
        return {"biases": {n: p.detach().cpu().clone() for n, p in self.biases.items()},
                "head": {k: v.cpu().clone() for k, v in self.head.state_dict().items()},
                "optimizer": self.optimizer.state_dict()}

    def keep(self, best: dict) -> Encoder:
        """Put the best epoch's biases back (base + delta, as `apply_bitfit` does) and freeze the encoder."""
        with torch.no_grad():
            for n, p in self.biases.items():
                p.copy_(self.base[n] + best["delta"][n].to(p.device))
                p.requires_grad_(False)
        self.encoder.module.eval()
        return self.encoder

    def load_state(self, state: dict) -> None:
        with torch.no_grad():
            for n, p in self.biases.items():
                p.copy_(state["biases"][n])
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])


def batches(samples, task, n_classes, encoder, cfg, order: list[int]):
    """(encoder inputs, targets, rows dropped) per batch of `order`; rows whose image does not decode are dropped."""
    source = SampleSource(samples, encoder.preprocess, cfg.modality == "image", cfg.modality == "text")
    collate = Collate(encoder.preprocess if cfg.modality == "text" else None)
    chunks = [order[i:i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
    loader = DataLoader(source, batch_sampler=chunks, num_workers=cfg.workers, collate_fn=collate)
    y_all = targets(samples, task, n_classes)
    pos_key, input_key = INPUTS[cfg.modality]
    for batch in loader:
        pos = batch[pos_key]
        yield batch[input_key], y_all[batch["rows"][pos]], len(batch["rows"]) - len(pos)


def epoch_seed(seed: int, epoch: int) -> int:
    return seed * 100_003 + epoch


def train_epoch(tuner: Tuner, samples, task, n_classes, epoch: int, bar) -> tuple[float, int]:
    cfg = tuner.cfg
    torch.manual_seed(epoch_seed(cfg.seed, epoch))  # dropout, the same whether resumed or not
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(epoch_seed(cfg.seed, epoch)))
    set_training(tuner.encoder.module)
    total, count, unreadable = 0.0, 0, 0
    for inputs, y, dropped in batches(samples, task, n_classes, tuner.encoder, cfg, order.tolist()):
        unreadable += dropped
        bar.update(len(y) + dropped)
        if not len(y):
            continue
        y = y.to(tuner.device)
        loss = task_loss(task, tuner.head(tuner.embed(to_device(inputs, tuner.device))), y)
        tuner.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        tuner.optimizer.step()
        total, count = total + loss.item() * len(y), count + len(y)
        bar.set_postfix(loss=f"{total / count:.4f}")
    return total / max(count, 1), unreadable


@torch.no_grad()
def validate(tuner: Tuner, samples, task, n_classes) -> tuple[float | None, int]:
    """The task's main metric on `samples` (None when there are none, or AUROC sees one class)."""
    if not samples:
        return None, 0
    tuner.encoder.module.eval()
    logits, ys, unreadable = [], [], 0
    for inputs, y, dropped in batches(samples, task, n_classes, tuner.encoder, tuner.cfg, list(range(len(samples)))):
        unreadable += dropped
        if len(y):
            logits.append(tuner.head(tuner.embed(to_device(inputs, tuner.device))).cpu())
            ys.append(y)
    if not ys:
        return None, unreadable
    return task_metrics(task, torch.cat(logits), torch.cat(ys))[MAIN_METRIC[task]], unreadable


def rows_digest(rows: dict[str, list[ds.Sample]], modality: str) -> str:
    """sha256 of what the tuned rows are (per split: id, label, and the text or the image's reference), so that a
    dataset rewritten under the same root does not resume a state made on the old one."""
    content = {split: [[s.id, s.label, s.text if modality == "text" else str(s.image)] for s in samples]
               for split, samples in rows.items()}
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


def run_arguments(cfg: TuneConfig, encoder: Encoder, rows: dict[str, list[ds.Sample]]) -> dict:
    """What a resume state must share with the run that continues it (not --epochs: more may be asked)."""
    return {"dataset": cfg.dataset, "root": os.path.abspath(cfg.root), "options": cfg.dataset_options,
            "rows_sha256": rows_digest(rows, cfg.modality),
            "modality": cfg.modality, "encoder": encoder.attrs["model"],
            "checkpoint_sha256": encoder.attrs["checkpoint_sha256"], "preprocess": encoder.attrs["preprocess"],
            "pooling": encoder.attrs["pooling"], "lr": cfg.lr, "head_lr": cfg.head_lr,
            "batch_size": cfg.batch_size, "seed": cfg.seed, "tune_biases": cfg.tune_biases,
            "missing_protocol": protocol(cfg)}


def load_resume_state(cfg: TuneConfig, arguments: dict, log) -> dict | None:
    path = state_path(cfg.out)
    if cfg.resume is False or not os.path.exists(path):
        if cfg.resume:
            raise TuneError(f"--resume: there is no resume state {path}")
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    diffs = [f"{k}: {state['arguments'].get(k)!r} -> {v!r}" for k, v in arguments.items()
             if state["arguments"].get(k) != v]
    if not diffs:
        return state
    if cfg.resume:
        raise TuneError(f"{path} was made with other arguments ({'; '.join(diffs)}); drop --resume to start over")
    log(f"{path} was made with other arguments ({'; '.join(diffs)}): starting over")
    return None


def write_bitfit(path: str, best: dict, encoder: Encoder, cfg: TuneConfig, dataset: ds.Dataset,
                 metric: str, rows: dict) -> None:
    tensors = {f"delta.{n}": d.contiguous() for n, d in best["delta"].items()}
    tensors.update({f"head.{k}": v.contiguous() for k, v in best["head"].items()})
    attrs = encoder.attrs
    metadata = {"format": FORMAT, "base_checkpoint_sha256": attrs["checkpoint_sha256"],
                "modality": cfg.modality, "encoder": attrs["model"], "pooling": attrs["pooling"],
                "preprocess": json.dumps(attrs["preprocess"]), "task": dataset.task,
                "classes": json.dumps(dataset.classes), "best_epoch": str(best["epoch"]), "metric": metric,
                "val_metric": json.dumps(best["val"]), "biases_tuned": json.dumps(cfg.tune_biases),
                "missing_protocol": json.dumps(protocol(cfg)), "rows": json.dumps(rows)}
    with staged_file(path) as tmp:  # a reader never sees a half-written file
        save_safetensors(tensors, tmp, metadata)


def tune(cfg: TuneConfig, progress: bool = True, log=print) -> TuneReport:
    check_protocol(cfg, TuneError)
    try:
        dataset = ds.open_dataset(cfg.dataset, cfg.root, **cfg.dataset_options)
    except ds.DatasetError as exc:  # malformed metadata, or a reader option the reader does not take
        raise TuneError(str(exc)) from exc
    train, val = (protocol_rows(dataset, split, cfg) for split in ("train", "val"))
    where = (f"after the missing protocol (rate {cfg.train_missing_rate}, type {cfg.train_missing_type}, "
             f"seed {cfg.missing_seed})")
    if not train:
        raise TuneError(f"{cfg.root}: no labeled training row has the {cfg.modality} {where}"
                        + ("; lower --train-missing-rate" if usable_rows(dataset, "train", cfg.modality) else ""))
    if not val:
        log(f"no labeled validation row has the {cfg.modality} under the selection scenario "
            f"{protocol(cfg)['val_scenario']}: the last epoch is kept")
    task, n_classes, metric = dataset.task, len(dataset.classes), MAIN_METRIC[dataset.task]
    encoder = load_encoder(cfg)
    device = resolve_device(cfg.device)
    tuner = Tuner(cfg, encoder, n_classes, device)
    trainable = sum(p.numel() for p in tuner.biases.values()) if cfg.tune_biases else 0
    total = sum(p.numel() for p in encoder.module.parameters())
    head = sum(p.numel() for p in tuner.head.parameters())
    log(f"trainable: {trainable:,} of {total:,} encoder parameters ({100 * trainable / total:.3f}%), "
        f"plus the head's {head:,}; {len(train)} training rows have the {cfg.modality} {where}, "
        f"{len(val)} validation rows under {protocol(cfg)['val_scenario']} at rate {cfg.test_missing_rate}")

    arguments = run_arguments(cfg, encoder, {"train": train, "val": val})
    state = load_resume_state(cfg, arguments, log)
    if state is not None:
        tuner.load_state(state["tuner"])
        log(f"resuming from {state_path(cfg.out)}: epoch {state['epoch']} of {cfg.epochs} done")
    start = state["epoch"] if state else 0
    best = state["best"] if state else None
    history = state["history"] if state else []

    from tqdm.auto import tqdm

    unreadable = 0
    for epoch in range(start, cfg.epochs):
        with tqdm(total=len(train), unit="sample", desc=f"tune {epoch + 1}/{cfg.epochs}",
                  disable=not progress, leave=False) as bar:
            loss, unreadable = train_epoch(tuner, train, task, n_classes, epoch, bar)
        val_value, val_unreadable = validate(tuner, val, task, n_classes)
        unreadable += val_unreadable
        history.append({"epoch": epoch + 1, "loss": loss, "val": val_value})
        score = -math.inf if val_value is None else val_value
        if best is None or score >= best["score"]:  # ties go to the later epoch
            best = {"epoch": epoch + 1, "score": score, "val": val_value, "delta": tuner.delta(),
                    "head": {k: v.cpu().clone() for k, v in tuner.head.state_dict().items()}}
        log(f"epoch {epoch + 1}: loss {loss:.4f}, val {metric} "
            f"{'-' if val_value is None else f'{val_value:.4f}'}")
        state = {"arguments": arguments, "epoch": epoch + 1, "tuner": tuner.state(), "best": best,
                 "history": history}
        with staged_file(state_path(cfg.out)) as tmp:
            torch.save(state, tmp)
    if best is None:
        raise TuneError(f"--epochs {cfg.epochs}: nothing to do and no earlier epoch to keep")
    rows = {"train": len(train), "val": len(val)}
    write_bitfit(cfg.out, best, encoder, cfg, dataset, metric, rows)
    return TuneReport(cfg.out, trainable, total, head, start, history, metric, best["epoch"], best["val"],
                      unreadable, rows, tuner.keep(best))
