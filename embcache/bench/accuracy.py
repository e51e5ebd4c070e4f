"""`embcache bench accuracy`: does filling a missing modality with its prediction beat zeros and the mean?

For each dataset (a feature store, or a synthetic cache) and each training seed, the grid trains

    impute {predict, zero, mean} x training {complete (train rate 0), missing (train rate R, type = test type)}
                                  x test type {both, image, text}

and scores every run on the test split under the matching scenario (`missing-<type>` at the test rate) and
under `full`. Every run gets the same trainer (indicators, head, model selection): only the fill differs.
A linear probe (logistic regression on the concatenated standardised features, trained on the complete
training rows, L2 chosen on val) is the reference the trainer must match; it is scored with zero and mean
fill, and per presence pattern (one regression per pattern: no stand-in at all). A synthetic cache is run on
several draws of its data and summarised over them too, and knows its Bayes-optimal accuracy (the ceiling no
classifier beats). Results: a table (mean +- std over seeds, and over draws), a JSON file (the table's numbers per
cell and seed, and which test rows each run got right) and one figure.

Seeds are one source of noise, the test rows another, often the larger: each margin (predict - best baseline) and
the trainer-vs-probe difference get a 95 % interval from a paired bootstrap over the test rows (`paired_intervals`).

`labeled_fraction` < 1 keeps the labels of that fraction of the training rows only (`keep_labels`): the others stay
as unlabeled rows, whose pairs the predictors learn from and the classifiers cannot. That is the case of many
pairs and few labels, where a prediction carries what the labeled rows alone do not (docs/training.md).
"""
from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from embcache.bench import synthetic
from embcache.config import IMPUTE_MODES, FitConfig, FitError
from embcache.data import FeatureSet, SplitData, SplitTensors, dataset_from_features, labeled, load_dataset, masks_to
from embcache.evaluate import predict_split, scenario_metrics
from embcache.metrics import MAIN_METRIC, interval95, resample_rows, task_metrics
from embcache.missing import MISSING_TYPES, MODALITIES, scenario_present, unit_hash
from embcache.runtime import resolve_device, staged_file
from embcache.store import SPLIT_CODES
from embcache.train import fit_logistic, prepare, train

# 2: synthetic caches run per draw ("name@draw"), plus "over_draws"; 3: each run's right test rows, "intervals"
# (and, additive: a synthetic entry's "label_shared", `synthetic_facts`)
SCHEMA = "embcache.bench-accuracy/3"
SETTINGS = ("complete", "missing")
PROBE_L2 = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
# What the method must show on any set (`acceptance`): predict at most NEVER_HURTS below the best baseline in every
# scenario, and at least HELPS_MARGIN above it wherever its predictor's test R2 reaches HELPS_R2; predict's seed
# spread at most SPREAD_FACTOR times zero fill's; the trainer's full-pair score within PROBE_SLACK of the linear
# probe's (complete training, every impute mode).
NEVER_HURTS = 0.005
HELPS_R2 = 0.3
HELPS_MARGIN = 0.02
SPREAD_FACTOR = 2.0
PROBE_SLACK = 0.01
# The test set is a sample too: on a few hundred test rows one row is worth several tenths of a point, more than
# the seeds' spread. So each margin also gets a 95 % interval from a paired bootstrap over the test rows
# (`paired_intervals`): the same resampled rows for every run of a dataset, the mean over seeds kept.
BOOTSTRAP_RESAMPLES = 2000

# Synthetic caches (embcache/bench/synthetic.py), small enough for CI-sized runs. "predictable": the modalities share
# most of their latent, so the cross-modal R2 is high (~0.6); "weak": they share little (~0.1). Each is run on
# several draws (data seeds) of its config: the spread between draws is larger than the spread between training
# seeds (BENCHMARKS.md), so one draw cannot tell a change from luck. Twelve since stop 33: the first four, on
# which the trainer's defaults were chosen, gave predict twice the margin the eight after them did.
SYNTHETIC = {
    "synthetic-predictable": dict(n_train=1500, n_val=400, n_test=1000, d_image=64, d_text=48, n_classes=8,
                                  task_type="multiclass", shared_dim=12, private_dim=2, noise=0.5),
    "synthetic-weak": dict(n_train=1500, n_val=400, n_test=1000, d_image=64, d_text=48, n_classes=8,
                           task_type="multiclass", shared_dim=3, private_dim=12, noise=0.5),
}
SYNTHETIC_DRAWS = {"synthetic-predictable": (11, 21, 22, 23, 31, 32, 33, 34, 35, 36, 37, 38),
                   "synthetic-weak": (12, 24, 25, 26, 41, 42, 43, 44, 45, 46, 47, 48)}


def _check_synthetic(name: str) -> None:
    if name not in SYNTHETIC:
        raise ValueError(f"unknown synthetic cache {name!r}; choose from {sorted(SYNTHETIC)}")


def synthetic_dataset(name: str, draw: int) -> FeatureSet:
    """Draw `draw` (the data seed) of the built-in synthetic cache `name`."""
    _check_synthetic(name)
    return dataset_from_features(synthetic.make_features(**SYNTHETIC[name], seed=draw), f"synthetic:{name}@{draw}")


def synthetic_facts(name: str, draw: int, test_rate: float, test_types, missing_seed: int) -> dict:
    """What the generator of draw `draw` of the synthetic cache `name` knows and no classifier can: "bayes",
    {scenario: Bayes-optimal accuracy} on its test rows under `full` and each test type's scenario
    (`synthetic.bayes_accuracy`; None unless the cache is multiclass), and "label_shared", the label's share on
    the latent both modalities see (`synthetic.label_shared_share`)."""
    features = synthetic.make_features(**SYNTHETIC[name], seed=draw)
    facts = {"bayes": None, "label_shared": synthetic.label_shared_share(features)}
    if features.task_type == "multiclass":
        test = np.flatnonzero(features.split == SPLIT_CODES["test"])
        present = {m: features.present[m][test] for m in MODALITIES}
        facts["bayes"] = {scenario: synthetic.bayes_accuracy(
                              features, test, scenario_present(features.ids[test], present, scenario, test_rate,
                                                               missing_seed))
                          for scenario in ["full"] + [f"missing-{t}" for t in test_types]}
    return facts


def keep_labels(data: FeatureSet, fraction: float, seed: int) -> FeatureSet:
    """`data` with the labels of its training rows kept on a fraction of them (label -1 elsewhere), chosen by a
    hash of (seed, id) independent of the missing-modality protocol's: the same rows for every run."""
    if fraction >= 1.0:
        return data
    if data.task_type == "multilabel":
        raise FitError("--labeled-fraction needs a multiclass or binary task: a multilabel row has no "
                       "'unlabeled' value (its label vector is always used)")
    train = data.splits["train"]
    labels = np.where(unit_hash(train.ids, seed, salt="labels:") < fraction, train.labels, -1)
    return replace(data, splits={**data.splits, "train": replace(train, labels=labels)})


def resplit(data: FeatureSet, split: int) -> FeatureSet:
    """Partition `split` of the data's rows into train / val / test: 0 is the data's own; k >= 1 deals the same rows
    anew into splits of the same sizes, in the order of a hash of (k, id) (repeated hold-out: `bench accuracy
    --splits`). A row keeps its id, so the missing-modality protocol (a hash of seed and id) treats it alike
    wherever it lands."""
    if split == 0:
        return data
    names = ("train", "val", "test")
    parts = [data.splits[name] for name in names]
    if any(part.streamed for part in parts):
        raise FitError("--splits deals the rows of a store anew and needs them in memory; this store is streamed "
                       "(above --memory-budget-gb): run it with --splits 1")
    merged = SplitData(np.concatenate([p.ids for p in parts]),
                       {m: np.concatenate([p.emb[m] for p in parts]) for m in MODALITIES},
                       {m: np.concatenate([p.present[m] for p in parts]) for m in MODALITIES},
                       np.concatenate([p.labels for p in parts]),
                       np.concatenate([p.index for p in parts]) if all(p.index is not None for p in parts) else None)
    if merged.index is not None and len(set(data.sources.values())) == 1:  # one store: keep its row order
        merged = merged.rows(np.argsort(merged.index, kind="stable"))
    else:
        merged.index = None  # rows of several stores: their store rows are not one order
    rank = np.argsort(unit_hash(merged.ids, split, salt="split:"), kind="stable")
    edges = np.cumsum([0] + [len(p) for p in parts])
    splits = {}
    for name, lo, hi in zip(names, edges[:-1], edges[1:]):
        mask = np.zeros(len(merged), dtype=bool)
        mask[rank[lo:hi]] = True
        splits[name] = merged.rows(mask)
    return replace(data, splits=splits)


# ------------------------------------------------------------------------------------------------
# The linear probe
# ------------------------------------------------------------------------------------------------
def _standardized(data: FeatureSet, split: str, has: dict[str, np.ndarray], mean: dict, std: dict, fill: str,
                  device: torch.device) -> torch.Tensor:
    """[image, text] standardised by the train moments; absent parts replaced by zeros (raw) or the mean."""
    sp, parts = data.splits[split], []
    for m in MODALITIES:
        z = (torch.as_tensor(sp.emb[m], device=device) - mean[m]) / std[m]
        stand_in = -mean[m] / std[m] if fill == "zero" else torch.zeros_like(mean[m])
        parts.append(torch.where(torch.as_tensor(has[m], device=device).unsqueeze(1), z, stand_in))
    return torch.cat(parts, 1)


def _fit_logistic(x: torch.Tensor, y: torch.Tensor, task: str, n_out: int, l2: float) -> torch.nn.Linear:
    head = torch.nn.Linear(x.shape[1], n_out).to(x.device)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    fit_logistic(head, x, y, task, l2)
    return head


def _selected_logistic(x: torch.Tensor, y: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor, task: str,
                       n_out: int) -> tuple[float, torch.nn.Linear]:
    """(L2 weight, head): the logistic regression on (x, y) whose val main metric is best over PROBE_L2."""
    best = None
    for l2 in PROBE_L2:
        head = _fit_logistic(x, y, task, n_out, l2)
        with torch.no_grad():
            score = task_metrics(task, head(x_val), y_val)[MAIN_METRIC[task]]
        if best is None or (score is not None and (best[0] is None or score > best[0])):
            best = (score, l2, head)
    return best[1], best[2]


def linear_probe(data: FeatureSet, test_rate: float, missing_seed: int, device: torch.device) -> dict:
    """Logistic regressions on the complete training data; {l2, test: {fill: {scenario: metrics}}}.

    fills "zero" and "mean": one regression on [image, text] of the training pairs, absent parts filled.
    "per-pattern": one regression per presence pattern (that pair one; image alone on every training row with an
    image; text alone likewise), each test row scored by the one for what it has: no stand-in at all.
    """
    train = data.splits["train"]
    ok = labeled(data.task_type, train.labels)
    both = train.present["image"] & train.present["text"] & ok
    mean = {m: torch.as_tensor(train.emb[m][both].mean(0), device=device) for m in MODALITIES}
    std = {m: torch.as_tensor(train.emb[m][both].std(0), device=device).clamp(min=1e-6) for m in MODALITIES}

    def target(split, rows=None):
        y = torch.as_tensor(data.splits[split].labels if rows is None else data.splits[split].labels[rows],
                            device=device)
        return y.float() if data.task_type == "multilabel" else y.long()

    def rows(mask):
        return torch.as_tensor(mask, device=device)

    val = data.splits["val"]
    def fit(x, y, x_val, y_val):
        return _selected_logistic(x, y, x_val, y_val, data.task_type, data.n_outputs)

    l2, head = fit(_standardized(data, "train", train.present, mean, std, "mean", device)[rows(both)],
                   target("train", both), _standardized(data, "val", val.present, mean, std, "mean", device),
                   target("val"))  # L2 chosen on val, full pairs
    alone = {}  # modality -> its own regression, on every training row that has it (val: every row that has it)
    for m in MODALITIES:
        z = {s: (torch.as_tensor(data.splits[s].emb[m], device=device) - mean[m]) / std[m] for s in ("train", "val", "test")}
        has, val_has = train.present[m] & ok, val.present[m]
        alone[m] = (z["test"], fit(z["train"][rows(has)], target("train", has), z["val"][rows(val_has)],
                                   target("val", val_has))[1])
    test, result = data.splits["test"], {"l2": l2, "test": {}}
    if MAIN_METRIC[data.task_type] == "accuracy":  # full pairs: every fill scores the same
        full = _standardized(data, "test", test.present, mean, std, "mean", device)
        with torch.no_grad():
            result["correct"] = {"full": pack_correct(head(full), target("test"))}
    for scenario in ("full",) + tuple(f"missing-{t}" for t in MISSING_TYPES):
        has = scenario_present(test.ids, test.present, scenario, test_rate, missing_seed)
        with torch.no_grad():
            by_fill = {}
            for fill in ("zero", "mean"):
                by_fill[fill] = head(_standardized(data, "test", has, mean, std, fill, device))
                result["test"].setdefault(fill, {})[scenario] = task_metrics(data.task_type, by_fill[fill],
                                                                             target("test"))
            # per-pattern: pairs (and rows with neither) as the pair regression scored them; rows with only m get
            # m's own regression (written into the mean fill's logits, already scored)
            logits = by_fill["mean"]
            for m, other in zip(MODALITIES, MODALITIES[::-1]):
                only = rows(has[m] & ~has[other])
                logits[only] = alone[m][1](alone[m][0][only])
            result["test"].setdefault("per-pattern", {})[scenario] = task_metrics(data.task_type, logits,
                                                                                  target("test"))
    return result


# ------------------------------------------------------------------------------------------------
# The grid
# ------------------------------------------------------------------------------------------------
def run_cell(data: FeatureSet, cfg: FitConfig, device: torch.device, mean_models: dict | None = None) -> dict:
    """Train one configuration (no files written) and score it on val and test, every scenario. mean_models:
    `train`'s memo of mean-fill models, shared by the runs of one protocol on `data`."""
    prep = prepare(data, cfg, device)
    result = train(data, prep, cfg, progress=False, mean_models=mean_models)
    metrics = scenario_metrics(result.model, data, cfg, prep.resolved)
    cell = {"test": metrics["test"], "predictor": metrics["predictor"], "best_epoch": result.best_epoch,
            "seconds": result.seconds}
    if MAIN_METRIC[data.task_type] == "accuracy":  # what `paired_intervals` resamples
        test = data.splits["test"]
        tensors = SplitTensors.of(test, data.task_type, device)
        cell["correct"] = {}
        for scenario in ("full", f"missing-{cfg.test_missing_type}"):
            has = masks_to(scenario_present(test.ids, test.present, scenario, cfg.test_missing_rate,
                                            cfg.missing_seed), device)
            logits = predict_split(result.model, test, tensors, has, cfg.read_ahead)
            cell["correct"][scenario] = pack_correct(logits, tensors.y)
    return cell


def pack_correct(logits: torch.Tensor, y: torch.Tensor) -> str:
    """Which labeled rows the logits classify right, as hex-packed bits (row order kept; `unpack_correct`)."""
    keep = y >= 0
    right = (logits[keep].argmax(1) == y[keep]).cpu().numpy()
    return np.packbits(right).tobytes().hex()


def unpack_correct(packed: str, n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(bytes.fromhex(packed), dtype=np.uint8))[:n].astype(np.float64)


def run_protocol(data: FeatureSet, base: FitConfig, setting: str, test_type: str, seed: int, *, imputes=IMPUTE_MODES,
                 test_rate: float = 0.7, train_rate: float = 0.7) -> dict[str, dict]:
    """{impute: `run_cell`} for one training setting, test type and seed. Mean fill runs first: predict and zero
    runs hold the same mean-fill model (FitConfig.mean_fallback) and take it from `train`'s memo instead of
    training it again (a third less training, the same runs)."""
    device = resolve_device(base.device)
    mean_models: dict = {}
    cells = {}
    for impute in sorted(imputes, key=lambda mode: mode != "mean"):
        cfg = replace(base, impute=impute, seed=seed, test_missing_rate=test_rate, test_missing_type=test_type,
                      train_missing_type=test_type, train_missing_rate=0.0 if setting == "complete" else train_rate)
        cells[impute] = run_cell(data, cfg, device, mean_models)
    return cells


_JOB: dict = {}  # a --jobs worker's datasets and settings, set once by `_start_job`


def _start_job(threads: int, features: dict, kwargs: dict) -> None:
    torch.set_num_threads(threads)
    _JOB.update(features=features, kwargs=kwargs)


def _job(setting: str, test_type: str, seed: int) -> tuple:
    return setting, test_type, seed, run_protocol(_JOB["features"][setting, test_type], setting=setting,
                                                  test_type=test_type, seed=seed, **_JOB["kwargs"])


def run_protocols(features: dict, tasks: list[tuple], jobs: int, **kwargs):
    """Yield (setting, test type, seed, {impute: cell}) for each task, in order with jobs 1, else as the `jobs`
    worker processes (spawned, each with this process's torch thread count) finish them. features: (setting, test
    type) -> the FeatureSet those runs use. A run does not depend on the process it runs in: the same cells."""
    if jobs <= 1 or len(tasks) <= 1:
        for setting, test_type, seed in tasks:
            yield setting, test_type, seed, run_protocol(features[setting, test_type], setting=setting,
                                                         test_type=test_type, seed=seed, **kwargs)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    pool = ProcessPoolExecutor(min(jobs, len(tasks)), mp_context=multiprocessing.get_context("spawn"),
                               initializer=_start_job, initargs=(torch.get_num_threads(), features, kwargs))
    try:
        for future in as_completed([pool.submit(_job, *task) for task in tasks]):
            yield future.result()
    finally:  # on a failed run: stop at once, not after the queued ones
        pool.shutdown(wait=True, cancel_futures=True)


def run_dataset(name: str, data: FeatureSet, base: FitConfig, *, seeds: list[int], imputes=IMPUTE_MODES,
                test_types=MISSING_TYPES, test_rate: float = 0.7, train_rate: float = 0.7,
                labeled_fraction: float = 1.0, data_for: dict | None = None, jobs: int = 1, log=print) -> dict:
    """The grid on one dataset: {name, cells (one per setting, test type, impute mode, seed), probe, summary, ...}.

    data_for: (setting, test type) -> the features those runs train and test on instead of `data` (the same rows,
    extracted by encoders tuned under that training protocol: `bench accuracy --dataset --tune-epochs`); the probe
    and the row counts are `data`'s. jobs: worker processes training (setting, test type, seed) groups at once."""
    device = resolve_device(base.device)
    data = keep_labels(data, labeled_fraction, base.missing_seed)
    main = MAIN_METRIC[data.task_type]
    start = time.perf_counter()
    groups = [(setting, test_type) for setting in SETTINGS for test_type in test_types]
    features = {g: keep_labels(data_for[g], labeled_fraction, base.missing_seed) if data_for and g in data_for
                else data for g in groups}
    done: dict = {}
    for setting, test_type, seed, cells in run_protocols(
            features, [(*g, seed) for g in groups for seed in seeds], jobs, base=base, imputes=imputes,
            test_rate=test_rate, train_rate=train_rate):
        done[setting, test_type, seed] = cells
        if all((setting, test_type, s) in done for s in seeds):  # the group's last seed: its line
            scores = {imp: [done[setting, test_type, s][imp]["test"][f"missing-{test_type}"][main] for s in seeds]
                      for imp in imputes}
            log(f"  {name}: {setting} training, test type {test_type}: "
                + ", ".join(f"{imp} {_cell(_stats(values))}" for imp, values in scores.items()))
    cells = [{"setting": setting, "test_type": test_type, "impute": impute, "seed": seed,
              **done[setting, test_type, seed][impute]}
             for setting, test_type in groups for impute in imputes for seed in seeds]
    probe = linear_probe(data, test_rate, base.missing_seed, device)
    train = data.splits["train"]
    entry = {"name": name, "task": data.task_type, "metric": main, "classes": len(data.classes),
             "rows": {s: len(data.splits[s]) for s in ("train", "val", "test")},
             "train_paired": int((train.present["image"] & train.present["text"]).sum()),
             "train_labeled": int(labeled(data.task_type, train.labels).sum()), "labeled_fraction": labeled_fraction,
             "seeds": seeds, "test_rate": test_rate, "train_rate": train_rate, "cells": cells, "probe": probe,
             "summary": summarize(cells, probe, main, imputes, test_types), "seconds": time.perf_counter() - start,
             "test_labeled": int(labeled(data.task_type, data.splits["test"].labels).sum())}
    entry["intervals"] = paired_intervals([_resamples(entry)])
    return entry


def _stats(values) -> dict:
    values = np.asarray([v for v in values if v is not None], dtype=np.float64)
    return {"mean": float(values.mean()) if len(values) else None,
            "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0, "n": int(len(values))}


def summarize(cells: list[dict], probe: dict, main: str, imputes, test_types) -> dict:
    """{setting: {test_type: {impute: {scenario stats, full stats, r2}}}, probe: {...}} over seeds."""
    out: dict = {}
    for setting in SETTINGS:
        for test_type in test_types:
            for impute in imputes:
                group = [c for c in cells if (c["setting"], c["test_type"], c["impute"]) == (setting, test_type, impute)]
                if not group:
                    continue
                r2 = [np.mean([q["r2"] for q in c["predictor"].values() if q["r2"] is not None]) for c in group]
                out.setdefault(setting, {}).setdefault(test_type, {})[impute] = {
                    "missing": _stats([c["test"][f"missing-{test_type}"][main] for c in group]),
                    "full": _stats([c["test"]["full"][main] for c in group]),
                    "r2": _stats(r2) if impute == "predict" else None}
    out["probe"] = {fill: {scenario: values[main] for scenario, values in scores.items()}
                    for fill, scores in probe["test"].items()}
    return out


def _resamples(entry: dict, seed: int = 0, rows: np.ndarray | None = None) -> dict | None:
    """Bootstrap replicates of one dataset's margins: {(setting, test type): predict - best baseline,
    "trainer_vs_probe": lowest complete-training full score - the probe's}, each an array over
    BOOTSTRAP_RESAMPLES resamples of the test rows (the same rows for every run; mean over seeds per replicate),
    or over the given `rows` ((replicates, k) indices; one replicate of every row gives the margins themselves).
    None when the runs did not keep which rows they got right (a main metric other than accuracy)."""
    cells, n = entry["cells"], entry.get("test_labeled")
    if not n or not cells or any("correct" not in c for c in cells):
        return None
    rows = resample_rows(n, BOOTSTRAP_RESAMPLES, seed) if rows is None else rows

    def accuracy(setting, test_type, impute, scenario):  # (resamples,), mean over the seeds' runs
        runs = [unpack_correct(c["correct"][scenario], n) for c in cells
                if (c["setting"], c["test_type"], c["impute"]) == (setting, test_type, impute)]
        return np.mean(runs, axis=0)[rows].mean(1) if runs else None

    out = {}
    for setting in SETTINGS:
        for test_type in dict.fromkeys(c["test_type"] for c in cells):
            scenario = f"missing-{test_type}"
            by = {i: accuracy(setting, test_type, i, scenario) for i in IMPUTE_MODES}
            baselines = [v for i, v in by.items() if i != "predict" and v is not None]
            if by["predict"] is not None and baselines:
                out[(setting, test_type)] = by["predict"] - np.max(baselines, axis=0)
    first = next(c["test_type"] for c in cells)  # the test type `acceptance` reads full scores from
    full = [a for i in IMPUTE_MODES if (a := accuracy("complete", first, i, "full")) is not None]
    probe = (entry.get("probe") or {}).get("correct", {}).get("full")
    if full and probe:
        out["trainer_vs_probe"] = np.min(full, axis=0) - unpack_correct(probe, n)[rows].mean(1)
    return out


def paired_intervals(replicates: list[dict]) -> dict | None:
    """95 % intervals of the margins (`_resamples`), averaged over the given datasets (the draws of a synthetic
    cache; each resampled on its own): {margin: {setting: {test type: [lo, hi]}}, trainer_vs_probe: [lo, hi]}."""
    if not replicates or None in replicates:
        return None
    out: dict = {"margin": {}}
    for key in replicates[0]:
        lo, hi = interval95(np.mean([r[key] for r in replicates], axis=0))
        if key == "trainer_vs_probe":
            out[key] = [lo, hi]
        else:
            out["margin"].setdefault(key[0], {})[key[1]] = [lo, hi]
    return out


def pooled_margins(entries: list[dict]) -> dict | None:
    """The margins of several datasets pooled over their test rows, every row weighing the same (a margin of +0.01
    on 700 rows and of -0.01 on 300 pool to +0.004): {"rows": pooled test rows, "datasets": their names, "margin":
    {setting: {test type: {"value", "interval"}}}, "trainer_vs_probe": {"value", "interval"}} for the margins every
    entry has; the interval from resampling each dataset's rows on its own. None unless every entry kept which
    rows its runs got right (`_resamples`)."""
    points = [_resamples(e, rows=np.arange(e["test_labeled"])[None]) if e.get("test_labeled") else None
              for e in entries]
    replicates = [_resamples(e, seed=k) for k, e in enumerate(entries)]
    if not entries or None in points or None in replicates:
        return None
    n = np.array([e["test_labeled"] for e in entries], dtype=np.float64)
    weights = n / n.sum()
    out: dict = {"rows": int(n.sum()), "datasets": [e["name"] for e in entries], "margin": {}}
    for key in [k for k in points[0] if all(k in p for p in points)]:
        value = {"value": float(sum(w * p[key][0] for w, p in zip(weights, points))),
                 "interval": interval95(sum(w * r[key] for w, r in zip(weights, replicates)))}
        if key == "trainer_vs_probe":
            out[key] = value
        else:
            out["margin"].setdefault(key[0], {})[key[1]] = value
    return out


def over_draws(name: str, draws: list[dict], kind: str = "draws") -> dict:
    """One report entry for the draws of a synthetic cache (kind "draws") or the splits of a store ("splits"): each
    number is the mean ± std over draws of the per-draw mean over seeds; `margin` (predict - best baseline) is taken
    per draw, then averaged; `seed_std` is the mean over draws of the per-draw std over seeds."""
    first = draws[0]
    summary: dict = {}
    for setting in SETTINGS:
        for test_type, by_impute in first["summary"].get(setting, {}).items():
            out = summary.setdefault(setting, {}).setdefault(test_type, {})
            for impute in by_impute:
                per_draw = [d["summary"][setting][test_type][impute] for d in draws]
                out[impute] = {key: _stats([q[key]["mean"] for q in per_draw]) if per_draw[0][key] else None
                               for key in ("missing", "full", "r2")}
                out[impute]["seed_std"] = _stats([q["missing"]["std"] for q in per_draw])
            if "predict" in out and len(out) > 1:
                out["predict"]["margin"] = _stats([
                    d["summary"][setting][test_type]["predict"]["missing"]["mean"]
                    - max(q["missing"]["mean"] for i, q in d["summary"][setting][test_type].items() if i != "predict")
                    for d in draws])
    summary["probe"] = {fill: {scenario: float(np.mean([d["summary"]["probe"][fill][scenario] for d in draws]))
                               for scenario in scores}
                        for fill, scores in first["summary"]["probe"].items()}
    return {**{k: first[k] for k in ("task", "metric", "classes", "rows", "seeds", "test_rate", "train_rate",
                                       "labeled_fraction")},
            "name": name, "over": kind, "draws": [d["draw"] for d in draws], "summary": summary,
            "bayes": ({scenario: float(np.mean([d["bayes"][scenario] for d in draws])) for scenario in first["bayes"]}
                      if all(d.get("bayes") for d in draws) else None),
            **({"label_shared": _stats([d["label_shared"] for d in draws])} if all("label_shared" in d for d in draws)
               else {}),
            "intervals": paired_intervals([_resamples(d, seed=d["draw"]) for d in draws])}


def margin_of(by_impute: dict) -> float | None:
    """Predict - best baseline of one report cell ({impute: stats}): over draws the per-draw margins' mean, else the
    difference of the seed means; None without predict and a baseline."""
    if "predict" not in by_impute or len(by_impute) < 2:
        return None
    if "margin" in by_impute["predict"]:
        return by_impute["predict"]["margin"]["mean"]
    baselines = [q["missing"]["mean"] for i, q in by_impute.items() if i != "predict"]
    if None in baselines + [by_impute["predict"]["missing"]["mean"]]:
        return None
    return by_impute["predict"]["missing"]["mean"] - max(baselines)


def acceptance(ds: dict) -> dict:
    """The checks of NEVER_HURTS, SPREAD_FACTOR and PROBE_SLACK on one report entry (a dataset, or a synthetic cache
    over its draws, or a store over its splits: there the margins are the per-draw ones averaged, and the spread
    check compares the per-draw seed stds averaged). Each check: {ok, value, where, interval: the 95 % bootstrap
    interval of the difference it judges, or None}; a check is None when the entry lacks what it needs."""
    s, rows = ds["summary"], []
    intervals = ds.get("intervals") or {}
    for setting in SETTINGS:
        for test_type, by in s.get(setting, {}).items():
            if "predict" in by and len(by) > 1:
                interval = intervals.get("margin", {}).get(setting, {}).get(test_type)
                rows.append((f"{setting} missing-{test_type}", by, interval))
    margins = []  # (predict - best baseline, where, predictor r2, interval)
    for where, by, interval in rows:
        if (margin := margin_of(by)) is not None:
            margins.append((margin, where, (by["predict"].get("r2") or {}).get("mean"), interval))

    def check(margin, threshold):
        return {"ok": margin[0] >= threshold, "value": margin[0], "where": margin[1], "interval": margin[3]}

    never_hurts = check(min(margins, key=lambda m: m[0]), -NEVER_HURTS) if margins else None
    predictable = [m for m in margins if m[2] is not None and m[2] >= HELPS_R2]
    helps = check(min(predictable, key=lambda m: m[0]), HELPS_MARGIN) if predictable else None
    spread = None

    def seed_std(q):  # over draws: the mean of the draws' seed stds (reports before it existed have none)
        return q["seed_std"]["mean"] if "draws" in ds else q["missing"]["std"]

    if "draws" not in ds or all("seed_std" in by["predict"] for _, by, _ in rows):
        ratios = [(seed_std(by["predict"]), seed_std(by["zero"]), where, by) for where, by, _ in rows if "zero" in by]
        if ratios:
            p_std, z_std, where, by = max(ratios, key=lambda r: r[0] - SPREAD_FACTOR * r[1])
            spread = {"ok": p_std <= SPREAD_FACTOR * z_std, "value": [p_std, z_std], "where": where, "interval": None,
                      # not judged; printed beside zero fill's, which is often ~0 (one answer for every seed)
                      "mean_fill": seed_std(by["mean"]) if "mean" in by else None}
    probe, full = s["probe"]["mean"]["full"], next(iter(s.get("complete", {}).values()), {})
    scores = [(q["full"]["mean"], i) for i, q in full.items() if q["full"]["mean"] is not None]
    trainer = None
    if probe is not None and scores:
        low = min(scores)
        trainer = {"ok": low[0] >= probe - PROBE_SLACK, "value": [low[0], probe], "where": f"complete full, {low[1]}",
                   "interval": intervals.get("trainer_vs_probe")}
    return {"never_hurts": never_hurts, "helps": helps, "spread": spread, "trainer_vs_probe": trainer}


def format_acceptance(checks: dict) -> list[str]:
    """One line per check of `acceptance`."""
    claims = {"never_hurts": f"predict >= best baseline - {NEVER_HURTS} everywhere",
              "helps": f"predict >= best baseline + {HELPS_MARGIN} where its R2 >= {HELPS_R2}",
              "spread": f"predict's seed std <= {SPREAD_FACTOR:g} x zero fill's",
              "trainer_vs_probe": f"trainer full >= linear probe - {PROBE_SLACK}"}
    values = {"never_hurts": "worst {:+.3f}", "helps": "worst {:+.3f}", "spread": "worst {:.3f} vs {:.3f}",
              "trainer_vs_probe": "{:.3f} vs probe {:.3f}"}
    lines = []
    for key, claim in claims.items():
        if c := checks.get(key):
            value = values[key].format(*c["value"]) if isinstance(c["value"], list) else values[key].format(c["value"])
            if c.get("interval"):
                value += f", difference's 95 % interval over test rows {_interval(c['interval'])}"
            if c.get("mean_fill") is not None:
                value += f"; mean fill's {c['mean_fill']:.3f}"
            lines.append(f"  check: {claim}: {'yes' if c['ok'] else 'NO'} ({value}, {c['where']})")
    return lines


def _label_shared(share) -> str:
    """A synthetic cache's share of the label on the shared latent (`synthetic.label_shared_share`), for the
    table's header line: a number per draw, mean ± std over draws."""
    if share is None:
        return ""
    value = f"{share:.2f}" if isinstance(share, float) else f"{share['mean']:.2f} ± {share['std']:.2f}"
    return f"; label's share on the shared latent {value}"


def _interval(bounds) -> str:
    return f"[{bounds[0]:+.3f}, {bounds[1]:+.3f}]"


def _cell(stats: dict) -> str:
    return "n/a" if stats["mean"] is None else f"{stats['mean']:.3f} ± {stats['std']:.3f}"


def _num(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def format_report(report: dict) -> list[str]:
    """The table: per dataset (and per synthetic cache over its draws), rows (setting, test type), columns impute
    modes, cells mean ± std over seeds (over draws: of the per-draw means)."""
    lines = []
    for ds in report["datasets"] + report.get("over_draws", []):
        s, main = ds["summary"], ds["metric"]
        imputes = list(next(iter(s[SETTINGS[0]].values())))
        spread = (f"mean ± std over {ds.get('over', 'draws')} {ds['draws']} of the mean over seeds {ds['seeds']}"
                  if "draws" in ds else f"mean ± std over seeds {ds['seeds']}")
        lines.append(f"{ds['name']}: {ds['task']}, {ds['classes']} classes, rows train/val/test "
                     f"{ds['rows']['train']}/{ds['rows']['val']}/{ds['rows']['test']}"
                     + (f" (labels kept on {ds['labeled_fraction']:g} of the train rows)"
                        if ds.get("labeled_fraction", 1.0) < 1 else "") + f", test {main} at missing rate "
                     f"{ds['test_rate']}, {spread}" + _label_shared(ds.get("label_shared")))
        header = ["training", "test scenario"] + imputes + ["predict - best baseline [95 % interval]", "predictor r2"]
        rows = []
        for setting in SETTINGS:
            for test_type, by_impute in s.get(setting, {}).items():
                row = [setting if setting == "complete" else f"missing {ds['train_rate']}", f"missing-{test_type}"]
                row += [_cell(by_impute[i]["missing"]) for i in imputes]
                margin = margin_of(by_impute)
                row.append("" if margin is None else f"{margin:+.3f}")
                if margin is not None and "margin" in by_impute["predict"]:  # over draws: ± the std over draws
                    row[-1] += f" ± {by_impute['predict']['margin']['std']:.3f}"
                interval = ((ds.get("intervals") or {}).get("margin") or {}).get(setting, {}).get(test_type)
                if margin is not None and interval:
                    row[-1] += f" {_interval(interval)}"
                r2 = (by_impute.get("predict") or {}).get("r2")
                row.append(_num(r2["mean"]) if r2 else "")
                rows.append(row)
            by_impute = next(iter(s.get(setting, {}).values()), {})
            rows.append([setting if setting == "complete" else f"missing {ds['train_rate']}", "full"]
                        + [_cell(by_impute[i]["full"]) for i in imputes] + ["", ""])
        probe = s["probe"]
        rows.append(["linear probe", "full"] + [_num(probe["mean"]["full"])] + [""] * (len(imputes) + 1))
        for test_type in s.get(SETTINGS[0], {}):
            key = f"missing-{test_type}"
            rows.append(["linear probe", key] + [f"zero {_num(probe['zero'][key])}", f"mean {_num(probe['mean'][key])}",
                                                 f"per-pattern {_num(probe['per-pattern'][key])}"]
                        + [""] * (len(imputes) - 1))
        if bayes := ds.get("bayes"):  # a synthetic cache: the best any classifier can do on these test rows
            rows += [["Bayes-optimal", scenario, _num(value)] + [""] * (len(imputes) + 1)
                     for scenario, value in bayes.items()]
        widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
        lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header] + rows]
        lines += format_acceptance(ds.get("checks") or {})
        lines.append("")
    return lines


def _nan(value) -> float:
    return float("nan") if value is None else value


def plot_report(report: dict, path: str | Path) -> None:
    """One panel per (dataset, training setting): bars per test scenario for each impute mode, with the
    linear probe's best fill as a marker; error bars are the std over seeds. A synthetic cache run on several
    draws gets one row over its draws (error bars: the std over draws) instead of one per draw."""
    from matplotlib.figure import Figure

    from embcache.plots import save_figure

    grouped = {d["group"] for d in report.get("over_draws", [])}
    datasets = [d for d in report["datasets"] if d.get("group") not in grouped] + report.get("over_draws", [])
    fig = Figure(figsize=(11, 3.2 * len(datasets)))
    axes = fig.subplots(len(datasets), len(SETTINGS), squeeze=False)
    for row, ds in zip(axes, datasets):
        s = ds["summary"]
        for ax, setting in zip(row, SETTINGS):
            types = list(s.get(setting, {}))
            imputes = list(s[setting][types[0]]) if types else []
            width = 0.8 / max(1, len(imputes))
            for k, impute in enumerate(imputes):
                means = [_nan(s[setting][t][impute]["missing"]["mean"]) for t in types]
                stds = [s[setting][t][impute]["missing"]["std"] for t in types]
                ax.bar([i + (k - (len(imputes) - 1) / 2) * width for i in range(len(types))], means, width,
                       yerr=stds, capsize=3, label=impute)
            probe = [max(_nan(v[f"missing-{t}"]) for v in s["probe"].values()) for t in types]
            ax.plot(range(len(types)), probe, "k_", markersize=28, mew=2, label="linear probe (best variant)")
            markers = probe
            if bayes := ds.get("bayes"):  # a synthetic cache: the ceiling
                ceiling = [bayes[f"missing-{t}"] for t in types]
                ax.plot(range(len(types)), ceiling, "r_", markersize=28, mew=2, label="Bayes-optimal")
                markers = probe + ceiling
            ax.set_xticks(range(len(types)), [f"missing-{t}" for t in types])
            values = [v for v in [_nan(s[setting][t][i]["missing"]["mean"]) for t in types for i in imputes] + markers
                      if v == v]
            if values:
                ax.set_ylim(max(0.0, min(values) - 0.08), min(1.0, max(values) + 0.05))
            ax.set_ylabel(ds["metric"])
            labels = ds.get("labeled_fraction", 1.0)
            ax.set_title(f"{ds['name']}" + (f", labels on {labels:g} of train" if labels < 1 else "")
                         + f": {setting} training" + ("" if setting == "complete" else f" ({ds['train_rate']})"),
                         fontsize=10)
            ax.legend(fontsize=7, loc="lower right")
    save_figure(fig, path, dpi=100)


def run_bench(stores: list[str], synthetic_names: list[str], base: FitConfig, *, seeds: list[int],
              out: str | Path | None = None, test_rate: float = 0.7, train_rate: float = 0.7,
              test_types=MISSING_TYPES, draws: int | None = None, splits: int = 1, labeled_fraction: float = 1.0,
              jobs: int = 1, log=print) -> dict:
    """The grid on each store (on `splits` partitions of its rows: `resplit`) and on the first `draws` draws of each
    synthetic cache (default: all of them); jobs: worker processes (`run_dataset`)."""
    datasets = []
    loaded: dict = {}  # the store last read: a store's splits share one read, one store in memory at a time

    def load_store(url: str) -> FeatureSet:
        if url not in loaded:
            loaded.clear()
            loaded[url] = load_dataset(url)
        return loaded[url]

    sources = []  # (name, what varies between its entries or None, draw / split, load)
    for url in stores:
        name, load = Path(url.rstrip("/")).stem, lambda url=url: load_store(url)
        sources += ([(name, None, None, load)] if splits == 1 else
                    [(name, "splits", k, lambda load=load, k=k: resplit(load(), k)) for k in range(splits)])
    for name in synthetic_names:
        _check_synthetic(name)  # before any training starts
        sources += [(name, "draws", draw, lambda name=name, draw=draw: synthetic_dataset(name, draw))
                    for draw in SYNTHETIC_DRAWS[name][:draws]]
    for name, kind, draw, load in sources:
        label = name if kind is None else f"{name}@{draw}" if kind == "draws" else f"{name}@split{draw}"
        log(f"{label}: training {len(SETTINGS) * len(test_types) * len(IMPUTE_MODES) * len(seeds)} runs")
        entry = run_dataset(label, load(), base, seeds=seeds, test_rate=test_rate, train_rate=train_rate,
                            test_types=test_types, labeled_fraction=labeled_fraction, jobs=jobs, log=log)
        if kind is not None:
            entry = {**entry, "group": name, "draw": draw}
        if kind == "draws":
            entry.update(synthetic_facts(name, draw, test_rate, test_types, base.missing_seed))
        datasets.append(entry)
    groups = {(name, kind): None for name, kind, _, _ in sources if kind is not None}  # in order, once each
    over = [over_draws(f"{name} over {len(group)} {kind}", group, kind) | {"group": name} for name, kind in groups
            if len(group := [d for d in datasets if d.get("group") == name]) > 1]
    for entry in datasets + over:
        entry["checks"] = acceptance(entry)
    report = {"schema": SCHEMA, "config": {k: v for k, v in vars(base).items()
                                           if k not in ("store", "val_store", "test_store")},
              "versions": {"torch": torch.__version__}, "datasets": datasets, "over_draws": over}
    report["table"] = format_report(report)
    if out is not None:
        write_report(out, "accuracy", report, "table", ".txt", figure=plot_report)
    return report


def write_report(out: str | Path, stem: str, report: dict, text_key: str, text_suffix: str, figure=None) -> None:
    """OUT/<stem>.json (the report without its text lines), OUT/<stem><text_suffix> (those lines) and, given a
    `figure(report, file)` function, OUT/<stem>.png; each written atomically."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with staged_file(out / f"{stem}.json") as tmp, open(tmp, "w") as fh:
        json.dump({k: v for k, v in report.items() if k != text_key}, fh, indent=1)
    with staged_file(out / f"{stem}{text_suffix}") as tmp, open(tmp, "w") as fh:
        fh.write("\n".join(report[text_key]) + "\n")
    if figure is not None:
        with staged_file(out / f"{stem}.png") as tmp, open(tmp, "wb") as fh:
            figure(report, fh)
