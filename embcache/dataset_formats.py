"""Readers for data at scale: WebDataset tar shards, Parquet files and `datasets.save_to_disk` folders.

Each reader makes one *index pass* over metadata only -- tar headers plus the small ``.txt`` / ``.json`` /
``.cls`` members, Parquet footers plus the id / text / label / split columns, Arrow message headers plus those
columns -- and returns the usual :class:`embcache.datasets.Dataset`.  Image bytes are never read there: each
present image is a small *reference* (:class:`TarMember`, :class:`ParquetCell`, :class:`ArrowCell`) that the
loader worker reads when it decodes the row (``read()``), through a per-process cache that keeps the last files
open and the last row group / record batch in memory.  Rows keep the file order, so the consecutive rows of a
chunk are consecutive members of one shard (or rows of one row group): extraction reads each shard forward and
never rescans it.  Memory: the index (ids, texts, labels, one reference per row) plus one batch of images.

Why stdlib ``tarfile`` over fsspec file objects and not the ``webdataset`` package: ``webdataset`` streams
shards from the start and yields decoded samples, while extraction needs random access by byte offset (a rank,
or a resumed run, starts at its own chunks) and an index that names the shard and member of every defect before
anything is written.  ``tarfile`` on a seekable fsspec file gives both: iterating headers seeks past member data,
and a member is one ``seek`` + ``read(size)``.  Shard lists (folders, globs, ``{00000..00099}`` ranges) take a
few lines here instead of a dependency.  Only uncompressed ``.tar`` shards are read (a compressed tar has no
random access), which is what img2dataset writes.

Rules shared by the three readers (docs/datasets.md): a missing image / text member or a null column value is
``missing_field``; an empty text ``empty_text``; image paths (instead of bytes) that do not exist
``missing_file``; labels outside the classes become ``-1`` (``unknown_label``); a missing label is ``-1``.  A
corrupt tar, a duplicate key within a split, a missing column or a split that cannot be told raise
:class:`DatasetError` naming the shard / file and the member / row.
"""
from __future__ import annotations

import collections
import json
import os
import posixpath
import re
import tarfile
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from embcache import datasets as ds
from embcache.datasets import DatasetError

DEFAULT_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_TEXT_MEMBER_EXTS = ("txt", "json", "cls")  # small members read in the index pass
_SPLIT_WORDS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "dev": "val", "test": "test"}


# --------------------------------------------------------------------------- files: local or fsspec URLs


@dataclass(frozen=True, slots=True)
class Shard:
    """One input file: ``url`` opens it (a local path or an fsspec URL), ``name`` is its path relative to the
    dataset root (messages, split names, the fingerprint), ``size`` its length in bytes."""

    url: str
    name: str
    size: int


def _fs(url: str):
    import fsspec

    return fsspec.core.url_to_fs(url)


def _open(url: str):
    """A seekable binary file: the builtin one for local paths, fsspec's (block-cached reads) for URLs."""
    if "://" not in url:
        return open(url, "rb")
    fs, path = _fs(url)
    return fs.open(path, "rb")


def expand_braces(pattern: str) -> list[str]:
    """``a{00..02}b{x,y}`` -> ``a00bx, a00by, a01bx, ...`` (zero padding kept), as in WebDataset shard specs."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    body, head, tail = match.group(1), pattern[:match.start()], pattern[match.end():]
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        first, last = numeric.groups()
        width = len(first) if first.startswith("0") else 0
        items = [str(i).zfill(width) for i in range(int(first), int(last) + 1)]
    else:
        items = body.split(",")
    return [expanded for item in items for expanded in expand_braces(head + item + tail)]


def list_files(root: str, suffix: str) -> list[Shard]:
    """The files of ``root`` -- a file, a folder (searched recursively for ``*suffix``), a glob or a brace
    pattern; local or an fsspec URL -- sorted by name.  None found is a :class:`DatasetError`."""
    patterns = expand_braces(root)
    fs, first = _fs(patterns[0])
    literal = re.split(r"[*?\[{]", root, maxsplit=1)[0]
    is_pattern = literal != root
    # names are relative to the folder before the first wildcard (a pattern) or to the root folder itself
    base = _fs(literal.rpartition("/")[0] or ".")[1] if is_pattern else first.rstrip("/")
    paths = []
    for pattern in patterns:
        path = _fs(pattern)[1]
        if re.search(r"[*?\[]", path):
            paths += [p for p in fs.glob(path) if fs.isfile(p)]
        elif fs.isdir(path):
            paths += [p for p in fs.find(path) if p.endswith(suffix)]
        elif fs.isfile(path):
            paths.append(path)
            base = posixpath.dirname(path) if not is_pattern else base
        elif is_pattern:
            raise DatasetError(f"{root}: shard {pattern} not found")
    if not paths:
        raise DatasetError(f"{root}: no {suffix} files found")
    local = "://" not in root
    return [Shard(url=os.path.abspath(p) if local else fs.unstrip_protocol(p),
                  name=posixpath.relpath(p, base) if base else p, size=int(fs.size(p)))
            for p in sorted(set(paths))]


def split_of(path: str) -> str | None:
    """The split a file's path implies: its file name or, else, its folder's name, when the first word (before
    ``-``, ``_`` or ``.``) is train / val / valid / validation / dev / test (``train/00000.tar``,
    ``data/train-00000-of-00004.parquet``, ``default/validation/0000.parquet``); else ``None``.  Folders
    further up are not looked at, so where a dataset lives does not decide its split."""
    for part in reversed(path.rstrip("/").split("/")[-2:]):
        word = re.split(r"[-_.]", part.lower(), maxsplit=1)[0]
        if word in _SPLIT_WORDS:
            return _SPLIT_WORDS[word]
    return None


def _split_for(option: str | None, *names: str | None, where: str) -> str:
    if option:
        return ds.split_field(_SPLIT_WORDS.get(str(option).lower(), option), "--option split")
    for name in names:
        if name and split_of(name):
            return split_of(name)
    raise DatasetError(f"{where}: cannot tell the split (pass --option split=train, or put the files under "
                       "train/ val/ test/ or name them train-*, validation-*, test-*)")


# --------------------------------------------------------------------------- lazy image references


class _ReadCache:
    """Per-process LRU of open files and decoded blocks.  Keyed by pid as well: a forked loader worker must not
    share its parent's file objects (one file position for two processes)."""

    def __init__(self, size: int):
        self.size, self.pid, self.items = size, None, collections.OrderedDict()

    def get(self, key, make: Callable[[], Any]):
        if self.pid != os.getpid():
            self.pid, self.items = os.getpid(), collections.OrderedDict()
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        value = self.items[key] = make()
        while len(self.items) > self.size:
            _, old = self.items.popitem(last=False)
            if hasattr(old, "close"):
                old.close()
        return value


_FILES = _ReadCache(4)    # open shards / Parquet files / Arrow files
_BLOCKS = _ReadCache(1)   # the image column of the last row group or record batch: one block of images


def _open_cached(url: str):
    return _FILES.get(("file", url), lambda: _open(url))


@dataclass(frozen=True, slots=True)
class TarMember:
    """An image member of a tar shard: ``size`` bytes at byte ``offset``."""

    shard: Shard
    offset: int
    size: int

    def read(self) -> bytes:
        f = _open_cached(self.shard.url)
        f.seek(self.offset)
        data = f.read(self.size)
        if len(data) != self.size:
            raise OSError(f"{self.shard.url}: ends inside the member at byte {self.offset}")
        return data

    def fingerprint(self) -> list:
        return [self.shard.name, self.shard.size, self.offset, self.size]


def _child(column, name: str):
    """A struct column's child, null where the struct itself is null (``StructArray.field`` ignores that)."""
    import pyarrow.compute as pc

    return pc.struct_field(column, name)


def _bytes_array(column):
    """The image bytes of a read column: struct{bytes, path} -> its ``bytes`` child; binary as is."""
    import pyarrow as pa

    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return _child(array, "bytes") if pa.types.is_struct(array.type) else array


@dataclass(frozen=True, slots=True)
class ParquetCell:
    """The image bytes of one Parquet row: row ``row`` of row group ``row_group``, column ``column``."""

    file: Shard
    row_group: int
    row: int
    column: str

    def read(self) -> bytes:
        def load():
            import pyarrow.parquet as pq

            parquet = _FILES.get(("parquet", self.file.url), lambda: pq.ParquetFile(_open(self.file.url)))
            return _bytes_array(parquet.read_row_group(self.row_group, columns=[self.column]).column(0))

        return _BLOCKS.get((self.file.url, self.row_group, self.column), load)[self.row].as_py()

    def fingerprint(self) -> list:
        return [self.file.name, self.file.size, self.row_group, self.row]


def _arrow_input(url: str):
    """Local Arrow files are memory-mapped (reading a column touches only its pages); URLs go through fsspec."""
    import pyarrow as pa

    return pa.memory_map(url) if "://" not in url else pa.PythonFile(_open(url), mode="r")


@dataclass(frozen=True, slots=True)
class ArrowCell:
    """The image bytes of one row of an Arrow stream file: row ``row`` of the record batch at byte ``offset``."""

    file: Shard
    offset: int
    row: int
    column: str

    def read(self) -> bytes:
        import pyarrow as pa

        def load():
            source = _FILES.get(("arrow", self.file.url), lambda: _arrow_input(self.file.url))
            source.seek(0)
            schema = pa.ipc.read_schema(pa.ipc.read_message(source))
            source.seek(self.offset)
            batch = pa.ipc.read_record_batch(pa.ipc.read_message(source), schema)
            return _bytes_array(batch.column(self.column))

        return _BLOCKS.get((self.file.url, self.offset, self.column), load)[self.row].as_py()

    def fingerprint(self) -> list:
        return [self.file.name, self.file.size, self.offset, self.row]


@dataclass(frozen=True, slots=True)
class UrlImage:
    """An image file named by a path under a remote root (the Parquet / Arrow ``path`` of an image)."""

    url: str

    def read(self) -> bytes:
        with _open(self.url) as f:
            return f.read()

    def fingerprint(self) -> list:
        return [self.url]


# --------------------------------------------------------------------------- rows -> Dataset


@dataclass(slots=True)
class _Row:
    id: str
    split: str
    origin: str                 # shard / file and member / row, for error messages
    image: tuple                # (path or reference, None) or (None, reason)
    text: tuple                 # (text, None) or (None, reason)
    label: Any                  # a class name, a list of names (multilabel) or None


def _dataset(name: str, source: str, rows: list[_Row], multilabel: bool, classes: list[str] | None = None):
    """Class names (sorted, integer-like ones numerically, unless given), labels and duplicate checks, reusing
    the collector every reader uses."""
    if classes is None:
        names = {n for r in rows for n in (r.label if multilabel else [r.label]) if n is not None}
        classes = sorted(names, key=ds.class_sort_key)
    out = ds._Collector()
    labels = ds.Labels(classes, out.problems)
    for r in rows:
        out.add(id=r.id, split=r.split, origin=r.origin, image=r.image, text=r.text,
                label=labels.multi(r.label or []) if multilabel else labels.single(r.label))
    task = "multilabel" if multilabel else ("binary" if len(classes) == 2 else "multiclass")
    return out.dataset(name, source, task, classes)


def _decode_text(data: bytes) -> str:
    return data.decode("utf-8", errors="surrogateescape")  # _text_field marks invalid bytes non_utf8_text


# --------------------------------------------------------------------------- WebDataset


def _member_key(name: str) -> tuple[str, str]:
    """WebDataset's convention: the key is the path up to the first dot of the file name, the rest the
    extension (``a/b.seg.jpg`` -> ``a/b``, ``seg.jpg``)."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _tar_samples(shard: Shard) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``(key, {extension: bytes for small members, (offset, size) for the others})`` in shard order,
    reading headers and small members only."""
    last, key, members = None, None, {}
    with _open(shard.url) as f:
        try:
            with tarfile.open(fileobj=f, mode="r:") as tar:
                for info in tar:
                    last = info.name
                    if not info.isfile():
                        continue
                    member_key, ext = _member_key(info.name)
                    if member_key != key:
                        if key is not None:
                            yield key, members
                        key, members = member_key, {}
                    if ext in members:
                        raise DatasetError(f"{shard.url} member {info.name}: duplicate member for key {key!r}")
                    if ext in _TEXT_MEMBER_EXTS:
                        members[ext] = tar.extractfile(info).read()
                    else:
                        members[ext] = (info.offset_data, info.size)
                    tar.members.clear()  # tarfile keeps every header; the index needs none of them
                end = tar.offset
        except tarfile.TarError as exc:
            after = f" after member {last}" if last else ""
            raise DatasetError(f"{shard.url}: corrupt tar{after} ({exc})") from None
        # tarfile stops silently at an invalid header past the first one: what follows must be end-of-archive zeros
        f.seek(end)
        if f.read(1024).strip(b"\0"):
            after = f" after member {last}" if last else ""
            raise DatasetError(f"{shard.url}: corrupt tar header at byte {end}{after}")
    if key is not None:
        yield key, members


def _json_member(data: bytes | None, where: str) -> dict:
    if data is None:
        return {}
    record = ds._parse_json(_decode_text(data), where)
    if not isinstance(record, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return record


def read_webdataset(root: str, *, split: str | None = None, image_ext: str = ",".join(DEFAULT_IMAGE_EXTS),
                    text_key: str | None = None, label_key: str | None = None) -> ds.Dataset:
    """WebDataset shards: a sample is the members sharing a key.  The image is the first of ``image_ext``
    (comma-separated, in that order of preference) the key has; the text is ``<key>.txt`` or, with
    ``text_key``, that field of ``<key>.json``; the label is ``<key>.cls`` or, with ``label_key``, that field
    of ``<key>.json``.  The split is ``split`` for every shard, else the shard's name or folder
    (``val-00000.tar``, ``train/00000.tar``: :func:`split_of`).  The id is the key; keys that repeat in shards of different
    splits (img2dataset run once per split) are prefixed with the shard name; within a split they are an error."""
    shards = list_files(root, ".tar")
    image_exts = [e.strip().lower().lstrip(".") for e in str(image_ext).split(",") if e.strip()]
    rows, shard_names = [], []
    for shard in shards:
        shard_split = _split_for(split, shard.url, where=shard.url)
        for key, members in _tar_samples(shard):
            where = f"{shard.url} member {key}"
            meta = _json_member(members.get("json"), f"{where}.json")
            image_ext_found = next((e for e in image_exts if isinstance(members.get(e), tuple)), None)
            image = ((TarMember(shard, *members[image_ext_found]), None) if image_ext_found
                     else (None, ds.MISSING_FIELD))
            if text_key:
                text = ds._text_field(meta.get(text_key))
            else:
                text = ds._text_field(_decode_text(members["txt"]) if "txt" in members else None)
            raw = meta.get(label_key) if label_key else (_decode_text(members["cls"]) if "cls" in members else None)
            label = None if raw is None or str(raw).strip() == "" else str(raw).strip()
            rows.append(_Row(id=key, split=shard_split, origin=where, image=image, text=text, label=label))
            shard_names.append(shard.name)
    splits_of_key = collections.defaultdict(set)
    for r in rows:
        splits_of_key[r.id].add(r.split)
    for r, shard_name in zip(rows, shard_names):
        if len(splits_of_key[r.id]) > 1:  # within one split a repeat stays, for the collector to refuse
            r.id = f"{os.path.splitext(shard_name)[0]}/{r.id}"
    return _dataset("webdataset", root, rows, multilabel=False)


# --------------------------------------------------------------------------- columns (Parquet and Arrow)


def _class_names(feature: Any) -> tuple[list[str] | None, bool]:
    """(names, is a sequence) of a Hugging Face feature: ClassLabel, Sequence/List of ClassLabel, [ClassLabel]."""
    if isinstance(feature, list) and feature:
        return _class_names(feature[0])[0], True
    if not isinstance(feature, dict):
        return None, False
    if feature.get("_type") == "ClassLabel" and isinstance(feature.get("names"), list):
        return [str(n) for n in feature["names"]], False
    if feature.get("_type") in ("Sequence", "List", "LargeList") and "feature" in feature:
        return _class_names(feature["feature"])[0], True
    return None, False


def _schema_features(schema) -> dict:
    """The Hugging Face features stored in an Arrow / Parquet schema's metadata (``{}`` when absent)."""
    raw = (schema.metadata or {}).get(b"huggingface")
    if not raw:
        return {}
    try:
        return json.loads(raw).get("info", {}).get("features", {}) or {}
    except (ValueError, AttributeError):
        return {}


@dataclass
class _Columns:
    """Which columns hold what, checked against one file's schema."""

    image: str | None
    image_kind: str | None          # "struct" (bytes + path), "bytes" or "path"
    text: str | None
    label: str | None
    id: str | None
    split: str | None
    multilabel: bool
    label_names: list[str] | None   # ClassLabel names: integer labels index them

    @classmethod
    def resolve(cls, schema, where: str, features: dict, *, image_column, text_column, label_column, id_column):
        import pyarrow as pa

        names = set(schema.names)
        for what, column in (("image", image_column), ("text", text_column)):
            if column and column not in names:
                raise DatasetError(f"{where}: no {what} column {column!r} (columns: {schema.names}); "
                                   f"pass --option {what}_column=NAME, or {what}_column= for none")
        if label_column and label_column not in names:
            raise DatasetError(f"{where}: no label column {label_column!r} (columns: {schema.names})")
        label = label_column or next((c for c in ("label", "labels") if c in names), None)
        kind = None
        if image_column:
            t = schema.field(image_column).type
            if pa.types.is_struct(t) and t.get_field_index("bytes") >= 0:
                kind = "struct"
            elif pa.types.is_binary(t) or pa.types.is_large_binary(t):
                kind = "bytes"
            elif pa.types.is_string(t) or pa.types.is_large_string(t):
                kind = "path"
            else:
                raise DatasetError(f"{where}: image column {image_column!r} has type {t}; expected "
                                   "struct{bytes, path}, binary or a path string")
        label_names, multilabel = None, False
        if label:
            t = schema.field(label).type
            multilabel = pa.types.is_list(t) or pa.types.is_large_list(t)
            label_names = _class_names(features.get(label))[0]
        if id_column != "id" and id_column and id_column not in names:
            raise DatasetError(f"{where}: no id column {id_column!r} (columns: {schema.names})")
        return cls(image=image_column or None, image_kind=kind, text=text_column or None, label=label,
                   id=id_column if id_column in names else None, split="split" if "split" in names else None,
                   multilabel=multilabel, label_names=label_names)

    def metadata_columns(self) -> list[str]:
        """Everything the index pass reads: never the image bytes (a struct's ``path`` leaf at most)."""
        cols = [c for c in (self.text, self.label, self.id, self.split) if c]
        if self.image_kind == "path":
            cols.append(self.image)
        elif self.image_kind == "struct":
            cols.append(f"{self.image}.path")  # Parquet reads this leaf alone
        return cols

    def label_name(self, value: Any) -> Any:
        """A raw label (int, string, or a list of them) -> class name(s); an int indexes the ClassLabel names,
        -1 (Hugging Face's "no label") and null are no label."""
        if self.multilabel:
            return [n for n in (self.label_name_one(v) for v in (value or [])) if n is not None]
        return self.label_name_one(value)

    def label_name_one(self, value: Any) -> str | None:
        if value is None or (isinstance(value, int) and value == -1) or str(value).strip() == "":
            return None
        if self.label_names is not None and isinstance(value, int):
            return self.label_names[value] if 0 <= value < len(self.label_names) else f"<{value}>"  # unknown
        return str(value).strip()


def _image_value(cols: _Columns, has_bytes: bool, path: Any, ref: Callable[[], Any], base: str) -> tuple:
    """(bytes reference | path, None) or (None, reason) for one row."""
    if has_bytes:
        return ref(), None
    if path is None or not str(path).strip():
        return None, ds.MISSING_FIELD
    if "://" not in base:
        return ds._image_field(base, path)
    fs, base_path = _fs(base)
    full = posixpath.join(base_path, str(path).strip())
    return (UrlImage(fs.unstrip_protocol(full)), None) if fs.isfile(full) else (None, ds.MISSING_FILE)


def _metadata_values(columns: Callable[[str], Any], cols: _Columns) -> tuple[dict[str, list], list]:
    """The metadata columns of one row group / record batch as Python lists, and the image paths (never the
    image bytes: of a struct image only its ``path`` child is converted)."""
    data = {c: columns(c).to_pylist() for c in (cols.text, cols.label, cols.id, cols.split) if c}
    if cols.image_kind == "path":
        return data, columns(cols.image).to_pylist()
    if cols.image_kind == "struct":
        return data, _child(columns(cols.image), "path").to_pylist()
    return data, []


def _table_rows(data: dict[str, list], paths: list, n: int, cols: _Columns, *, file: Shard, split: str | None,
                origin: Callable[[int], str], has_bytes: list[bool], ref: Callable[[int], Any],
                counters: dict) -> Iterator[_Row]:
    """The ``n`` rows of one row group / record batch (``has_bytes``: which rows hold image bytes)."""
    paths = paths or [None] * n
    base = posixpath.dirname(file.url) if "://" in file.url else os.path.dirname(file.url)
    for i in range(n):
        where = origin(i)
        row_split = split or (ds.split_field(_SPLIT_WORDS.get(str(data[cols.split][i]).lower(), data[cols.split][i]),
                                             where) if cols.split else None)
        if row_split is None:
            raise DatasetError(f"{where}: cannot tell the split (pass --option split=train, add a split column, "
                               "or name the files train-*, validation-*, test-*)")
        if cols.id:
            row_id = ds.id_field(data[cols.id][i], where)
        else:  # the row number within its split, as a Hugging Face dataset indexes it
            row_id = f"{row_split}/{counters[row_split]}"
            counters[row_split] += 1
        text = data[cols.text][i] if cols.text else None
        if isinstance(text, bytes):
            text = _decode_text(text)
        yield _Row(id=row_id, split=row_split, origin=where,
                   image=_image_value(cols, has_bytes[i], paths[i], lambda i=i: ref(i), base),
                   text=ds._text_field(text),
                   label=cols.label_name(data[cols.label][i]) if cols.label else (None if not cols.multilabel else []))


def _bytes_validity(read_bytes: Callable[[], Any], null_count: int | None, n: int) -> list[bool]:
    """Which rows hold image bytes.  From the statistics when they say "no nulls"; otherwise the bytes must be
    read (one row group / batch at a time) to find the null ones."""
    if null_count == 0:
        return [True] * n
    return read_bytes().is_valid().to_pylist()


def _classes_of(cols: _Columns | None) -> list[str] | None:
    """ClassLabel names when the schema gives them (out-of-range integers then stay unknown), else inferred."""
    return list(cols.label_names) if cols is not None and cols.label_names is not None else None


# --------------------------------------------------------------------------- Parquet


def read_parquet(root: str, *, split: str | None = None, image_column: str = "image", text_column: str = "text",
                 label_column: str | None = None, id_column: str = "id") -> ds.Dataset:
    """Parquet files (one, a folder, a glob): the Hugging Face hub layout ``train-*.parquet`` /
    ``validation-*`` / ``test-*`` (the split from the file or folder name), or a ``split`` column, or
    ``split`` for every row.  Columns: ``image`` (struct{bytes, path}, binary, or a path relative to the file),
    ``text``, ``label`` or ``labels`` (integers index the ClassLabel names of the schema's Hugging Face
    metadata), ``id`` (default: the row number within its split, ``train/17``).  An empty ``image_column=`` /
    ``text_column=`` means the data has none."""
    import pyarrow.parquet as pq

    rows, counters, first_cols = [], collections.Counter(), None
    for file in list_files(root, ".parquet"):
        with _open(file.url) as f:
            parquet = pq.ParquetFile(f)
            cols = _Columns.resolve(parquet.schema_arrow, file.url, _schema_features(parquet.schema_arrow),
                                    image_column=image_column, text_column=text_column,
                                    label_column=label_column, id_column=id_column)
            first_cols = first_cols or cols
            file_split = None if cols.split and not split else _split_for(split, file.url, where=file.url)
            bytes_leaf = f"{cols.image}.bytes" if cols.image_kind == "struct" else cols.image
            leaves = [parquet.metadata.schema.column(j).path for j in range(parquet.metadata.num_columns)]
            offset = 0
            for rg in range(parquet.num_row_groups):
                meta = parquet.metadata.row_group(rg)
                table = parquet.read_row_group(rg, columns=cols.metadata_columns())
                data, paths = _metadata_values(table.column, cols)
                if cols.image_kind in ("struct", "bytes"):
                    stats = meta.column(leaves.index(bytes_leaf)).statistics
                    nulls = stats.null_count if stats is not None and stats.has_null_count else None
                    has_bytes = _bytes_validity(
                        lambda: _bytes_array(parquet.read_row_group(rg, columns=[cols.image]).column(0)),
                        nulls, meta.num_rows)
                else:
                    has_bytes = [False] * meta.num_rows
                rows += _table_rows(
                    data, paths, meta.num_rows, cols, file=file, split=file_split, counters=counters,
                    has_bytes=has_bytes, origin=lambda i, o=offset: f"{file.url} row {o + i}",
                    ref=lambda i, rg=rg: ParquetCell(file, rg, i, cols.image))
                offset += meta.num_rows
    return _dataset("parquet", root, rows, multilabel=bool(first_cols and first_cols.multilabel),
                    classes=_classes_of(first_cols))


# --------------------------------------------------------------------------- save_to_disk folders


def _read_json(fs, path: str, what: str) -> Any:
    if not fs.isfile(path):
        raise DatasetError(f"{path}: required {what} not found")
    with fs.open(path, "rb") as f:
        return ds._parse_json(f.read().decode("utf-8"), path)


def _arrow_batches(file: Shard) -> Iterator[tuple[int, Any]]:
    """Yield ``(byte offset, record batch)`` of an Arrow IPC stream file (what ``save_to_disk`` writes).  Local
    files are memory-mapped, so a batch costs only the pages of the columns that are read."""
    import pyarrow as pa

    source = _arrow_input(file.url)
    try:
        messages = pa.ipc.MessageReader.open_stream(source)
        schema = pa.ipc.read_schema(messages.read_next_message())
        yield -1, schema
        while True:
            offset = source.tell()
            try:
                message = messages.read_next_message()
            except StopIteration:
                return
            if message.type != "record batch":
                raise DatasetError(f"{file.url} byte {offset}: unsupported Arrow message {message.type!r} "
                                   "(dictionary-encoded columns are not read)")
            yield offset, pa.ipc.read_record_batch(message, schema)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DatasetError(f"{file.url}: not a readable Arrow stream ({exc})") from None
    finally:
        source.close()


def read_hf(root: str, *, split: str | None = None, image_column: str = "image", text_column: str = "text",
            label_column: str | None = None, id_column: str = "id") -> ds.Dataset:
    """A ``datasets.Dataset.save_to_disk`` folder, read with pyarrow: a DatasetDict (``dataset_dict.json``, one
    sub-folder per split) or one dataset (``state.json``: the split is ``split``, else the one it was saved
    with).  Columns as for :func:`read_parquet`; class names from ``dataset_info.json``'s features."""
    fs, path = _fs(root)
    path = path.rstrip("/")
    if fs.isfile(posixpath.join(path, "dataset_dict.json")):
        listed = _read_json(fs, posixpath.join(path, "dataset_dict.json"), "dataset_dict.json").get("splits", [])
        folders = [(str(name), posixpath.join(path, str(name))) for name in listed]
    elif fs.isfile(posixpath.join(path, "state.json")):
        folders = [(None, path)]
    else:
        raise DatasetError(f"{root}: not a save_to_disk folder (neither dataset_dict.json nor state.json)")
    local = "://" not in root
    rows, counters, first_cols = [], collections.Counter(), None
    for split_name, folder in folders:
        state = _read_json(fs, posixpath.join(folder, "state.json"), "state.json")
        info_path = posixpath.join(folder, "dataset_info.json")
        features = _read_json(fs, info_path, "dataset_info.json").get("features") or {} if fs.isfile(info_path) else {}
        folder_split = _split_for(split, split_name, state.get("_split"), where=folder)
        for entry in state.get("_data_files", []):
            file_path = posixpath.join(folder, entry["filename"])
            if not fs.isfile(file_path):
                raise DatasetError(f"{file_path}: Arrow file listed in state.json not found")
            file = Shard(url=file_path if local else fs.unstrip_protocol(file_path),
                         name=posixpath.relpath(file_path, path), size=int(fs.size(file_path)))
            batches = _arrow_batches(file)
            schema = next(batches)[1]
            cols = _Columns.resolve(schema, file.url, features or _schema_features(schema),
                                    image_column=image_column, text_column=text_column,
                                    label_column=label_column, id_column=id_column)
            first_cols = first_cols or cols
            row = 0
            for offset, batch in batches:
                has_bytes = ([False] * batch.num_rows if cols.image_kind in (None, "path") else
                             _bytes_validity(lambda: _bytes_array(batch.column(cols.image)), None, batch.num_rows))
                data, paths = _metadata_values(batch.column, cols)
                rows += _table_rows(
                    data, paths, batch.num_rows, cols, file=file, split=folder_split, counters=counters,
                    has_bytes=has_bytes, origin=lambda i, r=row: f"{file.url} row {r + i}",
                    ref=lambda i, o=offset: ArrowCell(file, o, i, cols.image))
                row += batch.num_rows
    return _dataset("hf", root, rows, multilabel=bool(first_cols and first_cols.multilabel),
                    classes=_classes_of(first_cols))


# embcache.datasets.open_dataset looks this up by module name (datasets.py never imports this module)
FORMAT_READERS = {"webdataset": read_webdataset, "parquet": read_parquet, "hf": read_hf}


# --------------------------------------------------------------------------- writing shards (bench, tests)


def write_webdataset(dataset: ds.Dataset, out_dir: str, samples_per_shard: int = 100) -> str:
    """Write a dataset as WebDataset shards ``out_dir/<split>/<00000>.tar`` (``<id>.jpg|png...`` with the
    image file's bytes, ``<id>.txt``, ``<id>.cls`` the class index, ``<id>.json`` the id and label name), as
    img2dataset would; returns ``out_dir``.  Absent modalities are left out."""
    import io

    by_split = collections.defaultdict(list)
    for sample in dataset.samples:
        by_split[sample.split].append(sample)
    for split, samples in by_split.items():
        os.makedirs(os.path.join(out_dir, split), exist_ok=True)
        for n, start in enumerate(range(0, len(samples), samples_per_shard)):
            with tarfile.open(os.path.join(out_dir, split, f"{n:05d}.tar"), "w") as tar:
                for sample in samples[start:start + samples_per_shard]:
                    key = re.sub(r"[^A-Za-z0-9_-]", "_", sample.id)
                    label = sample.label if isinstance(sample.label, int) else -1
                    members = {"json": json.dumps({"id": sample.id, "label": dataset.classes[label]
                                                   if label >= 0 else None}).encode()}
                    if label >= 0:
                        members["cls"] = str(label).encode()
                    if sample.text is not None:
                        members["txt"] = sample.text.encode()
                    if isinstance(sample.image, str):
                        ext = os.path.splitext(sample.image)[1].lstrip(".").lower() or "jpg"
                        with open(sample.image, "rb") as f:
                            members[ext] = f.read()
                    for ext, data in sorted(members.items()):
                        info = tarfile.TarInfo(f"{key}.{ext}")
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
    return out_dir


__all__ = ["FORMAT_READERS", "ArrowCell", "ParquetCell", "Shard", "TarMember", "UrlImage", "expand_braces",
           "list_files", "read_hf", "read_parquet", "read_webdataset", "split_of", "write_webdataset"]
