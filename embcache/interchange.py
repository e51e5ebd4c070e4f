"""Moving features in and out of the cache; the layouts are documented in docs/interchange.md.

- `export_features`: a finished store -> one HDF5 file that mirrors it array for array.
- `import_hdf5`: such a file -> the identical store.
- `import_npy` / `import_clip_retrieval`: embeddings computed elsewhere (.npy matrices, as clip-retrieval
  and similar CLIP tools write them) plus a CSV/JSONL metadata table -> a store `embcache fit` can train on.

Everything streams chunk by chunk (only ids, splits and labels are held whole), and every output is
written to `<out>.partial` and renamed at the end, so a failed run leaves no half-written output behind.
"""
from __future__ import annotations

import collections
import hashlib
import json
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np

from embcache import __version__
from embcache import datasets as ds
from embcache import store as st
from embcache.errors import EmbcacheError
from embcache.runtime import staged_dir, staged_file

# Absence reasons of imported stores (code = index). The metadata table says the modality is absent,
# or the embedding row is all zeros (what tools write for a missing input), or it holds NaN/inf.
IMPORT_REASONS = ("present", "missing_field", "zero_embedding", "nonfinite_embedding")
META_EXTENSIONS = (".csv", ".jsonl", ".ndjson", ".parquet")


class InterchangeError(EmbcacheError):
    """An input that cannot be imported or exported as asked; the message names the file and the problem."""


# ------------------------------------------------------------------------------------------------
# Atomic outputs
# ------------------------------------------------------------------------------------------------
@contextmanager
def staged_output(out: str, overwrite: bool, folder: bool) -> Iterator[str]:
    """Yield the path to write `out` at (a folder, or a file when not `folder`): a temporary one beside it,
    renamed onto `out` on success, removed on error (`runtime.staged_dir` / `staged_file`).

    A URL (`memory://`, `s3://`, ...) is written in place: there the store's own `complete` flag,
    set last, is what tells readers a store is finished.
    """
    if "://" in out:
        if not overwrite and st.read_meta(out) is not None:
            raise InterchangeError(f"{out} already holds an embcache store; pass --overwrite to replace it")
        yield out
        return
    if os.path.lexists(out) and not overwrite:
        raise InterchangeError(f"{out} already exists; pass --overwrite to replace it")
    with (staged_dir if folder else staged_file)(out) as tmp:
        yield str(tmp)


# ------------------------------------------------------------------------------------------------
# HDF5: export and import
# ------------------------------------------------------------------------------------------------
HIDDEN_ARRAYS = ("hidden", "hidden_mask")  # cached hidden states (`extract --cache-layers k`), where a group has them


def _array_paths(root, modalities: list[str]) -> list[str]:
    """The per-row arrays of a store (the hidden states too, where there are), in the order they are copied."""
    return ["ids", "split", "labels"] + [f"{m}/{a}" for m in modalities
                                         for a in ("emb", "present", "reason", *HIDDEN_ARRAYS)
                                         if a not in HIDDEN_ARRAYS or a in root[m]]


def export_features(store_url: str, to: str, *, overwrite: bool = False) -> dict:
    """Write a finished store to the HDF5 file `to`, one row chunk at a time; returns the store's meta."""
    fs = st.open_store(store_url)
    meta, n, rows = fs.meta, fs.n_rows, fs.meta["chunk_rows"]
    with staged_output(to, overwrite, folder=False) as tmp, h5py.File(tmp, "w") as h5:
        h5.attrs[st.ATTRS_KEY] = json.dumps(meta)
        for m in fs.modalities:
            group = h5.create_group(m)
            group.attrs["encoder"] = json.dumps(fs.encoder(m))
            group.attrs["reasons"] = json.dumps(fs.reasons(m))
        for path in _array_paths(fs.root, fs.modalities):
            src = fs.root[path]
            dtype = h5py.string_dtype("utf-8") if path == "ids" else src.dtype
            chunks = (min(rows, n),) + src.shape[1:] if n else None
            dst = h5.create_dataset(path, shape=src.shape, dtype=dtype, chunks=chunks)
            for start in range(0, n, rows):
                block = src[start:start + rows]
                dst[start:start + len(block)] = block.astype(object) if path == "ids" else block
    return meta


def _h5_json(obj, key: str, path: str):
    if key not in obj.attrs:
        raise InterchangeError(f"{path}: {obj.name} has no {key!r} attribute; not written by export-features?")
    return json.loads(obj.attrs[key])


def _h5_array(h5: h5py.File, name: str, shape: tuple, path: str) -> h5py.Dataset:
    """The dataset `name`, checked to have `shape`."""
    if not isinstance(h5.get(name), h5py.Dataset):
        raise InterchangeError(f"{path}: no {name!r} dataset")
    if h5[name].shape != shape:
        raise InterchangeError(f"{path}: {name} has shape {h5[name].shape}, expected {shape}")
    return h5[name]


def import_hdf5(path: str, out: str, *, overwrite: bool = False) -> dict:
    """Restore the store an `export_features` file holds (every array and attribute); returns its meta."""
    with h5py.File(path, "r") as h5:
        meta = _h5_json(h5, st.ATTRS_KEY, path)
        if meta.get("format") != st.FORMAT_VERSION:
            raise InterchangeError(f"{path}: cache format {meta.get('format')!r}; this embcache reads "
                                   f"format {st.FORMAT_VERSION}")
        if not meta.get("complete", False):
            raise InterchangeError(f"{path}: exported from an unfinished store (complete = false)")
        modalities, task = meta["modalities"], meta["task"]
        n = len(h5["ids"]) if "ids" in h5 else 0
        n_classes = len(task["classes"])
        ids = _h5_array(h5, "ids", (n,), path).asstr()[:]
        split = _h5_array(h5, "split", (n,), path)[:]
        labels = _h5_array(h5, "labels", (n, n_classes) if task["type"] == "multilabel" else (n,), path)[:]
        encoders = {m: _h5_json(h5[m], "encoder", path) for m in modalities if m in h5}
        reasons = {m: _h5_json(h5[m], "reasons", path) for m in encoders}
        hidden = {}  # modality -> (tokens, width, dtype, has a mask)
        for m, enc in encoders.items():
            for name, shape in (("emb", (n, enc["dim"])), ("present", (n,)), ("reason", (n,))):
                _h5_array(h5, f"{m}/{name}", shape, path)
            if "hidden" in h5[m]:
                states = h5[f"{m}/hidden"]
                if states.ndim != 3 or states.shape[0] != n:
                    raise InterchangeError(f"{path}: {m}/hidden has shape {states.shape}, expected ({n}, T, W)")
                if "hidden_mask" in h5[m]:
                    _h5_array(h5, f"{m}/hidden_mask", states.shape[:2], path)
                hidden[m] = (states.shape[1], states.shape[2], states.dtype.name, "hidden_mask" in h5[m])
            elif "hidden_mask" in h5[m]:
                raise InterchangeError(f"{path}: {m}/hidden_mask without {m}/hidden")
        if list(encoders) != modalities:
            raise InterchangeError(f"{path}: groups {list(encoders)} do not match modalities {modalities}")
        if meta["dataset"].get("n_rows") != n:
            raise InterchangeError(f"{path}: {n} rows but the metadata says {meta['dataset'].get('n_rows')}")
        with staged_output(out, overwrite, folder=True) as url:
            root = st.create_store(url, ids=list(ids), split=split, labels=labels, dataset=meta["dataset"],
                                   task=task, encoders=encoders, reasons=[], chunk_rows=meta.get("chunk_rows"),
                                   overwrite=True)
            created = dict(root.attrs[st.ATTRS_KEY])
            for m in modalities:
                root[m].attrs["reasons"] = reasons[m]
            for m, (tokens, width, dtype, with_mask) in hidden.items():
                st.create_hidden(root, m, tokens, width, dtype, with_mask=with_mask)
            _copy_rows(root, {m: h5[m] for m in modalities}, created)
            # Restore the exported attrs verbatim (keys a hand-made file lacks keep create_store's values).
            root.attrs[st.ATTRS_KEY] = {**created, **meta, "complete": True}
    return {**created, **meta}


def _copy_rows(root, groups: dict, meta: dict) -> None:
    """Copy emb/present/reason (and the hidden states) of each modality from `groups` (h5 groups) chunk by chunk."""
    for chunk in range(st.n_chunks(meta["dataset"]["n_rows"], meta["chunk_rows"])):
        start, stop = st.chunk_bounds(meta, chunk)
        for m, g in groups.items():
            st.write_rows(root, m, start, g["emb"][start:stop], g["present"][start:stop], g["reason"][start:stop])
            if "hidden" in g:
                st.write_hidden(root, m, start, g["hidden"][start:stop],
                                g["hidden_mask"][start:stop] if "hidden_mask" in g else None)
        st.mark_chunk_done(root, chunk)


# ------------------------------------------------------------------------------------------------
# .npy embeddings + a metadata table
# ------------------------------------------------------------------------------------------------
class _Rows:
    """Several .npy matrices (memory-mapped) read as one, concatenated in order."""

    def __init__(self, paths: list[str]):
        self.paths = [str(p) for p in paths]
        self.parts = []
        for p in self.paths:
            try:
                part = np.load(p, mmap_mode="r")
            except (OSError, ValueError) as exc:
                raise InterchangeError(f"{p}: not a readable .npy file ({exc})") from exc
            if part.ndim != 2 or part.dtype.kind not in "fiu":
                raise InterchangeError(f"{p}: expected a 2-D numeric matrix, got shape {part.shape} {part.dtype}")
            self.parts.append(part)
        dims = {part.shape[1] for part in self.parts}
        if len(dims) != 1:
            raise InterchangeError(f"{', '.join(self.paths)}: the parts have different widths {sorted(dims)}")
        self.dim = dims.pop()
        self.offsets = np.cumsum([0] + [len(part) for part in self.parts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def counts(self) -> str:
        return ", ".join(f"{p}: {len(part)}" for p, part in zip(self.paths, self.parts))

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of the concatenation, as float32."""
        out = []
        for part, lo in zip(self.parts, self.offsets):
            a, b = max(start - lo, 0), min(stop - lo, len(part))
            if a < b:
                out.append(np.asarray(part[a:b], dtype=np.float32))
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    def sha256(self) -> str:
        """sha256 of the files' bytes, in order (one file: that file's sha256)."""
        digest = hashlib.sha256()
        for p in self.paths:
            with open(p, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
        return digest.hexdigest()


def _read_table(path: str) -> list[dict]:
    """The records of one CSV (with a header), JSONL or (with pyarrow installed) parquet file."""
    ext = os.path.splitext(path)[1].lower()
    if ext == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise InterchangeError(f"{path}: reading parquet needs pyarrow, which is not installed; convert the "
                                   "table to CSV or JSONL (e.g. pandas.read_parquet(p).to_csv(...)) and pass "
                                   "it with --metadata") from None
        return pq.read_table(path).to_pylist()
    try:
        if ext == ".csv":
            return [record for _, record in ds.iter_csv_records(path, required=())]
        if ext in (".jsonl", ".ndjson"):
            return [record for _, record in ds.iter_jsonl(path)]
    except ds.DatasetError as exc:
        raise InterchangeError(str(exc)) from exc
    raise InterchangeError(f"{path}: unsupported metadata type {ext!r} (expected {', '.join(META_EXTENSIONS)})")


def _flag(value, where: str) -> bool:
    """A has_image/has_text cell; empty means "not said" (True: the embedding decides)."""
    text = str(value).strip().lower() if value is not None else ""
    if text in ("", "1", "true", "yes", "1.0"):
        return True
    if text in ("0", "false", "no", "0.0"):
        return False
    raise InterchangeError(f"{where}: {value!r} is not a boolean (use 1/0 or true/false)")


def _blank(value) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value)) or str(value).strip() == ""


def read_metadata(paths: list[str], *, task: str | None = None, classes: list[str] | None = None,
                  val_fraction: float = 0.0, seed: int = 0) -> dict:
    """Ids, splits, labels, task, classes and given presence from metadata tables (concatenated in order).

    Columns: `id` (else `key`, else `image_path`); `label` or `labels` (JSON list or `|`-separated);
    optional `split` (train/val/dev/test; default train), `has_image`, `has_text`. Without `--task` the
    task is multilabel for a `labels` column, binary for 2 classes, else multiclass. `val_fraction` moves
    that share of the train rows to val, drawn from a hash of (seed, id).
    """
    records, origins = [], []
    for path in paths:
        table = _read_table(path)
        records += table
        origins += [f"{path} row {i + 1}" for i in range(len(table))]
    columns = set().union(*records) if records else set()
    id_key = next((k for k in ("id", "key", "image_path") if k in columns), None)
    if id_key is None:
        raise InterchangeError(f"{', '.join(paths)}: no id column (looked for id, key, image_path)")
    label_keys = [k for k in ("label", "labels") if k in columns]
    if len(label_keys) != 1:
        raise InterchangeError(f"{', '.join(paths)}: needs exactly one of the columns 'label' or 'labels' "
                               f"(columns: {sorted(columns)})")
    label_key = label_keys[0]
    task = task or ("multilabel" if label_key == "labels" else None)

    names = []
    for record, where in zip(records, origins):
        value = record.get(label_key)
        row = [] if _blank(value) else ds.label_names(value) if label_key == "labels" else [str(value).strip()]
        if task != "multilabel" and len(row) > 1:
            raise InterchangeError(f"{where}: {len(row)} labels {row} for a single-label task; use --task multilabel")
        names.append(row)
    classes = list(classes) if classes else sorted({c for row in names for c in row}, key=ds.class_sort_key)
    task = task or ("binary" if len(classes) == 2 else "multiclass")
    if task == "binary" and len(classes) != 2:
        raise InterchangeError(f"{', '.join(paths)}: a binary task needs 2 classes, found {classes}")

    problems = collections.Counter()
    lookup = ds.Labels(classes, problems)  # unknown names count as unknown_label, like the dataset readers
    if task == "multilabel":
        labels = np.zeros((len(records), len(classes)), np.uint8)
        for i, row in enumerate(names):
            labels[i, lookup.multi(row)] = 1
    else:
        labels = np.array([lookup.single(row[0] if row else None) for row in names], dtype=np.int64)

    ids, split, seen = [], [], {}
    for record, where in zip(records, origins):
        try:
            sample_id = ds.id_field(record.get(id_key), where)
            name = ds.split_field(record["split"], where) if "split" in columns else "train"
        except ds.DatasetError as exc:
            raise InterchangeError(str(exc)) from exc
        if sample_id in seen:
            raise InterchangeError(f"duplicate id {sample_id!r} at {seen[sample_id]} and {where}")
        seen[sample_id] = where
        if name == "train" and val_fraction > 0 and ds.in_val_split(sample_id, seed, val_fraction):
            name = "val"
        ids.append(sample_id)
        split.append(st.SPLIT_CODES[name])
    given = {m: np.array([_flag(r.get(f"has_{m}"), w) for r, w in zip(records, origins)], dtype=bool)
             for m in ("image", "text")}
    return {"ids": ids, "split": np.array(split, np.int8), "labels": labels, "task": task, "classes": classes,
            "given": given, "problems": problems}


def _source_name(paths: list[str]) -> str:
    """One file: its name; several parts: their folder's name."""
    return Path(paths[0]).name if len(paths) == 1 else Path(paths[0]).parent.name


def _presence(block: np.ndarray, given: np.ndarray, dtype: str, where: str) -> tuple:
    """(embeddings as stored, present, reason codes) of a block of float32 rows."""
    finite = np.isfinite(block).all(axis=1)
    reason = np.select([~given, ~finite, ~block.any(axis=1)], [1, 3, 2], 0).astype(np.uint8)  # IMPORT_REASONS
    present = reason == 0
    emb = np.where(present[:, None], block, 0)  # absent rows hold zeros
    if np.abs(emb).max(initial=0) > np.finfo(dtype).max:
        raise InterchangeError(f"{where}: values beyond the {dtype} range; use --dtype float32")
    return emb.astype(dtype), present, reason


def import_npy(out: str, *, image: list[str] = (), text: list[str] = (), metadata: list[str] = (),
               task: str | None = None, classes: list[str] | None = None, val_fraction: float = 0.0,
               seed: int = 0, image_model: str | None = None, text_model: str | None = None,
               dtype: str = "float16", chunk_rows: int | None = None, source: str | None = None,
               layout: str = "npy", overwrite: bool = False) -> dict:
    """Build a finished store from embedding matrices (each given as its ordered .npy parts) and metadata.

    Row i of the metadata describes row i of every matrix. A modality is absent in a row when the
    metadata's `has_<modality>` says so, or the embedding is all zeros or not finite. Returns the meta.
    """
    if not metadata:
        raise InterchangeError("no metadata table given")
    inputs = {m: _Rows(paths) for m, paths in (("image", image), ("text", text)) if paths}
    if not inputs:
        raise InterchangeError("no embeddings given: pass image and/or text .npy files")
    if dtype not in st.EMB_DTYPES:
        raise InterchangeError(f"dtype must be one of {st.EMB_DTYPES}, got {dtype!r}")
    table = read_metadata(list(metadata), task=task, classes=classes, val_fraction=val_fraction, seed=seed)
    n = len(table["ids"])
    for m, rows in inputs.items():
        if len(rows) != n:
            raise InterchangeError(f"row counts differ: the metadata ({', '.join(metadata)}) has {n} rows, the "
                                   f"{m} embeddings have {len(rows)} ({rows.counts()})")
    models = {"image": image_model, "text": text_model}
    encoders = {m: {"backend": "imported", "model": models[m] or _source_name(rows.paths),
                    "checkpoint_sha256": rows.sha256(), "bitfit_sha256": None, "preprocess": None,
                    "pooling": None, "dim": rows.dim, "dtype": dtype,
                    "versions": {"embcache": __version__}, "files": [os.path.abspath(p) for p in rows.paths]}
                for m, rows in inputs.items()}
    dataset = {"name": "imported", "source": os.path.abspath(source or metadata[0]), "layout": layout}
    problems = table["problems"]
    with staged_output(out, overwrite, folder=True) as url:
        root = st.create_store(url, ids=table["ids"], split=table["split"], labels=table["labels"],
                               dataset=dataset, task={"type": table["task"], "classes": table["classes"]},
                               encoders=encoders, reasons=list(IMPORT_REASONS), chunk_rows=chunk_rows,
                               overwrite=True)
        meta = dict(root.attrs[st.ATTRS_KEY])
        for chunk in range(st.n_chunks(n, meta["chunk_rows"])):
            start, stop = st.chunk_bounds(meta, chunk)
            for m, rows in inputs.items():
                emb, present, reason = _presence(rows.rows(start, stop), table["given"][m][start:stop], dtype,
                                                 f"{m} rows {start}-{stop} ({rows.counts()})")
                st.write_rows(root, m, start, emb, present, reason)
                problems.update(IMPORT_REASONS[r] for r in reason[reason > 0])
            st.mark_chunk_done(root, chunk)
        st.mark_complete(root, problems)
    return {**meta, "problems": dict(sorted(problems.items())), "complete": True}


def _numbered_parts(folder: Path, stem: str, extensions: tuple[str, ...]) -> list[str]:
    """`folder/<stem>_<i><ext>` for i = 0, 1, ... in numeric order; a gap in the numbers is an error."""
    pattern = re.compile(rf"{re.escape(stem)}_(\d+)({'|'.join(map(re.escape, extensions))})$")
    found = sorted((int(m.group(1)), p) for p in folder.glob(f"{stem}_*") if (m := pattern.match(p.name)))
    numbers = [i for i, _ in found]
    if numbers != list(range(len(numbers))):
        raise InterchangeError(f"{folder}: parts {stem}_{numbers} are not numbered 0..{len(numbers) - 1}")
    return [str(p) for _, p in found]


def clip_retrieval_inputs(folder: str, metadata: list[str] = ()) -> dict:
    """The files of a clip-retrieval output folder: `img_emb/img_emb_<i>.npy`, `text_emb/text_emb_<i>.npy`
    and `metadata/metadata_<i>.{csv,jsonl,parquet}` (unless `metadata` names the tables)."""
    root = Path(folder)
    found = {"image": _numbered_parts(root / "img_emb", "img_emb", (".npy",)),
             "text": _numbered_parts(root / "text_emb", "text_emb", (".npy",)),
             "metadata": list(metadata) or _numbered_parts(root / "metadata", "metadata", META_EXTENSIONS)}
    if not found["image"] and not found["text"]:
        raise InterchangeError(f"{folder}: no img_emb/img_emb_<i>.npy or text_emb/text_emb_<i>.npy files")
    if not found["metadata"]:
        raise InterchangeError(f"{folder}: no metadata/metadata_<i>.csv (or .jsonl) files; pass --metadata")
    return found


def import_clip_retrieval(folder: str, out: str, *, metadata: list[str] = (), **options) -> dict:
    """`import_npy` on the files of a clip-retrieval output folder (see `clip_retrieval_inputs`)."""
    return import_npy(out, **clip_retrieval_inputs(folder, metadata), source=folder, layout="clip-retrieval",
                      **options)
