"""`bench accuracy --dataset`: extract real datasets once into a cache, run the grid, write the paper table."""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from embcache.bench.accuracy import SETTINGS, run_dataset, write_report
from embcache.config import IMPUTE_MODES, FitConfig, FitError, TuneConfig
from embcache.data import labeled, load_dataset
from embcache.datasets import DATASET_NAMES
from embcache.encoders import DEFAULT_IMAGE_ENCODER, DEFAULT_TEXT_ENCODER
from embcache.errors import EmbcacheError
from embcache.extract import ExtractConfig, extract
from embcache.metrics import metric_names
from embcache.missing import MISSING_TYPES, MODALITIES
from embcache.tune import tune

SCHEMA = "embcache.bench-paper/1"
DEFAULT_CACHE = "bench-cache"

# Display names only; the columns themselves come from each store's task type.
TITLES = {"mmimdb": "MM-IMDb", "food101": "Food-101", "hateful_memes": "Hateful Memes"}
METRIC_TITLES = {"f1_macro": "F1-macro", "f1_micro": "F1-micro", "accuracy": "accuracy", "auroc": "AUROC"}
ENCODER_FIELDS = ("image_encoder", "image_checkpoint", "image_bitfit", "text_encoder", "text_pooling",
                  "text_max_length", "text_bitfit")


class PaperError(EmbcacheError):
    """A benchmark request that cannot start (a dataset without a root, an unknown dataset, ...)."""


def pair_sources(datasets: list[str] | tuple[str, ...], roots: list[str] | tuple[str, ...]) -> list[tuple[str, str]]:
    """The k-th --root goes with the k-th --dataset; every name known, every root existing."""
    for name in datasets:
        if name not in DATASET_NAMES:
            raise PaperError(f"unknown dataset {name!r}; choose from {', '.join(DATASET_NAMES)}")
    if len(roots) < len(datasets):
        missing = datasets[len(roots):]
        raise PaperError(f"--dataset {missing[0]} has no --root: give one --root per --dataset, in the same "
                         "order (the k-th --root belongs to the k-th --dataset)")
    if len(roots) > len(datasets):
        raise PaperError(f"--root {roots[len(datasets)]} has no --dataset: give one --dataset per --root")
    if not datasets:
        raise PaperError("give at least one --dataset NAME --root PATH")
    pairs = list(zip(datasets, roots))
    for name, root in pairs:
        if not os.path.exists(root):
            raise PaperError(f"--root {root} (for --dataset {name}) does not exist")
    seen = set()
    for name, root in pairs:
        key = (name, os.path.abspath(root))
        if key in seen:
            raise PaperError(f"--dataset {name} --root {root} is given twice")
        seen.add(key)
    return pairs


def encoder_settings(encoders: dict | None) -> dict:
    """The extract encoder fields, defaults filled in; local paths made absolute (the cache key uses them)."""
    out = {"image_encoder": DEFAULT_IMAGE_ENCODER, "image_checkpoint": None, "image_bitfit": None,
           "text_encoder": DEFAULT_TEXT_ENCODER, "text_pooling": "mean", "text_max_length": 128,
           "text_bitfit": None}
    unknown = set(encoders or {}) - set(out)
    if unknown:
        raise PaperError(f"unknown encoder settings {sorted(unknown)}; expected some of {list(ENCODER_FIELDS)}")
    out.update({k: v for k, v in (encoders or {}).items() if v is not None})
    for key in ("image_checkpoint", "image_bitfit", "text_bitfit"):
        if out[key] and os.path.exists(out[key]):
            out[key] = os.path.abspath(out[key])
    backend, sep, model = out["text_encoder"].partition(":")
    if sep and os.path.exists(model):
        out["text_encoder"] = f"{backend}:{os.path.abspath(model)}"
    return out


def cache_path(cache: str | Path, name: str, root: str, encoders: dict, dtype: str = "float16") -> str:
    """One store per (dataset, root, encoder settings): other encoders get another store, not a refusal.

    The key is only the name; the store's own fingerprint (weights' sha256, the data's hash) decides reuse."""
    key = json.dumps({"dataset": name, "root": os.path.abspath(root), "dtype": dtype,
                      **{k: encoders[k] for k in ENCODER_FIELDS}}, sort_keys=True)
    return os.path.join(str(cache), f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.zarr")


def protocols(train_rate: float, test_types) -> dict:
    """(setting, test type) -> the training protocol (missing rate, missing type) of those runs, one per distinct
    protocol: complete training is one (rate 0, every row) for all test types; missing training one per type."""
    out = {("complete", test_types[0]): (0.0, test_types[0])}
    out.update({("missing", t): (train_rate, t) for t in test_types})
    return out


def tuned_encoders(cache, name: str, root: str, settings: dict, rate: float, missing_type: str, test_rate: float,
                   base: FitConfig, epochs: int, workers: int, progress: bool, label: str, log) -> dict:
    """`settings` with image_bitfit / text_bitfit set to both encoders tuned under one training protocol (train
    rows that keep the modality at (rate, missing_type); the best epoch chosen on the val scenario fit selects
    on). The files live in `cache`, named by everything that makes them; a finished tuning is resumed in no time
    (`embcache tune`'s resume state)."""
    key = json.dumps({"dataset": name, "root": os.path.abspath(root), "epochs": epochs, "rate": rate,
                      "type": missing_type, "test_rate": test_rate, "seed": base.missing_seed,
                      **{k: settings[k] for k in ENCODER_FIELDS}}, sort_keys=True)
    folder = os.path.join(str(cache), f"{name}-bitfit-{hashlib.sha256(key.encode()).hexdigest()[:12]}")
    os.makedirs(folder, exist_ok=True)
    out = dict(settings)
    for modality in MODALITIES:
        path = os.path.join(folder, f"{modality}.safetensors")
        log(f"{label}: tuning the {modality} encoder's biases, training protocol rate {rate} type {missing_type}, "
            f"into {path}")
        cfg = TuneConfig(dataset=name, root=root, modality=modality, out=path, epochs=epochs,
                         workers=workers, device=base.device, train_missing_rate=rate,
                         train_missing_type=missing_type, test_missing_rate=test_rate,
                         test_missing_type=missing_type, missing_seed=base.missing_seed,
                         **{k: settings[k] for k in ENCODER_FIELDS if not k.endswith("_bitfit")})
        tune(cfg, progress=progress, log=lambda m: log(f"  {m}"))
        out[f"{modality}_bitfit"] = path
    return out


def _labels(pairs: list[tuple[str, str]]) -> list[str]:
    """Column-group names: the dataset name, numbered when the same reader is used on several roots."""
    counts: dict[str, int] = {}
    labels = []
    for name, _ in pairs:
        counts[name] = counts.get(name, 0) + 1
        labels.append(name if counts[name] == 1 else f"{name}-{counts[name]}")
    return labels


# ------------------------------------------------------------------------------------------------
# The table
# ------------------------------------------------------------------------------------------------
def _stats(values) -> dict:
    values = [float(v) for v in values if v is not None]
    return {"mean": float(np.mean(values)) if values else None,
            "std": float(np.std(values, ddof=1)) if len(values) > 1 else (0.0 if values else None),
            "n": len(values)}


def dataset_scores(grid: dict, imputes, test_types) -> dict:
    """{setting: {scenario: {metric: {impute: {mean, std, n}}}}} over seeds, every metric of the task.

    `full` is scored with the models trained for the first test type (as in `bench accuracy`'s table)."""
    out: dict = {}
    cells = grid["cells"]
    for setting in SETTINGS:
        for scenario, test_type in [(f"missing-{t}", t) for t in test_types] + [("full", test_types[0])]:
            row = out.setdefault(setting, {}).setdefault(scenario, {})
            for metric in metric_names(grid["task"]):
                for impute in imputes:
                    group = [c for c in cells
                             if (c["setting"], c["test_type"], c["impute"]) == (setting, test_type, impute)]
                    row.setdefault(metric, {})[impute] = _stats(c["test"][scenario][metric] for c in group)
    return out


def _cell(stats: dict) -> str:
    if stats["mean"] is None:
        return "n/a"
    return f"{stats['mean']:.3f}" if stats["n"] < 2 else f"{stats['mean']:.3f} ± {stats['std']:.3f}"


def format_markdown(report: dict) -> list[str]:
    """The paper-style table as Markdown, with a line on what each part means and one note per dataset."""
    datasets, imputes = report["datasets"], report["imputes"]
    rate, train_rate, types = report["test_rate"], report["train_rate"], report["test_types"]
    lines = [f"Missing-modality grid (test missing rate {rate}, seeds {report['seeds']}, mean ± std over seeds): "
             f"{', '.join(imputes)} fill the missing modality; training 'complete' = train missing rate 0, "
             f"'missing {train_rate}' = train missing rate {train_rate} of the test scenario's type.", ""]
    header = ["training", "test"]
    for ds in datasets:
        for metric in ds["metrics"]:
            header += [f"{ds['title']} {METRIC_TITLES.get(metric, metric)}: {impute}" for impute in imputes]
    rows = []
    for setting in SETTINGS:
        label = "complete" if setting == "complete" else f"missing {train_rate}"
        for scenario in [f"missing-{t}" for t in types] + ["full"]:
            row = [label, scenario if scenario == "full" else f"{scenario} {rate}"]
            for ds in datasets:
                for metric in ds["metrics"]:
                    row += [_cell(ds["scores"][setting][scenario][metric][impute]) for impute in imputes]
            rows.append(row)
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]

    def line(cells):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    lines += [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows]
    lines.append("")
    for ds in datasets:
        rows_ = ds["rows"]
        note = (f"- {ds['title']} ({ds['name']}, {ds['root']}): {ds['task']}, {ds['classes']} classes, rows "
                f"train/val/test {rows_['train']}/{rows_['val']}/{rows_['test']}, "
                f"{ds['test_labeled']} labeled test rows; features {ds['store']}"
                + (" (reused)" if ds["reused"] else ""))
        if ds.get("stores"):
            note += (f"; encoders BitFit-tuned ({report['tune_epochs']} epochs) per training protocol, one store "
                     "each: " + ", ".join(f"{key}: {os.path.basename(p)}" for key, p in ds["stores"].items()))
        if not ds["test_labeled"]:
            note += "; the test split has no labels, so its test metrics are n/a"
        lines.append(note)
    return lines


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------
def run_paper(sources: list[tuple[str, str]], base: FitConfig, *, seeds: list[int], encoders: dict | None = None,
              cache: str | Path = DEFAULT_CACHE, out: str | Path | None = None, test_rate: float = 0.7,
              train_rate: float = 0.7, batch_size: int | None = None, workers: int = 2,
              overwrite: bool = False, progress: bool = True, imputes=IMPUTE_MODES, test_types=MISSING_TYPES,
              tune_epochs: int = 0, jobs: int = 1, log=print) -> dict:
    """Extract every (dataset, root) into `cache`, run the accuracy grid on each store (`jobs` worker processes:
    `run_dataset`), write the table.

    One store per dataset and encoder settings (`cache_path`); a finished store with the same fingerprint is
    reused, an interrupted one resumes. The grid is `embcache.bench.accuracy.run_dataset`'s. The table: rows =
    (training setting, test scenario), one column group per dataset with the metrics of its task type
    (multilabel: F1-macro, F1-micro; multiclass: accuracy; binary: AUROC, accuracy), one column per impute mode,
    cells mean ± std over seeds. Files in `out`: paper.md (the table) and paper.json (its numbers, every run).

    tune_epochs > 0: as the paper adapts its encoders, both are BitFit-tuned (`embcache tune`, that many epochs)
    once per training protocol on the training rows it keeps (complete: all; missing: per test type, those that
    keep the modality), and each protocol's runs use the store those encoders extract (`tuned_encoders`), so
    missing training never tunes on what its protocol hides. The probe is the complete protocol's.
    """
    pairs = pair_sources([n for n, _ in sources], [r for _, r in sources])
    settings = encoder_settings(encoders)
    labels = _labels(pairs)
    started = time.perf_counter()

    if tune_epochs and (settings["image_bitfit"] or settings["text_bitfit"]):
        raise PaperError("--tune-epochs tunes the encoders itself, once per training protocol; drop "
                         "--image-bitfit / --text-bitfit (or --tune-epochs to use them as given)")

    # 1. features, every dataset before any training: a bad root or checkpoint stops the run early. With
    # tune_epochs, one store per training protocol, from encoders tuned on the rows that protocol keeps.
    stores = []
    os.makedirs(str(cache), exist_ok=True)
    for (name, root), label in zip(pairs, labels):
        paths = {}  # training protocol (setting, test type) -> store; None: the one store for every run
        runs = protocols(train_rate, test_types) if tune_epochs else {None: (None, None)}
        for key, (rate, missing_type) in runs.items():
            encoders_here = settings
            if key is not None:
                encoders_here = tuned_encoders(cache, name, root, settings, rate, missing_type, test_rate, base,
                                               tune_epochs, workers, progress, label, log)
            path = cache_path(cache, name, root, encoders_here)
            cfg = ExtractConfig(dataset=name, root=root, out=path, batch_size=batch_size, workers=workers,
                                device=base.device, overwrite=overwrite, **encoders_here)
            log(f"{label}: features of {root} in {path}")
            report = extract(cfg, progress=progress, log=log)
            if report.skipped:
                log(f"{label}: reusing the finished store {path} (same encoders and data), no extraction")
            else:
                log(f"{label}: extracted {report.n_rows} rows in {report.seconds:.1f} s")
            paths[key] = (path, bool(report.skipped))
        stores.append((name, root, label, paths))

    # 2. the grid on each store.
    datasets = []
    for name, root, label, paths in stores:
        main_key = ("complete", test_types[0]) if tune_epochs else None  # the probe's and the row counts' store
        path = paths[main_key][0]
        data = load_dataset(path)
        data_for = {key: load_dataset(p) for key, (p, _) in paths.items() if key not in (None, main_key)}
        reused = all(r for _, r in paths.values())
        n_runs = len(SETTINGS) * len(test_types) * len(imputes) * len(seeds)
        test_labeled = int(labeled(data.task_type, data.splits["test"].labels).sum())
        if not test_labeled:
            log(f"{label}: warning: the test split of {root} has no labels (e.g. Hateful Memes' phase-1 "
                "test.jsonl; put the labeled test_seen.jsonl next to it), so its test metrics are n/a")
        log(f"{label}: {data.task_type}, training {n_runs} runs")
        try:
            grid = run_dataset(label, data, base, seeds=seeds, imputes=imputes, test_types=test_types,
                               test_rate=test_rate, train_rate=train_rate, data_for=data_for, jobs=jobs, log=log)
        except FitError as exc:
            raise FitError(f"{label}: {exc}") from exc
        datasets.append({"name": name, "label": label, "title": TITLES.get(name, name) if label == name else label,
                         "root": os.path.abspath(root), "store": path, "reused": reused, "task": data.task_type,
                         **({"stores": {f"{k[0]} {k[1]}": p for k, (p, _) in paths.items()}} if tune_epochs else {}),
                         "metrics": metric_names(data.task_type), "classes": len(data.classes),
                         "rows": grid["rows"], "test_labeled": test_labeled,
                         "scores": dataset_scores(grid, imputes, test_types), "grid": grid})

    report = {"schema": SCHEMA, "seeds": list(seeds), "test_rate": test_rate, "train_rate": train_rate,
              "imputes": list(imputes), "test_types": list(test_types), "settings": list(SETTINGS),
              "cache": os.path.abspath(str(cache)), "encoders": settings, "tune_epochs": tune_epochs,
              "fit": {k: v for k, v in vars(base).items() if k not in ("store", "val_store", "test_store")},
              "versions": {"torch": torch.__version__}, "datasets": datasets,
              "seconds": time.perf_counter() - started}
    report["markdown"] = format_markdown(report)
    if out is not None:
        write_report(out, "paper", report, "markdown", ".md")
    return report
