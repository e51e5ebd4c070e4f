"""Data loading and checks, metrics, per-scenario evaluation, and loading a finished run.

`train.py` uses everything here; `embcache eval` uses `evaluate_run` and `format_table`.
The layout of metrics.json is documented in docs/metrics-format.md.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file

from embcache.missing import MODALITIES, SCENARIOS, scenario_present
from embcache.models import DIRECTIONS, FitConfig, FitError, FusionModel
from embcache.runtime import resolve_device
from embcache.store import (SPLIT_CODES, CachedFeatures, FeatureStore, IncompleteStoreError, StoreError, chunks_done,
                            encoder_fingerprint, fingerprint_diff, open_store)
from embcache.stream import ReadAhead, split_blocks

METRICS_SCHEMA = "embcache.metrics/1"
MAIN_METRIC = {"multilabel": "f1_macro", "multiclass": "accuracy", "binary": "auroc"}


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------
@dataclass
class SplitData:
    """One split: raw float32 embeddings in host memory (or, streamed, in `store`) and what the data has
    (before the protocol)."""

    ids: np.ndarray
    emb: dict[str, np.ndarray]
    present: dict[str, np.ndarray]
    labels: np.ndarray
    index: np.ndarray | None = None     # the store row of each row (ascending), when known
    store: FeatureStore | None = None   # streamed: `emb` is empty, rows `index` of this store hold them

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def streamed(self) -> bool:
        return self.store is not None

    def rows(self, mask: np.ndarray) -> "SplitData":
        return SplitData(self.ids[mask], {m: e[mask] for m, e in self.emb.items()},
                         {m: p[mask] for m, p in self.present.items()}, self.labels[mask],
                         None if self.index is None else self.index[mask], self.store)

    def blocks(self, read_ahead: int = 2):
        """Yield (positions, {modality: float32 array}) block by block: one store chunk at a time, read ahead in
        a background thread, for a streamed split; the whole split at once otherwise."""
        if not self.streamed:
            yield np.arange(len(self)), {m: self.emb[m] for m in MODALITIES}
            return
        start = 0
        for block in ReadAhead(self.store, split_blocks(self.index, int(self.store.meta["chunk_rows"])),
                               read_ahead):
            n = len(block[MODALITIES[0]])
            yield np.arange(start, start + n), block
            start += n


@dataclass
class Dataset:
    task_type: str
    classes: list[str]
    splits: dict[str, SplitData]        # train, val, test
    fingerprint: dict                   # encoders + task; a run refuses a store whose fingerprint differs
    sources: dict[str, str]             # split -> store url
    encoders: dict = field(default_factory=dict)  # modality -> the train store's encoder attrs
    chunk_rows: int | None = None       # rows per chunk of the train store (None: not from a store)
    partial: dict | None = None         # {url: {"rows": used, "of": all}} for partial stores (--allow-partial)

    @property
    def dims(self) -> dict[str, int]:
        train = self.splits["train"]
        if train.streamed:
            return {m: int(self.encoders[m]["dim"]) for m in MODALITIES}
        return {m: int(train.emb[m].shape[1]) for m in MODALITIES}

    @property
    def streamed(self) -> bool:
        return self.splits["train"].streamed

    @property
    def n_outputs(self) -> int:
        return len(self.classes)


def _fingerprint(features: CachedFeatures) -> dict:
    return {"task": features.task_type, "classes": list(features.classes),
            "encoders": {m: encoder_fingerprint(features.encoders[m]) for m in MODALITIES}}


def fingerprint_mismatch(recorded: dict, current: dict) -> list[str]:
    """The fields (`text.pooling: 'mean' -> 'cls'`, task, classes) in which two dataset fingerprints differ."""
    diffs = [f"{key}: {recorded.get(key)!r} -> {current.get(key)!r}" for key in ("task", "classes")
             if recorded.get(key) != current.get(key)]
    return diffs + fingerprint_diff({"encoders": recorded.get("encoders", {})},
                                    {"encoders": current.get("encoders", {})})


def store_fingerprint(fs: FeatureStore) -> dict:
    """The dataset fingerprint (`Dataset.fingerprint`) of a store's current contents."""
    return {"task": fs.task_type, "classes": list(fs.classes),
            "encoders": {m: encoder_fingerprint(fs.encoder(m)) for m in fs.modalities}}


def check_features(features: CachedFeatures, url: str, streamed: bool = False) -> None:
    """Raise FitError naming the first thing in a loaded cache that training cannot use.

    streamed: `emb` holds the store's Zarr arrays, not loaded; their values are checked (`check_finite`)
    when `fit` first reads them, before training.
    """
    missing = [m for m in MODALITIES if m not in features.emb]
    if missing:
        raise FitError(f"{url}: no {', '.join(missing)} group; fit needs both modalities {MODALITIES}")
    n = len(features.ids)
    recorded = (features.meta.get("fingerprint") or {}).get("encoders")
    if recorded is not None:  # the root fingerprint must describe the groups' encoders
        diffs = fingerprint_diff({"encoders": recorded},
                                 {"encoders": _fingerprint(features)["encoders"]})
        if diffs:
            raise FitError(f"{url}: the store's fingerprint does not match its encoders: {'; '.join(diffs)}")
    for m in MODALITIES:
        emb, present = features.emb[m], features.present[m]
        dim = features.encoders[m].get("dim")
        rows = emb.shape[0] if streamed else n
        if emb.ndim != 2 or emb.shape[0] != rows or (dim is not None and emb.shape[1] != dim):
            raise FitError(f"{url}: {m}/emb has shape {emb.shape}, expected ({n}, {dim})")
        if not streamed:
            check_finite(url, m, emb, present, features.ids)
    if not np.isin(features.split, list(SPLIT_CODES.values())).all():
        raise FitError(f"{url}: split holds values other than 0/1/2 (train/val/test)")
    labels, n_classes = features.labels, len(features.classes)
    if features.task_type == "multilabel":
        if labels.ndim != 2 or labels.shape[1] != n_classes:
            raise FitError(f"{url}: multilabel labels have shape {labels.shape}, expected ({n}, {n_classes})")
        if not np.isin(labels, (0, 1)).all():
            raise FitError(f"{url}: multilabel labels hold values other than 0 and 1")
    else:
        if features.task_type == "binary" and n_classes != 2:
            raise FitError(f"{url}: a binary task needs 2 classes, the store lists {n_classes}")
        if labels.ndim != 1:
            raise FitError(f"{url}: {features.task_type} labels have shape {labels.shape}, expected ({n},)")
        out_of_range = (labels < -1) | (labels >= n_classes)
        if out_of_range.any():
            raise FitError(f"{url}: {int(out_of_range.sum())} labels are out of range "
                           f"(allowed -1 = unlabeled and 0..{n_classes - 1}); e.g. {int(labels[out_of_range][0])} "
                           f"for id {features.ids[np.flatnonzero(out_of_range)[0]]!r}")


def check_finite(url: str, m: str, emb: np.ndarray, present: np.ndarray, ids: np.ndarray) -> None:
    bad = present & ~np.isfinite(emb).all(axis=1)
    if bad.any():
        first = ids[np.flatnonzero(bad)[0]]
        raise FitError(f"{url}: {int(bad.sum())} rows of {m}/emb hold NaN or inf (first id {first!r}); "
                       "re-extract them or mark them absent")


def _split_data(features: CachedFeatures, mask: np.ndarray | None = None, index: np.ndarray | None = None,
                store: FeatureStore | None = None) -> SplitData:
    """index: the store row of each row of `features` (None: 0..n-1); store: streamed (emb not loaded)."""
    index = np.arange(len(features.ids)) if index is None else index
    whole = SplitData(features.ids, {} if store is not None else dict(features.emb),  # + hidden states (prompts)
                      {m: features.present[m] for m in MODALITIES}, features.labels, index, store)
    return whole if mask is None else whole.rows(mask)


def dataset_from_features(features: CachedFeatures, url: str,
                          extra: dict[str, tuple[CachedFeatures, str]] | None = None, *,
                          loaded: dict[str, "Loaded"] | None = None) -> Dataset:
    """Split a checked cache into train/val/test; `extra` maps 'val'/'test' to a whole separate store.

    loaded: url -> how `load_dataset` read it (store rows of a partial store, streaming).
    """
    loaded = loaded or {}
    main = loaded.get(url, Loaded())
    check_features(features, url, main.store is not None)
    fp = _fingerprint(features)
    splits, sources = {}, {}
    for name, code in SPLIT_CODES.items():
        if extra and name in extra:
            other, other_url = extra[name]
            how = loaded.get(other_url, Loaded())
            check_features(other, other_url, how.store is not None)
            diffs = fingerprint_mismatch(fp, _fingerprint(other))
            if diffs:
                raise FitError(f"{other_url} ({name}) was not made like {url}: {'; '.join(diffs)}")
            splits[name], sources[name] = _split_data(other, None, how.rows, how.store), other_url
        else:
            splits[name], sources[name] = _split_data(features, features.split == code, main.rows, main.store), url
    if len(splits["train"]) == 0:
        raise FitError(f"{url}: no training rows (split == 0)")
    chunk_rows = features.meta.get("chunk_rows")
    partial = {u: how.partial for u, how in loaded.items() if how.partial} or None
    return Dataset(features.task_type, list(features.classes), splits, fp, sources, dict(features.encoders),
                   int(chunk_rows) if chunk_rows else None, partial)


@dataclass
class Loaded:
    """How a store was read: `rows` its rows used (None: all), `store` set when streamed, `partial` counts."""

    rows: np.ndarray | None = None
    store: FeatureStore | None = None
    partial: dict | None = None


def open_features(url: str, allow_partial: bool = False) -> tuple[FeatureStore, np.ndarray | None, dict | None]:
    """(store, its rows to use or None for all, {"rows", "of", "chunks", "of_chunks"} when partial)."""
    try:
        fs = open_store(url, require_complete=not allow_partial)
    except StoreError as exc:  # a wrong format version, an unfinished extraction, not a store
        msg = str(exc)
        if isinstance(exc, IncompleteStoreError):
            msg += "; or pass --allow-partial to fit on the rows of its written chunks"
        raise FitError(msg) from exc
    if fs.meta.get("complete"):
        return fs, None, None
    done = fs.completed_rows()
    rows = np.flatnonzero(done)
    chunks = chunks_done(fs.root)
    info = {"rows": int(len(rows)), "of": fs.n_rows, "chunks": int(chunks.sum()), "of_chunks": int(len(chunks))}
    if len(rows) == 0:
        raise FitError(f"{url}: partial store with no written chunk yet; nothing to fit on")
    return fs, rows, info


def _subset(features: CachedFeatures, rows: np.ndarray, streamed: bool) -> CachedFeatures:
    return CachedFeatures(
        ids=features.ids[rows], split=features.split[rows], labels=features.labels[rows],
        task_type=features.task_type, classes=features.classes,
        emb=features.emb if streamed else {m: e[rows] for m, e in features.emb.items()},
        present={m: p[rows] for m, p in features.present.items()}, encoders=features.encoders, meta=features.meta)


def _load(url: str, hidden: bool = False, allow_partial: bool = False, stream: bool = False,
          log: Callable[[str], None] | None = None) -> tuple[CachedFeatures, Loaded]:
    fs, rows, partial = open_features(url, allow_partial)
    if stream:  # the per-row metadata only; emb are the Zarr arrays, read chunk by chunk later
        mods = fs.modalities
        features = CachedFeatures(ids=fs.ids(), split=fs.split(), labels=fs.labels(), task_type=fs.task_type,
                                  classes=fs.classes, emb={m: fs.root[m]["emb"] for m in mods},
                                  present={m: fs.present(m) for m in mods},
                                  encoders={m: fs.encoder(m) for m in mods}, meta=fs.meta)
    else:
        features = fs.load(hidden=hidden)
    if rows is not None:
        features = _subset(features, rows, stream)
        if log:
            log(f"{url}: partial store (--allow-partial): using the {partial['rows']} rows of its "
                f"{partial['chunks']} written chunks, of {partial['of']} rows in {partial['of_chunks']} chunks")
    return features, Loaded(rows, fs if stream else None, partial)


def load_dataset(store: str, val_store: str | None = None, test_store: str | None = None,
                 hidden: bool = False, *, allow_partial: bool = False, stream: bool = False,
                 log: Callable[[str], None] | None = None) -> Dataset:
    """Open, read and check the store(s); hidden: also the cached hidden states (`--predictor prompts`).

    allow_partial: accept unfinished stores, using only the rows of their written chunks.
    stream: load only the per-row metadata; the embeddings are read chunk by chunk when used.
    """
    loaded, extra = {}, {}
    for name, url in (("val", val_store), ("test", test_store)):
        if url:
            other, loaded[url] = _load(url, hidden, allow_partial, stream, log)
            extra[name] = (other, url)
    features, loaded[store] = _load(store, hidden, allow_partial, stream, log)
    return dataset_from_features(features, store, extra, loaded=loaded)


def dataset_bytes(store: str, val_store: str | None = None, test_store: str | None = None,
                  allow_partial: bool = False) -> int:
    """Bytes of float32 embeddings `load_dataset` would hold in memory (all rows used of every store)."""
    total = 0
    for url in dict.fromkeys(u for u in (store, val_store, test_store) if u):
        fs, rows, _ = open_features(url, allow_partial)
        n = fs.n_rows if rows is None else len(rows)
        total += 4 * n * sum(int(fs.encoder(m)["dim"]) for m in fs.modalities)
    return total


def labeled(task_type: str, labels: np.ndarray) -> np.ndarray:
    """Rows with a label (multilabel rows always have one; -1 means unlabeled otherwise)."""
    return np.ones(len(labels), dtype=bool) if task_type == "multilabel" else labels >= 0


# ------------------------------------------------------------------------------------------------
# Tensors on the device
# ------------------------------------------------------------------------------------------------
@dataclass
class SplitTensors:
    x: dict[str, torch.Tensor]          # raw embeddings (N, D_m), float32
    y: torch.Tensor                     # (N, C) float for multilabel, (N,) int64 otherwise

    @classmethod
    def of(cls, split: SplitData, task_type: str, device: torch.device) -> "SplitTensors":
        y = torch.as_tensor(split.labels, device=device)
        return cls({m: torch.as_tensor(e, device=device) for m, e in split.emb.items()},  # + hidden states
                   y.float() if task_type == "multilabel" else y.long())


def masks_to(present: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    return {m: torch.as_tensor(present[m], device=device) for m in MODALITIES}


@torch.no_grad()
def predict_logits(model: FusionModel, x: dict[str, torch.Tensor], has: dict[str, torch.Tensor],
                   chunk: int = 16384) -> torch.Tensor:
    was_training = model.training
    model.eval()
    n = len(next(iter(x.values())))
    out = [model({m: x[m][i:i + chunk] for m in x}, {m: has[m][i:i + chunk] for m in has}).logits
           for i in range(0, n, chunk)]
    model.train(was_training)
    if not out:  # an empty split
        return torch.zeros(0, model.classifier[-1].out_features, device=model.mean_image.device)
    return torch.cat(out)


@torch.no_grad()
def predict_split(model: FusionModel, split: SplitData, tensors: SplitTensors, has: dict[str, torch.Tensor],
                  read_ahead: int = 2) -> torch.Tensor:
    """predict_logits on a split, chunk by chunk from its store when it is streamed."""
    if not split.streamed:
        return predict_logits(model, tensors.x, has)
    device = tensors.y.device
    out = []
    for pos, block in split.blocks(read_ahead):
        idx = torch.as_tensor(pos, device=device)
        x = {m: torch.from_numpy(block[m]).to(device) for m in MODALITIES}
        out.append(predict_logits(model, x, {m: has[m][idx] for m in MODALITIES}))
    if not out:
        return torch.zeros(0, model.classifier[-1].out_features, device=device)
    return torch.cat(out)


# ------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------
def f1_scores(logits: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Multilabel F1 at sigmoid 0.5 (logit 0). A class with no positives and no predictions scores 0."""
    pred, truth = logits > 0, y > 0.5
    tp = (pred & truth).sum(0).double()
    wrong = (pred ^ truth).sum(0).double()  # false positives + false negatives
    per_class = torch.where(2 * tp + wrong > 0, 2 * tp / (2 * tp + wrong).clamp(min=1), torch.zeros_like(tp))
    micro = 2 * tp.sum() / (2 * tp.sum() + wrong.sum()).clamp(min=1)
    return {"f1_macro": per_class.mean().item(), "f1_micro": micro.item()}


def auroc(scores: torch.Tensor, y: torch.Tensor) -> float | None:
    """Area under the ROC curve (Mann-Whitney, ties count half); None when one class is absent."""
    pos = y == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    _, inverse, counts = torch.unique(scores.double(), return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    ranks = (ends - (counts.double() - 1) / 2)[inverse]  # average 1-based rank within ties
    return ((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)).item()


def metric_names(task_type: str) -> list[str]:
    return {"multilabel": ["f1_macro", "f1_micro"], "multiclass": ["accuracy"],
            "binary": ["auroc", "accuracy"]}[task_type]


def task_metrics(task_type: str, logits: torch.Tensor, y: torch.Tensor) -> dict[str, float | None]:
    """The task's metrics on the labeled rows; None when there are none (e.g. an unlabeled test file)."""
    if task_type != "multilabel":
        keep = y >= 0
        logits, y = logits[keep], y[keep]
    if len(y) == 0:
        return {name: None for name in metric_names(task_type)}
    if task_type == "multilabel":
        return f1_scores(logits, y)
    accuracy = (logits.argmax(1) == y).double().mean().item()
    if task_type == "multiclass":
        return {"accuracy": accuracy}
    return {"auroc": auroc(logits[:, 1] - logits[:, 0], y), "accuracy": accuracy}


def r2_score(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Fraction of the target's variance explained, pooled over dimensions.

    Both are in standardised coordinates (train std 1 per dimension), so every dimension counts about
    equally; the target's own mean is the baseline (a predictor of the mean scores about 0).
    """
    residual = ((target - pred) ** 2).sum()
    total = ((target - target.mean(0)) ** 2).sum()
    return (1 - residual / total.clamp(min=1e-12)).item()


# ------------------------------------------------------------------------------------------------
# Evaluation of a model
# ------------------------------------------------------------------------------------------------
def evaluate_scenarios(model: FusionModel, split: SplitData, tensors: SplitTensors, task_type: str,
                       rate: float, seed: int) -> dict[str, dict]:
    """{scenario: metrics} for full / missing-image / missing-text / missing-both at `rate`."""
    device = tensors.y.device
    results = {}
    for scenario in SCENARIOS:
        has = masks_to(scenario_present(split.ids, split.present, scenario, rate, seed), device)
        results[scenario] = task_metrics(task_type, predict_logits(model, tensors.x, has), tensors.y)
    return results


class PredictorQuality:
    """{direction: {cosine, r2}} over the rows with both modalities, accumulated block by block (float64 sums).

    For `zero` / `mean` imputation, the constant that stands in for the missing modality is scored.
    cosine: mean cosine similarity in raw embedding space; r2: `r2_score` in standardised space, pooled over
    the blocks (sum of squares about the mean = sum z^2 - (sum z)^2 / n).
    """

    def __init__(self, model: FusionModel):
        self.model = model
        self.acc = {name: {"n": 0, "cosine": 0.0, "residual": 0.0, "sum": 0.0, "sum2": 0.0} for name in DIRECTIONS}

    @torch.no_grad()
    def add(self, x: dict[str, torch.Tensor]) -> None:
        """x: raw embeddings of rows that have both modalities (and their hidden states, --predictor prompts)."""
        model = self.model
        n = len(x[MODALITIES[0]])
        if n == 0:
            return
        ones = {m: torch.ones(n, dtype=torch.bool, device=x[m].device) for m in MODALITIES}
        out = model(x, ones)
        for name, (src, dst) in DIRECTIONS.items():
            pred = model.fill(dst, out.pred.get(name), ones[src], name).expand_as(out.z[dst])
            # a zero vector has no direction (cosine 0); unstandardising would leave rounding noise instead
            raw = torch.zeros_like(x[dst]) if model.impute == "zero" else model.unstandardize(dst, pred)
            a, z = self.acc[name], out.z[dst].double()
            a["n"] += n
            a["cosine"] += torch.nn.functional.cosine_similarity(raw, x[dst], dim=1).double().sum().item()
            a["residual"] += ((z - pred.double()) ** 2).sum().item()
            a["sum"] = a["sum"] + z.sum(0)
            a["sum2"] = a["sum2"] + (z ** 2).sum(0)

    def result(self) -> dict[str, dict]:
        quality = {}
        for name, a in self.acc.items():
            if a["n"] == 0:
                quality[name] = {"cosine": None, "r2": None}
                continue
            total = (a["sum2"] - a["sum"] ** 2 / a["n"]).sum().item()
            quality[name] = {"cosine": a["cosine"] / a["n"], "r2": 1 - a["residual"] / max(total, 1e-12)}
        return quality


@torch.no_grad()
def predictor_quality(model: FusionModel, split: SplitData, tensors: SplitTensors) -> dict[str, dict]:
    """{direction: {cosine, r2}} on the rows where the data has both modalities (`PredictorQuality`)."""
    both = split.present["image"] & split.present["text"]
    idx = torch.as_tensor(np.flatnonzero(both), device=tensors.y.device)
    model.eval()
    quality = PredictorQuality(model)
    quality.add({k: t[idx] for k, t in tensors.x.items()})  # + hidden states (--predictor prompts)
    return quality.result()


@torch.no_grad()
def streamed_scenarios(model: FusionModel, split: SplitData, tensors: SplitTensors, task_type: str, rate: float,
                       seed: int, quality: bool, read_ahead: int = 2) -> tuple[dict, dict | None]:
    """evaluate_scenarios (and predictor_quality when `quality`) of a streamed split, in one pass over its
    chunks."""
    device = tensors.y.device
    masks = {sc: masks_to(scenario_present(split.ids, split.present, sc, rate, seed), device) for sc in SCENARIOS}
    logits: dict[str, list] = {sc: [] for sc in SCENARIOS}
    both = split.present["image"] & split.present["text"]
    scores = PredictorQuality(model)
    model.eval()
    for pos, block in split.blocks(read_ahead):
        idx = torch.as_tensor(pos, device=device)
        x = {m: torch.from_numpy(block[m]).to(device) for m in MODALITIES}
        for sc in SCENARIOS:
            logits[sc].append(predict_logits(model, x, {m: masks[sc][m][idx] for m in MODALITIES}))
        if quality:
            rows = torch.as_tensor(np.flatnonzero(both[pos]), device=device)
            scores.add({m: t[rows] for m, t in x.items()})
    results = {}
    for sc in SCENARIOS:
        cat = torch.cat(logits[sc]) if logits[sc] else torch.zeros(0, model.classifier[-1].out_features,
                                                                   device=device)
        results[sc] = task_metrics(task_type, cat, tensors.y)
    return results, scores.result() if quality else None


# ------------------------------------------------------------------------------------------------
# Finished runs
# ------------------------------------------------------------------------------------------------
def load_run(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[FitConfig, dict, FusionModel]:
    """(config, resolved settings, model with the best epoch's weights) of one seed's run folder."""
    run_dir = Path(run_dir)
    try:
        saved = json.loads((run_dir / "config.json").read_text())
    except FileNotFoundError as exc:
        raise FitError(f"{run_dir}: no config.json; is this an `embcache fit` run folder?") from exc
    cfg, resolved = FitConfig.from_dict(saved), saved["resolved"]
    model = FusionModel(resolved["dims"], resolved["n_outputs"], cfg)
    if resolved.get("predictors"):  # --predictor prompts: rebuild the blocks from the encoders' checkpoints
        from embcache.prompts import attach_prompt_predictors

        attach_prompt_predictors(model, resolved["prompt_encoders"], cfg)
    model.load_state_dict(load_file(str(run_dir / "model.safetensors")))
    return cfg, resolved, model.to(resolve_device(str(device)))


def seed_dirs(run_dir: str | Path) -> list[Path]:
    """The per-seed run folders of a run: itself (one seed) or its seed-* folders (--seeds)."""
    run_dir = Path(run_dir)
    if (run_dir / "model.safetensors").exists():
        return [run_dir]
    dirs = sorted((p for p in run_dir.glob("seed-*") if (p / "model.safetensors").exists()),
                  key=lambda p: int(p.name.split("-", 1)[1]))
    if not dirs:
        raise FitError(f"{run_dir}: neither a run (model.safetensors) nor a folder of seed-* runs")
    return dirs


def evaluate_run(run_dir: str | Path, *, store: str | None = None, rate: float | None = None,
                 device: str = "auto") -> dict:
    """Re-score a finished run (all seeds) under every scenario; same layout as its metrics.json."""
    results, loaded = [], {}
    for path in seed_dirs(run_dir):
        cfg, resolved, model = load_run(path, device)
        sources = (store or cfg.store, cfg.val_store, cfg.test_store)
        data = loaded[sources] = loaded.get(sources) or load_dataset(
            *sources, hidden=cfg.predictor == "prompts", allow_partial=cfg.allow_partial,
            stream=bool((resolved.get("data") or {}).get("streaming")))
        diffs = fingerprint_mismatch(resolved["fingerprint"], data.fingerprint)
        if diffs:
            raise FitError(f"{store or cfg.store}: not the features {path} was trained on (fingerprint differs: "
                           f"{'; '.join(diffs)})")
        results.append(scenario_metrics(model, data, cfg, resolved, rate=rate))
    return results[0] if len(results) == 1 else summarize(results)


def scenario_metrics(model: FusionModel, data: Dataset, cfg: FitConfig, resolved: dict,
                     rate: float | None = None) -> dict:
    """metrics.json for one trained model (docs/metrics-format.md)."""
    device = next(model.parameters()).device
    rate = cfg.test_missing_rate if rate is None else rate
    metrics = {
        "schema": METRICS_SCHEMA, "kind": "run", "task": data.task_type, "metric": MAIN_METRIC[data.task_type],
        "impute": cfg.impute, "seed": cfg.seed,
        "missing": {"seed": cfg.missing_seed, "test_rate": rate,
                    "train": {"rate": cfg.train_missing_rate, "type": cfg.train_missing_type}},
        "selection": resolved.get("selection", {}),
    }
    for name in ("val", "test"):
        split = data.splits[name]
        tensors = SplitTensors.of(split, data.task_type, device)
        if split.streamed:  # one pass over the split's chunks
            metrics[name], quality = streamed_scenarios(model, split, tensors, data.task_type, rate,
                                                        cfg.missing_seed, name == "test", cfg.read_ahead)
            if name == "test":
                metrics["predictor"] = quality
            continue
        metrics[name] = evaluate_scenarios(model, split, tensors, data.task_type, rate, cfg.missing_seed)
        if name == "test":
            metrics["predictor"] = predictor_quality(model, split, tensors)
    metrics["rows"] = {name: int(labeled(data.task_type, data.splits[name].labels).sum()) for name in ("val", "test")}
    metrics["rows"]["predictor"] = int((data.splits["test"].present["image"]
                                        & data.splits["test"].present["text"]).sum())
    return metrics


def summarize(runs: list[dict]) -> dict:
    """Mean and std (sample, ddof 1) over seeds of every number in `val`, `test` and `predictor`."""
    first = runs[0]

    def stat(fn, path):
        values = []
        for run in runs:
            value = run
            for key in path:
                value = value[key]
            values.append(value)
        return None if any(v is None for v in values) else fn(np.asarray(values, dtype=np.float64))

    def tree(fn):
        return {section: {group: {metric: stat(fn, (section, group, metric)) for metric in values}
                          for group, values in first[section].items()}
                for section in ("val", "test", "predictor")}

    mean = tree(np.mean)
    std = tree(lambda v: float(v.std(ddof=1)) if len(v) > 1 else 0.0)
    return {"schema": METRICS_SCHEMA, "kind": "summary", "task": first["task"], "metric": first["metric"],
            "impute": first["impute"], "seeds": [run["seed"] for run in runs],
            "runs": [f"seed-{run['seed']}" for run in runs], "missing": first["missing"],
            **{k: _floats(v) for k, v in mean.items()}, "std": _floats(std), "rows": first["rows"]}


def _floats(tree):
    """numpy scalars -> float, recursively (json.dump refuses np.float64 inside some containers)."""
    if isinstance(tree, dict):
        return {k: _floats(v) for k, v in tree.items()}
    return None if tree is None else float(tree)


def format_table(metrics: dict) -> str:
    """A plain-text table: one row per scenario, val main metric and every test metric."""
    main, std = metrics["metric"], metrics.get("std")
    names = list(metrics["test"]["full"])

    def cell(section, scenario, name):
        value = metrics[section][scenario][name]
        if value is None:
            return "n/a"
        text = f"{value:.4f}"
        return text + (f" ± {std[section][scenario][name]:.4f}" if std else "")

    header = ["scenario", f"val {main}"] + [f"test {name}" for name in names]
    rows = [[s, cell("val", s, main)] + [cell("test", s, n) for n in names] for s in SCENARIOS]
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in [header] + rows]
    seeds = f", seeds {metrics['seeds']}" if metrics["kind"] == "summary" else f", seed {metrics['seed']}"
    lines.insert(0, f"task {metrics['task']} ({main}), impute {metrics['impute']}, "
                    f"test missing rate {metrics['missing']['test_rate']}{seeds}")
    selection = metrics.get("selection") or {}
    if selection.get("best_epoch"):
        lines.append(f"best epoch {selection['best_epoch']}/{selection['epochs']} by val {selection['metric']} "
                     f"under {selection['scenario']}")
    for name, q in metrics["predictor"].items() if metrics.get("impute") == "predict" else ():
        if q["r2"] is not None:
            lines.append(f"predictor {name}: cosine {q['cosine']:.4f}, r2 {q['r2']:.4f} (test rows with both)")
    return "\n".join(lines)
