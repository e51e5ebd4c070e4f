"""The feature cache: a Zarr v3 group whose layout is documented in docs/cache-format.md.

Writers create the whole layout up front (`create_store`), fill rows in
chunk-aligned blocks, and set `complete` last (`mark_complete`), so a reader
never mistakes a half-written store for a finished one. Readers go through
`open_store`, which checks the format version and the completion flag.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr

from embcache.errors import EmbcacheError

FORMAT_VERSION = 1
ATTRS_KEY = "embcache"
SPLITS = ("train", "val", "test")
SPLIT_CODES = {name: code for code, name in enumerate(SPLITS)}
TASK_TYPES = ("multilabel", "multiclass", "binary")
EMB_DTYPES = ("float16", "float32")
# Fields of an encoder's attrs that decide whether two extractions are interchangeable.
# `versions` is informative only: a library upgrade alone does not invalidate a cache.
FINGERPRINT_FIELDS = ("backend", "model", "checkpoint_sha256", "bitfit_sha256",
                      "preprocess", "pooling", "dim", "dtype")
# Fields that enter the fingerprint only when set (`cache_layers`: hidden states of the last k blocks are
# stored, `extract --cache-layers k`), so that stores and runs made without them keep their fingerprints.
OPTIONAL_FINGERPRINT_FIELDS = ("cache_layers",)


class StoreError(EmbcacheError):
    """A store that cannot be used as asked (wrong format, incomplete, fingerprint mismatch)."""


class IncompleteStoreError(StoreError):
    """A store whose extraction did not finish (attrs complete = false): resume it, or read it partially."""


def _open_group(url: str, mode: str, storage_options: dict | None = None) -> zarr.Group:
    """Open a local path or any fsspec URL (file://, memory://, s3://, gs://, ...)."""
    if url.startswith("file://") and not storage_options:
        storage_options = {"auto_mkdir": True}  # fsspec's local filesystem does not create folders by itself
    return zarr.open_group(url, mode=mode, storage_options=storage_options or None)


def local_path(url: str) -> str | None:
    """The filesystem path of a plain path or file:// URL; None for other fsspec URLs (remote stores)."""
    path = url[len("file://"):] if url.startswith("file://") else url
    return None if "://" in path else path


def _is_nonempty_local_dir(url: str) -> bool:
    path = local_path(url)
    return path is not None and os.path.isdir(path) and any(os.scandir(path))


def read_meta(url: str, storage_options: dict | None = None) -> dict | None:
    """The root `embcache` attrs of an existing store, or None when there is no store at `url`."""
    try:
        root = _open_group(url, "r", storage_options)
    except Exception:  # noqa: BLE001 - zarr raises several types for "not there"
        return None
    meta = root.attrs.get(ATTRS_KEY)
    return dict(meta) if isinstance(meta, dict) else None


def fingerprint(meta: dict, encoders: dict[str, dict]) -> dict:
    """What must match for an existing store to be reused by a new extraction."""
    return {
        "dataset": meta["dataset"]["name"],
        "options": meta["dataset"].get("options") or {},
        "n_rows": meta["dataset"]["n_rows"],
        "samples_sha256": meta["dataset"].get("samples_sha256"),
        "encoders": {m: encoder_fingerprint(enc) for m, enc in sorted(encoders.items())},
    }


def encoder_fingerprint(enc: dict) -> dict:
    """The fields of one encoder's attrs that decide whether two extractions are interchangeable."""
    fp = {k: enc.get(k) for k in FINGERPRINT_FIELDS}
    fp.update({k: enc[k] for k in OPTIONAL_FINGERPRINT_FIELDS if enc.get(k)})
    return fp


def fingerprint_diff(old: dict, new: dict) -> list[str]:
    """Human-readable list of the fields that differ between two fingerprints."""
    diffs = []
    for key in ("dataset", "options", "n_rows", "samples_sha256"):
        if old.get(key) != new.get(key):
            diffs.append(f"{key}: {old.get(key)!r} -> {new.get(key)!r}")
    old_enc, new_enc = old.get("encoders", {}), new.get("encoders", {})
    for m in sorted(set(old_enc) | set(new_enc)):
        for k in FINGERPRINT_FIELDS + OPTIONAL_FINGERPRINT_FIELDS:
            a, b = old_enc.get(m, {}).get(k), new_enc.get(m, {}).get(k)
            if a != b:
                diffs.append(f"{m}.{k}: {a!r} -> {b!r}")
    return diffs


def default_chunk_rows(dim: int, target_bytes: int = 4 << 20) -> int:
    """Rows per chunk so that one float16 embedding chunk is about `target_bytes`."""
    rows = max(256, target_bytes // max(1, 2 * dim))
    return 1 << int(math.log2(rows))


def create_store(url: str, *, ids: list[str], split: np.ndarray, labels: np.ndarray,
                 dataset: dict, task: dict, encoders: dict[str, dict],
                 reasons: list[str], chunk_rows: int | None = None,
                 overwrite: bool = False, storage_options: dict | None = None) -> zarr.Group:
    """Create the full layout with `complete = false` and write the per-row metadata.

    `encoders` maps modality -> encoder attrs (must include `dim` and `dtype`).
    `reasons` is the vocabulary of absence reasons; code 0 is always "present".
    """
    n = len(ids)
    existing = read_meta(url, storage_options)
    if not overwrite and existing is not None:
        raise StoreError(f"{url} already holds an embcache store; pass overwrite=True to replace it")
    if existing is None and _is_nonempty_local_dir(url):
        # Zarr's mode "w" empties the folder: never let that happen to something that is not a store.
        raise StoreError(f"{url} is a folder with other content, not an embcache store; choose another path")
    if task["type"] not in TASK_TYPES:
        raise StoreError(f"unknown task type {task['type']!r}; expected one of {TASK_TYPES}")
    dims = [enc["dim"] for enc in encoders.values()]
    chunk_rows = chunk_rows or default_chunk_rows(max(dims) if dims else 1)
    chunk_rows = max(1, min(chunk_rows, max(n, 1)))
    root = _open_group(url, "w", storage_options)  # mode "w" replaces whatever was there
    rows = (chunk_rows,)
    root.create_array("ids", shape=(n,), dtype=str, chunks=rows)[:] = np.asarray(ids, dtype=str)
    root.create_array("split", shape=(n,), dtype="int8", chunks=rows)[:] = split.astype(np.int8)
    if task["type"] == "multilabel":
        lab = root.create_array("labels", shape=(n, len(task["classes"])), dtype="uint8",
                                chunks=(chunk_rows, len(task["classes"])))
    else:
        lab = root.create_array("labels", shape=(n,), dtype="int64", chunks=rows, fill_value=-1)
    lab[:] = labels
    for modality, enc in encoders.items():
        if enc["dtype"] not in EMB_DTYPES:
            raise StoreError(f"embedding dtype must be one of {EMB_DTYPES}, got {enc['dtype']!r}")
        group = root.create_group(modality)
        group.create_array("emb", shape=(n, enc["dim"]), dtype=enc["dtype"],
                           chunks=(chunk_rows, enc["dim"]), fill_value=0)
        group.create_array("present", shape=(n,), dtype="bool", chunks=rows, fill_value=False)
        group.create_array("reason", shape=(n,), dtype="uint8", chunks=rows, fill_value=0)
        group.attrs["encoder"] = enc
        group.attrs["reasons"] = list(reasons)
    # The commit record: one flag per row chunk, each flag its own Zarr chunk, set only after every array's
    # rows of that chunk are written. Writers owning disjoint chunks never touch the same file.
    root.create_array("chunks_done", shape=(n_chunks(n, chunk_rows),), dtype="bool", chunks=(1,),
                      fill_value=False)
    meta = {
        "format": FORMAT_VERSION,
        "dataset": {**dataset, "n_rows": n},
        "task": task,
        "modalities": list(encoders),
        "chunk_rows": chunk_rows,
        "complete": False,
        "problems": {},
    }
    meta["fingerprint"] = fingerprint(meta, encoders)
    root.attrs[ATTRS_KEY] = meta
    return root


def n_chunks(n_rows: int, chunk_rows: int) -> int:
    return max(1, -(-n_rows // chunk_rows))


def chunk_bounds(meta: dict, chunk: int) -> tuple[int, int]:
    rows, n = meta["chunk_rows"], meta["dataset"]["n_rows"]
    return chunk * rows, min(n, (chunk + 1) * rows)


def mark_chunk_done(root: zarr.Group, chunk: int) -> None:
    root["chunks_done"][chunk] = True


def chunks_done(root: zarr.Group) -> np.ndarray:
    return np.asarray(root["chunks_done"][:], dtype=bool)


def write_rows(root: zarr.Group, modality: str, start: int, emb: np.ndarray,
               present: np.ndarray, reason: np.ndarray) -> None:
    """Write a block of rows of one modality. Blocks should be chunk-aligned (one writer per chunk)."""
    stop = start + len(emb)
    group = root[modality]
    group["emb"][start:stop] = emb.astype(group["emb"].dtype, copy=False)
    group["present"][start:stop] = present
    group["reason"][start:stop] = reason


def create_hidden(root: zarr.Group, modality: str, tokens: int, width: int, dtype: str,
                  with_mask: bool) -> None:
    """`<modality>/hidden` (N, T, W) chunked (chunk_rows, T, W), and for text `hidden_mask` (N, T) bool."""
    n, rows = root["ids"].shape[0], root.attrs[ATTRS_KEY]["chunk_rows"]
    group = root[modality]
    group.create_array("hidden", shape=(n, tokens, width), dtype=dtype, chunks=(rows, tokens, width), fill_value=0)
    if with_mask:
        group.create_array("hidden_mask", shape=(n, tokens), dtype="bool", chunks=(rows, tokens), fill_value=False)


def write_hidden(root: zarr.Group, modality: str, start: int, hidden: np.ndarray,
                 mask: np.ndarray | None) -> None:
    """Write a chunk-aligned block of hidden states (zeros beyond each row's real length)."""
    group = root[modality]
    group["hidden"][start:start + len(hidden)] = hidden.astype(group["hidden"].dtype, copy=False)
    if mask is not None and "hidden_mask" in group:
        group["hidden_mask"][start:start + len(hidden)] = mask


def mark_complete(root: zarr.Group, problems: dict[str, int], extra: dict | None = None) -> None:
    """Record the problem counts and flip `complete`; the last write of an extraction."""
    meta = dict(root.attrs[ATTRS_KEY])
    meta["problems"] = dict(sorted(problems.items()))
    meta.update(extra or {})
    meta["complete"] = True
    root.attrs[ATTRS_KEY] = meta


@dataclass
class FeatureStore:
    """Read access to a finished (or, if allowed, partial) cache."""

    url: str
    root: zarr.Group
    meta: dict

    @property
    def task_type(self) -> str:
        return self.meta["task"]["type"]

    @property
    def classes(self) -> list[str]:
        return list(self.meta["task"]["classes"])

    @property
    def modalities(self) -> list[str]:
        return list(self.meta["modalities"])

    @property
    def n_rows(self) -> int:
        return int(self.meta["dataset"]["n_rows"])

    def encoder(self, modality: str) -> dict:
        return dict(self.root[modality].attrs["encoder"])

    def reasons(self, modality: str) -> list[str]:
        return list(self.root[modality].attrs["reasons"])

    def ids(self) -> np.ndarray:
        return np.array([str(i) for i in self.root["ids"][:]], dtype=object)

    def split(self) -> np.ndarray:
        return np.asarray(self.root["split"][:], dtype=np.int8)

    def labels(self) -> np.ndarray:
        return np.asarray(self.root["labels"][:])

    def present(self, modality: str) -> np.ndarray:
        return np.asarray(self.root[modality]["present"][:], dtype=bool)

    def reason_codes(self, modality: str) -> np.ndarray:
        return np.asarray(self.root[modality]["reason"][:])

    def completed_rows(self) -> np.ndarray:
        """Rows whose chunk was fully written (all rows once `complete` is true)."""
        done = chunks_done(self.root)
        return np.repeat(done, self.meta["chunk_rows"])[: self.n_rows]

    def embeddings(self, modality: str, dtype=np.float32) -> np.ndarray:
        return np.asarray(self.root[modality]["emb"][:], dtype=dtype)

    def hidden_modalities(self) -> list[str]:
        """Modalities whose hidden states are cached (`extract --cache-layers k`)."""
        return [m for m in self.modalities if "hidden" in self.root[m]]

    def hidden(self, modality: str) -> tuple[np.ndarray, np.ndarray | None]:
        """(states (N, T, W) as stored, mask (N, T) or None); text is cut to the longest real sequence."""
        group = self.root[modality]
        if "hidden_mask" not in group:
            return np.asarray(group["hidden"][:]), None
        mask = np.asarray(group["hidden_mask"][:], dtype=bool)
        used = np.flatnonzero(mask.any(0))
        length = int(used[-1]) + 1 if len(used) else 1
        return np.asarray(group["hidden"][:, :length]), mask[:, :length]

    def load(self, hidden: bool = False) -> "CachedFeatures":
        """Everything in host memory, embeddings as float32. hidden: also the cached hidden states, as extra
        `emb` entries `<modality>/hidden` (stored dtype) and `<modality>/hidden_mask` (text)."""
        emb = {m: self.embeddings(m) for m in self.modalities}
        for m in self.hidden_modalities() if hidden else ():
            emb[f"{m}/hidden"], mask = self.hidden(m)
            if mask is not None:
                emb[f"{m}/hidden_mask"] = mask
        return CachedFeatures(
            ids=self.ids(), split=self.split(), labels=self.labels(),
            task_type=self.task_type, classes=self.classes,
            emb=emb,
            present={m: self.present(m) for m in self.modalities},
            encoders={m: self.encoder(m) for m in self.modalities},
            meta=self.meta,
        )


@dataclass
class CachedFeatures:
    ids: np.ndarray
    split: np.ndarray
    labels: np.ndarray
    task_type: str
    classes: list[str]
    emb: dict[str, np.ndarray]
    present: dict[str, np.ndarray]
    encoders: dict[str, dict]
    meta: dict = field(default_factory=dict)


def open_store(url: str, *, require_complete: bool = True, storage_options: dict | None = None,
               mode: str = "r") -> FeatureStore:
    """Open a cache (for reading; mode "r+" to resume writing); raises StoreError naming the problem."""
    try:
        root = _open_group(url, mode, storage_options)
    except Exception as exc:  # noqa: BLE001 - zarr raises several types for "not there"
        raise StoreError(f"{url}: not a readable Zarr store ({exc.__class__.__name__}: {exc})") from exc
    meta: Any = root.attrs.get(ATTRS_KEY)
    if not isinstance(meta, dict):
        raise StoreError(f"{url}: not an embcache store (no {ATTRS_KEY!r} attribute on the root group)")
    version = meta.get("format")
    if version != FORMAT_VERSION:
        raise StoreError(f"{url}: cache format {version!r} is not supported by this embcache "
                         f"(it reads format {FORMAT_VERSION})")
    if require_complete and not meta.get("complete", False):
        raise IncompleteStoreError(f"{url}: the extraction that wrote this store did not finish "
                         "(attrs complete = false); re-run `embcache extract` with the same arguments")
    return FeatureStore(url=url, root=root, meta=meta)
