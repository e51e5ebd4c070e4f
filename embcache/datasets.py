"""Dataset readers: turn a dataset on disk into a list of :class:`Sample` rows.

Four formats are read (see ``docs``):

* ``mmimdb`` -- MM-IMDb: ``dataset/<id>.jpeg``, ``dataset/<id>.json`` and ``split.json``.
* ``food101`` -- UPMC Food-101: ``images/{train,test}/<class>/<file>.jpg`` and
  ``texts/{train,test}_titles.csv``; a validation split is carved from train.
* ``hateful_memes`` -- ``img/*.png`` and ``train.jsonl`` / ``dev*.jsonl`` / ``test*.jsonl``.
* ``manifest`` -- a generic JSONL or CSV manifest (``id, image, text, label|labels, split``).
* ``webdataset``, ``parquet``, ``hf`` -- tar shards, Parquet files, ``save_to_disk`` folders, local or fsspec
  URLs (:mod:`embcache.dataset_formats`; their images are references read lazily by the loader).

Readers only look at metadata and check that image files *exist*; decoding (and so
spotting truncated or undecodable images) is left to the extraction step.  What a
reader notices is recorded, never silently fixed:

* a modality that cannot be used is listed in ``Sample.absent`` with a reason, and
* every reason is counted in ``Dataset.problems``.

Malformed metadata (a missing required file, a JSON syntax error, a missing id,
a duplicate id, an invalid split name, ...) raises :class:`DatasetError` whose
message names the file, the line (or position) and the problem.

Text is read as bytes and decoded per field with ``surrogateescape``, so a field
holding bytes that are not valid UTF-8 marks only that sample's text as absent
(``non_utf8_text``) instead of failing the whole file.
"""

from __future__ import annotations

import collections
import csv
import hashlib
import importlib
import io
import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from embcache.errors import EmbcacheError

MODALITIES = ("image", "text")
SPLITS = ("train", "val", "test")

MMIMDB_GENRES = [
    "Drama", "Comedy", "Romance", "Thriller", "Crime", "Action", "Adventure", "Horror",
    "Documentary", "Mystery", "Sci-Fi", "Fantasy", "Family", "Biography", "War", "History",
    "Music", "Animation", "Musical", "Western", "Sport", "Short", "Film-Noir",
]
HATEFUL_MEMES_CLASSES = ["not_hateful", "hateful"]

# Reasons a modality is absent, and other problems a reader counts.
MISSING_FIELD = "missing_field"    # no image / text given in the metadata
MISSING_FILE = "missing_file"      # the image path does not exist
EMPTY_TEXT = "empty_text"          # text blank after stripping whitespace
NON_UTF8_TEXT = "non_utf8_text"    # text bytes are not valid UTF-8
UNKNOWN_LABEL = "unknown_label"    # a label name that is not one of the classes
DUPLICATE_ID = "duplicate_id"      # always fatal: raised, never counted
UNLISTED_IMAGE = "unlisted_image"  # food101: an image file no CSV row refers to

_SPLIT_ALIASES = {"train": "train", "val": "val", "dev": "val", "test": "test"}
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff")


class DatasetError(EmbcacheError):
    """Malformed metadata: the run must stop with this message (names the file, line and problem)."""


@dataclass
class Sample:
    """One row of a dataset.

    ``image`` is an absolute path, or a reference to image bytes inside a shard or table
    (``read()`` returns them, ``fingerprint()`` identifies them; :mod:`embcache.dataset_formats`),
    and ``text`` a stripped string, or ``None`` when that modality is absent; ``absent`` then
    maps the modality to the reason.  ``label`` is a
    class index (``-1`` = unlabeled or unknown) for single-label tasks and a sorted list
    of class indices for multilabel ones.
    """

    id: str
    image: Any
    text: str | None
    label: int | list[int]
    split: str
    absent: dict[str, str] = field(default_factory=dict)


@dataclass
class Dataset:
    """A dataset as read from disk: samples in a deterministic (file) order."""

    name: str
    source: str
    task: str
    classes: list[str]
    samples: list[Sample]
    problems: collections.Counter = field(default_factory=collections.Counter)


# --------------------------------------------------------------------------- file helpers


def _require_file(path: str, what: str) -> None:
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: required {what} not found")


def _require_dir(path: str, what: str) -> None:
    if not os.path.isdir(path):
        raise DatasetError(f"{path}: required {what} not found")


def _read_text(path: str) -> str:
    """Whole file as text; invalid UTF-8 bytes survive as lone surrogates (checked per field)."""
    with open(path, "rb") as f:
        text = f.read().decode("utf-8", errors="surrogateescape")
    return text[1:] if text.startswith("\ufeff") else text


def _parse_json(text: str, where: str, first_line: int = 1) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{where} line {first_line + e.lineno - 1}: invalid JSON ({e.msg})") from None


def _load_json(path: str, what: str) -> Any:
    _require_file(path, what)
    return _parse_json(_read_text(path), path)


def iter_jsonl(path: str) -> Iterator[tuple[int, dict]]:
    """Yield ``(line number, object)`` for each non-blank line of a JSON-lines file.

    Lines end at ``\n`` only (not ``str.splitlines``: raw U+2028 etc. may sit inside strings)."""
    _require_file(path, "JSON-lines file")
    for lineno, line in enumerate(_read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        record = _parse_json(line, path, lineno)
        if not isinstance(record, dict):
            raise DatasetError(f"{path} line {lineno}: expected a JSON object, got {type(record).__name__}")
        yield lineno, record


def _iter_csv(path: str) -> Iterator[tuple[int, list[str]]]:
    """Yield ``(first line number, cells)`` for each non-blank CSV record (quoted newlines allowed)."""
    _require_file(path, "CSV file")
    reader = csv.reader(io.StringIO(_read_text(path), newline=""))
    last_line = 0
    try:
        for row in reader:
            start, last_line = last_line + 1, reader.line_num
            if any(cell.strip() for cell in row):
                yield start, row
    except csv.Error as e:
        raise DatasetError(f"{path} line {reader.line_num}: invalid CSV ({e})") from None


def iter_csv_records(path: str, required: tuple[str, ...]) -> Iterator[tuple[int, dict]]:
    """CSV with a header row: yield ``(line number, {column: cell})``."""
    rows = _iter_csv(path)
    header_line, header = next(rows, (1, []))
    header = [name.strip() for name in header]
    for name in required:
        if name not in header:
            raise DatasetError(f"{path} line {header_line}: header has no {name!r} column (columns: {header})")
    for lineno, row in rows:
        if len(row) != len(header):
            raise DatasetError(f"{path} line {lineno}: expected {len(header)} fields, got {len(row)}")
        yield lineno, dict(zip(header, row))


def _is_utf8(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# --------------------------------------------------------------------------- field helpers


def _text_field(value: Any, *, empty: str = EMPTY_TEXT) -> tuple[str | None, str | None]:
    """Return ``(text, None)`` or ``(None, reason)``.

    ``empty`` is the reason for an exactly empty string: in CSV-like formats an empty
    cell means "not given" (``missing_field``); in JSON formats it is ``empty_text``.
    """
    if value is None:
        return None, MISSING_FIELD
    text = value if isinstance(value, str) else str(value)
    if not _is_utf8(text):
        return None, NON_UTF8_TEXT
    if text == "":
        return None, empty
    if not text.strip():
        return None, EMPTY_TEXT
    return text.strip(), None


def _image_field(base: str, value: Any) -> tuple[str | None, str | None]:
    """Resolve an image path against ``base``; return ``(absolute path, None)`` or ``(None, reason)``."""
    if value is None or not str(value).strip():
        return None, MISSING_FIELD
    path = os.path.abspath(os.path.join(base, str(value).strip()))
    return (path, None) if os.path.isfile(path) else (None, MISSING_FILE)


def split_field(value: Any, where: str) -> str:
    split = _SPLIT_ALIASES.get(str(value).strip().lower()) if value is not None else None
    if split is None:
        raise DatasetError(f"{where}: invalid split {value!r} (expected one of train, val, dev, test)")
    return split


def id_field(value: Any, where: str) -> str:
    sample_id = "" if value is None else str(value).strip()
    if not sample_id:
        raise DatasetError(f"{where}: missing id")
    if not _is_utf8(sample_id):
        raise DatasetError(f"{where}: id {sample_id!r} is not valid UTF-8")
    return sample_id


def class_sort_key(name: str) -> tuple:
    """Sort integer-like class names numerically, before the others sorted as strings."""
    stripped = name.strip()
    if stripped.lstrip("-").isdigit():
        return (0, int(stripped), name)
    return (1, 0, name)


def label_names(value: Any) -> list[str]:
    """A multilabel field: a list (JSON) or a ``|``-separated string (CSV); empty -> ``[]``."""
    if value is None:
        return []
    items = value if isinstance(value, list) else str(value).split("|")
    return [str(item).strip() for item in items if str(item).strip()]


class Labels:
    """Maps label names to class indices, counting names that are not classes."""

    def __init__(self, classes: list[str], problems: collections.Counter, *, ignore_unknown: bool = False):
        self.index = {name: i for i, name in enumerate(classes)}
        self.problems = problems
        self.ignore_unknown = ignore_unknown  # MM-IMDb: genres outside the 23 are dropped silently

    def _lookup(self, name: str) -> int:
        if name in self.index:
            return self.index[name]
        if not self.ignore_unknown:
            self.problems[UNKNOWN_LABEL] += 1
        return -1

    def single(self, value: Any) -> int:
        """Class index of one label; ``None``/empty -> ``-1`` (unlabeled, not a problem)."""
        if value is None or str(value).strip() == "":
            return -1
        return self._lookup(str(value).strip())

    def multi(self, names: list[str]) -> list[int]:
        """Sorted class indices of a label list, unknown names dropped."""
        return sorted({i for i in map(self._lookup, names) if i >= 0})


class _Collector:
    """Accumulates samples, enforces unique ids and counts problems."""

    def __init__(self) -> None:
        self.samples: list[Sample] = []
        self.problems: collections.Counter = collections.Counter()
        self._origins: dict[str, str] = {}

    def add(self, *, id: str, image: tuple, text: tuple, label, split: str, origin: str) -> None:
        """Add a sample; ``image`` and ``text`` are ``(value, reason)`` pairs from the field helpers."""
        if id in self._origins:
            raise DatasetError(f"{DUPLICATE_ID}: id {id!r} appears at {self._origins[id]} and again at {origin}")
        self._origins[id] = origin
        absent = {}
        for modality, (_, reason) in zip(MODALITIES, (image, text)):
            if reason is not None:
                absent[modality] = reason
                self.problems[reason] += 1
        self.samples.append(Sample(id=id, image=image[0], text=text[0], label=label, split=split, absent=absent))

    def dataset(self, name: str, source: str, task: str, classes: list[str]) -> Dataset:
        return Dataset(name=name, source=source, task=task, classes=list(classes),
                       samples=self.samples, problems=self.problems)


def in_val_split(sample_id: str, seed: int, fraction: float) -> bool:
    """Stable validation draw: depends only on (seed, id), never on iteration order."""
    digest = hashlib.sha256(f"{seed}\0{sample_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < fraction


# --------------------------------------------------------------------------- MM-IMDb


def _read_mmimdb(root: str) -> Dataset:
    """MM-IMDb: ``split.json`` lists ids per split (``dev`` -> val); ``dataset/<id>.json`` holds
    ``plot`` (a list of strings, joined with a space) and ``genres``.  Genres outside the 23 of
    :data:`MMIMDB_GENRES` are dropped silently, as in the protocol.  A listed id without its
    ``.json`` file is malformed metadata (raised); a missing ``.jpeg`` is ``missing_file``."""
    split_path = os.path.join(root, "split.json")
    split_lists = _load_json(split_path, "split file")
    if not isinstance(split_lists, dict):
        raise DatasetError(f"{split_path}: expected an object with train/dev/test id lists")
    data_dir = os.path.join(root, "dataset")
    out = _Collector()
    labels = Labels(MMIMDB_GENRES, out.problems, ignore_unknown=True)
    for key, split in (("train", "train"), ("dev", "val"), ("test", "test")):
        ids = split_lists.get(key, split_lists.get(split))
        if not isinstance(ids, list):
            raise DatasetError(f"{split_path}: missing or invalid {key!r} id list")
        for position, raw_id in enumerate(ids):
            origin = f"{split_path} {key}[{position}]"
            sample_id = id_field(raw_id, origin)
            meta_path = os.path.join(data_dir, f"{sample_id}.json")
            meta = _load_json(meta_path, f"metadata file for id {sample_id!r} ({origin})")
            if not isinstance(meta, dict):
                raise DatasetError(f"{meta_path}: expected a JSON object")
            plot = meta.get("plot")
            if isinstance(plot, list):
                plot = " ".join(str(part) for part in plot)
            genres = meta.get("genres")
            out.add(id=sample_id, split=split, origin=origin,
                    image=_image_field(data_dir, f"{sample_id}.jpeg"),
                    text=_text_field(plot),
                    label=labels.multi(genres if isinstance(genres, list) else []))
    return out.dataset("mmimdb", root, "multilabel", MMIMDB_GENRES)


# --------------------------------------------------------------------------- UPMC Food-101


def _food101_rows(csv_path: str, classes: set[str]) -> Iterator[tuple[int, str, str, str]]:
    """Yield ``(line, file name, text, class)``.  Rows are ``file, text, class``; cells between
    the first and the last are joined with commas (titles with unquoted commas).  The first
    row is a header when its file cell has no image extension and its class is not a class."""
    for n, (lineno, row) in enumerate(_iter_csv(csv_path)):
        if len(row) < 3:
            raise DatasetError(f"{csv_path} line {lineno}: expected 3 fields (image, text, class), got {len(row)}")
        file_name, text, cls = row[0].strip(), ",".join(row[1:-1]), row[-1].strip()
        if n == 0 and not file_name.lower().endswith(_IMAGE_EXTENSIONS) and cls not in classes:
            continue
        yield lineno, file_name, text, cls


def _food101_ids(rows: list[tuple[str, str, str]]) -> list[str]:
    """Ids for ``(split dir, class, file)`` rows: the file stem; a stem shared by several rows
    gets the class as prefix (``class/stem``), and also the split (``split/class/stem``) if
    still shared.  Rows that remain identical are left to the duplicate-id check."""
    stems = [os.path.splitext(f)[0] for _, _, f in rows]
    with_class = [f"{c}/{s}" for (_, c, _), s in zip(rows, stems)]
    stem_counts, class_counts = collections.Counter(stems), collections.Counter(with_class)
    return [s if stem_counts[s] == 1 else cs if class_counts[cs] == 1 else f"{d}/{cs}"
            for (d, _, _), s, cs in zip(rows, stems, with_class)]


def _subdirs(folder: str) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir()) if os.path.isdir(folder) else []


def _count_unlisted(folders: list[str], listed: set[str]) -> int:
    """Number of files in ``folders`` whose absolute path is not in ``listed``."""
    return sum(1 for folder in folders if os.path.isdir(folder)
               for entry in os.scandir(folder) if entry.is_file() and entry.path not in listed)


def _read_food101(root: str, *, val_fraction: float = 0.1, seed: int = 0) -> Dataset:
    """UPMC Food-101.  Classes are the sorted class folder names.  A validation split is taken
    from train by a stable hash of (seed, id) with probability ``val_fraction``, unless
    ``texts/val_titles.csv`` exists (then ``images/val/`` is used as given).  Image files that
    no CSV row refers to are counted as ``unlisted_image``."""
    if not 0.0 <= val_fraction <= 1.0:
        raise ValueError(f"val_fraction must be within [0, 1], got {val_fraction}")
    images_dir, texts_dir = os.path.join(root, "images"), os.path.join(root, "texts")
    _require_dir(os.path.join(images_dir, "train"), "image folder images/train")
    given_val = os.path.isfile(os.path.join(texts_dir, "val_titles.csv"))
    split_dirs = ["train", "val", "test"] if given_val else ["train", "test"]
    classes = sorted({c for d in split_dirs for c in _subdirs(os.path.join(images_dir, d))})

    rows, origins = [], []  # rows: (split dir, class, file name, text)
    for split_dir in split_dirs:
        csv_path = os.path.join(texts_dir, f"{split_dir}_titles.csv")
        for lineno, file_name, text, cls in _food101_rows(csv_path, set(classes)):
            rows.append((split_dir, cls, file_name, text))
            origins.append(f"{csv_path} line {lineno}")
    ids = _food101_ids([(d, c, f) for d, c, f, _ in rows])

    out = _Collector()
    labels = Labels(classes, out.problems)
    listed = set()
    for sample_id, (split_dir, cls, file_name, text), origin in zip(ids, rows, origins):
        carve = split_dir == "train" and not given_val and in_val_split(sample_id, seed, val_fraction)
        image = _image_field(os.path.join(images_dir, split_dir, cls), file_name)
        listed.add(image[0])
        out.add(id=sample_id, split="val" if carve else split_dir, origin=origin, image=image,
                text=_text_field(text, empty=MISSING_FIELD), label=labels.single(cls))

    unlisted = _count_unlisted([os.path.join(images_dir, d, c) for d in split_dirs for c in classes], listed)
    if unlisted:
        out.problems[UNLISTED_IMAGE] += unlisted
    return out.dataset("food101", root, "multiclass", classes)


# --------------------------------------------------------------------------- Hateful Memes

# Which file is read for each split, first existing wins.  test_seen.jsonl is the labeled
# release of the phase-1 test.jsonl (and dev_seen of dev.jsonl), so *_seen goes first.
_HATEFUL_MEMES_FILES = {
    "train": ("train.jsonl",),
    "val": ("dev_seen.jsonl", "dev.jsonl", "dev_unseen.jsonl"),
    "test": ("test_seen.jsonl", "test.jsonl", "test_unseen.jsonl"),
}


def _first_existing(root: str, names: tuple[str, ...]) -> str:
    for name in names:
        if os.path.isfile(os.path.join(root, name)):
            return os.path.join(root, name)
    raise DatasetError(f"{root}: none of the required files {', '.join(names)} found")


def _read_hateful_memes(root: str) -> Dataset:
    """Hateful Memes: one JSONL file per split (see ``_HATEFUL_MEMES_FILES`` for the choice
    between ``*_seen`` / plain / ``*_unseen``); ``img`` is relative to ``root``; a missing
    ``label`` (unlabeled test files) gives ``-1``; labels other than 0/1 are ``unknown_label``."""
    out = _Collector()
    labels = Labels(["0", "1"], out.problems)
    for split in SPLITS:
        path = _first_existing(root, _HATEFUL_MEMES_FILES[split])
        for lineno, record in iter_jsonl(path):
            origin = f"{path} line {lineno}"
            out.add(id=id_field(record.get("id"), origin), split=split, origin=origin,
                    image=_image_field(root, record.get("img")),
                    text=_text_field(record.get("text")),
                    label=labels.single(record.get("label")))
    return out.dataset("hateful_memes", root, "binary", HATEFUL_MEMES_CLASSES)


# --------------------------------------------------------------------------- generic manifest


def _manifest_records(path: str) -> Iterator[tuple[int, dict]]:
    ext = os.path.splitext(path)[1].lower()
    if ext in (".jsonl", ".ndjson"):
        return iter_jsonl(path)
    if ext == ".csv":
        return iter_csv_records(path, required=("id",))
    raise DatasetError(f"{path}: unsupported manifest type {ext!r} (expected .jsonl or .csv)")


def _read_manifest(path: str, *, classes: list[str] | None = None, default_split: str | None = None) -> Dataset:
    """Generic manifest (JSONL, or CSV with a header): ``id``, ``image`` (relative to the
    manifest's folder, or absolute), ``text``, ``label`` or ``labels`` (JSON list or
    ``|``-separated), ``split``.  An empty image/text field is ``missing_field``.  The task is
    multilabel when a ``labels`` field is used, else binary for 2 classes, else multiclass;
    classes are the sorted label names (integer-like names numerically) unless given.
    ``default_split`` fills rows without a split (e.g. new data for ``embcache predict``)."""
    records = list(_manifest_records(path))
    label_keys = {key for _, record in records for key in ("label", "labels") if key in record}
    if len(label_keys) == 2:
        raise DatasetError(f"{path}: uses both 'label' and 'labels' fields; use one")
    multilabel = label_keys == {"labels"}

    def names_of(record: dict) -> list[str]:
        if multilabel:
            return label_names(record.get("labels"))
        value = record.get("label")
        return [] if value is None or str(value).strip() == "" else [str(value).strip()]

    if classes is None:
        classes = sorted({name for _, record in records for name in names_of(record)}, key=class_sort_key)
    base = os.path.dirname(path)
    out = _Collector()
    labels = Labels(list(classes), out.problems)
    for lineno, record in records:
        origin = f"{path} line {lineno}"
        names = names_of(record)
        out.add(id=id_field(record.get("id"), origin),
                split=split_field(record.get("split") or default_split, origin), origin=origin,
                image=_image_field(base, record.get("image")),
                text=_text_field(record.get("text"), empty=MISSING_FIELD),
                label=labels.multi(names) if multilabel else labels.single(names[0] if names else None))
    task = "multilabel" if multilabel else ("binary" if len(classes) == 2 else "multiclass")
    return out.dataset("manifest", path, task, list(classes))


# --------------------------------------------------------------------------- entry point

_READERS: dict[str, Callable[..., Dataset]] = {
    "mmimdb": _read_mmimdb,
    "food101": _read_food101,
    "hateful_memes": _read_hateful_memes,
    "manifest": _read_manifest,
}


FORMAT_NAMES = ("webdataset", "parquet", "hf")  # tar shards, Parquet files, save_to_disk folders
# Readers that live in another module, by name: embcache.dataset_formats builds on this module (it imports it), so
# this module never imports it back; its FORMAT_READERS is looked up on the first use of one of these names.
_READER_MODULES = dict.fromkeys(FORMAT_NAMES, "embcache.dataset_formats")
DATASET_NAMES = (*_READERS, *_READER_MODULES)


def _reader(name: str) -> Callable[..., Dataset]:
    if name in _READERS:
        return _READERS[name]
    return importlib.import_module(_READER_MODULES[name]).FORMAT_READERS[name]


def open_dataset(name: str, root: str, **options) -> Dataset:
    """Read dataset ``name`` from ``root`` (for ``"manifest"``: the manifest file).

    Options: ``food101`` takes ``val_fraction`` (default 0.1) and ``seed`` (default 0);
    ``manifest`` takes ``classes`` (a list fixing the class order) and ``default_split``; the
    :data:`FORMAT_NAMES` readers take a ``root`` that may be a glob, a brace pattern or an
    fsspec URL, and the options of their functions.  Unknown options raise
    :class:`DatasetError`; malformed metadata raises :class:`DatasetError`.
    """
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASET_NAMES)}")
    if name in FORMAT_NAMES:
        pass  # URLs and patterns: the reader resolves and checks its root
    elif name == "manifest":
        root = os.path.abspath(root)
        _require_file(root, "manifest file")
    else:
        root = os.path.abspath(root)
        _require_dir(root, f"{name} dataset folder")
    try:
        return _reader(name)(root, **options)
    except TypeError as exc:  # an option this reader does not take
        raise DatasetError(f"{name}: {exc}".replace("_read_", "reader ")) from exc
