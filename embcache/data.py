"""Data: a feature store's rows as train/val/test splits in memory (or streamed), and the checks on them.

`load_dataset` opens, reads and checks the store(s); `SplitTensors` puts a split's rows on the device.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from embcache.config import FitError
from embcache.missing import MODALITIES
from embcache.store import (SPLIT_CODES, CachedFeatures, FeatureStore, IncompleteStoreError, StoreError, chunks_done,
                            encoder_fingerprint, fingerprint_diff, open_store)
from embcache.stream import ReadAhead, split_blocks


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
class FeatureSet:
    """The embeddings a fit trains and scores on: one or more stores' rows as train / val / test splits (not
    `embcache.datasets.Dataset`, the raw samples a reader yields)."""

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
    """The dataset fingerprint (`FeatureSet.fingerprint`) of a store's current contents."""
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
                          loaded: dict[str, "Loaded"] | None = None) -> FeatureSet:
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
    return FeatureSet(features.task_type, list(features.classes), splits, fp, sources, dict(features.encoders),
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
                 log: Callable[[str], None] | None = None) -> FeatureSet:
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
