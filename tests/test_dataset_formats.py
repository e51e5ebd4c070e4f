"""WebDataset shards, Parquet files and save_to_disk folders (embcache/dataset_formats.py): fixtures built here."""
from __future__ import annotations

import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zarr
from PIL import Image

from embcache import dataset_formats as fmt
from embcache import datasets as ds
from embcache import store as st
from embcache.datasets import DatasetError, open_dataset
from embcache.extract import ExtractConfig, extract
from test_extract_scale import assert_same_store, free_port
from tiny_encoders import tiny_extract_options

DEMO = os.path.join(os.path.dirname(__file__), "..", "data", "demo", "manifest.jsonl")
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def jpeg(colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buf, format="JPEG")
    return buf.getvalue()


def png(colour=(10, 200, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (12, 12), colour).save(buf, format="PNG")
    return buf.getvalue()


def write_tar(path, members) -> str:
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    with tarfile.open(str(path), "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


GOOD, TRUNCATED = jpeg(), jpeg((1, 2, 3))[:200]


def train_members():
    return [
        ("k0.jpg", GOOD), ("k0.txt", b"a red square"), ("k0.cls", b"1"),
        ("k1.jpg", TRUNCATED), ("k1.txt", b"a truncated jpg"), ("k1.cls", b"0"),
        ("k2.txt", b"no image at all"), ("k2.cls", b"0"),                       # key with no image
        ("k3.png", png()), ("k3.txt", b"   "), ("k3.cls", b"1"),                  # blank text
        ("k4.jpg", GOOD), ("k4.json", b'{"caption": "json only"}'),             # no label, no .txt
        ("sub.d/k5.webp", b"not a webp"), ("sub.d/k5.txt", b"caf\xe9"),          # undecodable, non-UTF-8
    ]


@pytest.fixture()
def shards(tmp_path):
    root = tmp_path / "shards"
    write_tar(root / "train" / "00000.tar", train_members())
    write_tar(root / "train" / "00001.tar", [("k6.jpg", GOOD), ("k6.txt", b"second shard"), ("k6.cls", b"1")])
    write_tar(root / "val" / "00000.tar", [("k0.jpg", GOOD), ("k0.txt", b"same key, other split"), ("k0.cls", b"1")])
    return root


def by_id(dataset):
    return {s.id: s for s in dataset.samples}


# --------------------------------------------------------------------------- WebDataset


def test_webdataset_rows_defects_and_lazy_members(shards):
    dataset = open_dataset("webdataset", str(shards))
    ids = [s.id for s in dataset.samples]
    assert ids == ["train/00000/k0", "k1", "k2", "k3", "k4", "sub.d/k5", "k6", "val/00000/k0"]
    assert [s.split for s in dataset.samples] == ["train"] * 7 + ["val"]
    assert dataset.classes == ["0", "1"] and dataset.task == "binary"
    rows = by_id(dataset)
    assert {i: s.absent for i, s in rows.items() if s.absent} == {
        "k2": {"image": "missing_field"}, "k3": {"text": "empty_text"}, "k4": {"text": "missing_field"},
        "sub.d/k5": {"text": "non_utf8_text"}}
    assert [rows[i].label for i in ("train/00000/k0", "k1", "k2", "k4")] == [1, 0, 0, -1]
    assert rows["k1"].image.read() == TRUNCATED and rows["k3"].image.read() == png()
    assert rows["sub.d/k5"].image.read() == b"not a webp"  # the key: the path up to the file name's first dot
    assert rows["k6"].image.shard.name == "train/00001.tar"
    assert dataset.problems == {"missing_field": 2, "empty_text": 1, "non_utf8_text": 1}


def test_webdataset_options_pick_members_and_fields(shards, tmp_path):
    write_tar(tmp_path / "j" / "a.tar", [
        ("x.png", png()), ("x.jpg", GOOD), ("x.json", b'{"caption": " hi ", "label": "cat"}'),
        ("y.jpg", GOOD), ("y.json", b'{"caption": "no label"}'),
        ("z.jpg", GOOD), ("z.json", b'{"label": "dog"}')])
    dataset = open_dataset("webdataset", str(tmp_path / "j"), split="test", image_ext="png,jpg",
                           text_key="caption", label_key="label")
    rows = by_id(dataset)
    assert dataset.classes == ["cat", "dog"] and {s.split for s in dataset.samples} == {"test"}
    assert rows["x"].image.read() == png() and rows["x"].text == "hi"
    assert [rows[k].label for k in "xyz"] == [0, -1, 1]  # a json without the label field: unlabeled
    assert rows["z"].absent == {"text": "missing_field"}


def test_webdataset_roots_patterns_and_urls_agree(shards):
    expected = [(s.id, s.text, s.image and s.image.fingerprint()) for s in open_dataset("webdataset", str(shards)).samples]

    def rows(root):
        return [(s.id, s.text, s.image and s.image.fingerprint()) for s in open_dataset("webdataset", root).samples]

    assert rows(f"file://{shards}") == expected
    braces = open_dataset("webdataset", f"{shards}/train/{{00000..00001}}.tar")
    assert [s.id for s in braces.samples] == ["k0", "k1", "k2", "k3", "k4", "sub.d/k5", "k6"]  # no val: no prefix
    assert [s.id for s in open_dataset("webdataset", f"{shards}/*/00000.tar").samples] == [
        "train/00000/k0", "k1", "k2", "k3", "k4", "sub.d/k5", "val/00000/k0"]
    memory = f"memory://wds-{os.getpid()}"
    fs = fsspec.filesystem("memory")
    for local in sorted(shards.rglob("*.tar")):
        fs.pipe(f"{memory}/{local.relative_to(shards)}", local.read_bytes())
    remote = open_dataset("webdataset", memory)
    assert rows(memory) == expected
    assert by_id(remote)["k1"].image.read() == TRUNCATED and by_id(remote)["k1"].image.shard.url.startswith("memory://")


def test_expand_braces():
    assert fmt.expand_braces("s/{000..002}.tar") == ["s/000.tar", "s/001.tar", "s/002.tar"]
    assert fmt.expand_braces("{a,b}-{8..10}") == ["a-8", "a-9", "a-10", "b-8", "b-9", "b-10"]
    assert fmt.expand_braces("plain.tar") == ["plain.tar"]


def test_split_names():
    assert [fmt.split_of(n) for n in ("train/00000.tar", "data/validation-00000-of-00002.parquet",
                                      "default/test/0000.parquet", "dev_3.tar", "shards/00001.tar",
                                      "/test/shards/00001.tar")] == ["train", "val", "test", "val", None, None]


@pytest.mark.parametrize("members,match", [
    ([("a.jpg", GOOD), ("b.jpg", GOOD), ("a.txt", b"x")], r"duplicate_id: id 'a' appears at .*00000.tar member a and again at .*00000.tar member a"),
    ([("a.jpg", GOOD), ("a.jpg", GOOD)], r"00000.tar member a.jpg: duplicate member for key 'a'"),
    ([("a.jpg", GOOD), ("a.json", b'{"label": ')], r"00000.tar member a.json line 1: invalid JSON"),
])
def test_webdataset_bad_metadata_raises_naming_shard_and_member(tmp_path, members, match):
    write_tar(tmp_path / "train" / "00000.tar", members)
    with pytest.raises(DatasetError, match=match):
        open_dataset("webdataset", str(tmp_path))


def test_duplicate_key_across_shards_of_one_split(tmp_path):
    write_tar(tmp_path / "train" / "00000.tar", [("a.jpg", GOOD)])
    write_tar(tmp_path / "train" / "00001.tar", [("a.jpg", GOOD)])
    with pytest.raises(DatasetError, match=r"'a' appears at .*00000.tar member a and again at .*00001.tar member a"):
        open_dataset("webdataset", str(tmp_path))


def test_corrupt_and_truncated_tars_raise(tmp_path):
    good = write_tar(tmp_path / "t" / "train" / "00000.tar", train_members())
    data = bytearray(open(good, "rb").read())
    corrupt = bytearray(data)
    corrupt[512 * 3 + 100:512 * 3 + 160] = b"\xff" * 60  # the second member's header (k0.txt), checksum broken
    write_bytes = lambda p, b: (os.makedirs(os.path.dirname(p), exist_ok=True), open(p, "wb").write(b))  # noqa: E731
    write_bytes(str(tmp_path / "c" / "train" / "00000.tar"), bytes(corrupt))
    with pytest.raises(DatasetError, match=r"c/train/00000.tar: corrupt tar header at byte 1536 after member k0.jpg"):
        open_dataset("webdataset", str(tmp_path / "c"))
    write_bytes(str(tmp_path / "x" / "train" / "00000.tar"), bytes(data[:2000]))  # inside k0.txt's header
    with pytest.raises(DatasetError, match=r"x/train/00000.tar: corrupt tar header at byte 1536 after member k0.jpg"):
        open_dataset("webdataset", str(tmp_path / "x"))
    write_bytes(str(tmp_path / "y" / "train" / "00000.tar"), bytes(data[:2100]))  # the header after k0.txt's data
    with pytest.raises(DatasetError, match=r"y/train/00000.tar: corrupt tar after member k0.txt \(unexpected end"):
        open_dataset("webdataset", str(tmp_path / "y"))
    write_bytes(str(tmp_path / "g" / "train" / "00000.tar"), b"garbage" * 100)
    with pytest.raises(DatasetError, match=r"g/train/00000.tar: corrupt tar"):
        open_dataset("webdataset", str(tmp_path / "g"))


def test_missing_shards_and_unknown_split_raise(tmp_path):
    with pytest.raises(DatasetError, match="no .tar files found"):
        open_dataset("webdataset", str(tmp_path))
    with pytest.raises(DatasetError, match=r"shard .*00001.tar not found"):
        write_tar(tmp_path / "train" / "00000.tar", [("a.jpg", GOOD)])
        open_dataset("webdataset", f"{tmp_path}/train/{{00000..00001}}.tar")
    write_tar(tmp_path / "flat" / "00000.tar", [("a.jpg", GOOD)])
    with pytest.raises(DatasetError, match=r"flat/00000.tar: cannot tell the split"):
        open_dataset("webdataset", str(tmp_path / "flat"))
    assert open_dataset("webdataset", str(tmp_path / "flat"), split="validation").samples[0].split == "val"


# --------------------------------------------------------------------------- Parquet


def hf_metadata(features: dict) -> dict:
    return {b"huggingface": json.dumps({"info": {"features": features}}).encode()}


CLASS_FEATURES = {"image": {"_type": "Image"}, "text": {"dtype": "string", "_type": "Value"},
                  "label": {"names": ["cat", "dog", "emu"], "_type": "ClassLabel"}}


def image_table(n_extra: int = 0, folder=None):
    """Rows with planted defects: null image, path-only image (existing and missing), truncated bytes, null and
    empty text, ClassLabel ints incl. -1 (no label) and 7 (out of range)."""
    if folder is not None:
        (folder / "side.png").write_bytes(png())
    images = [{"bytes": GOOD, "path": "a.jpg"}, None, {"bytes": None, "path": "side.png"},
              {"bytes": None, "path": "gone.png"}, {"bytes": TRUNCATED, "path": None}, {"bytes": png(), "path": None}]
    images += [{"bytes": GOOD, "path": None}] * n_extra
    texts = ["a cat", "no image", None, "", "truncated", "ok"] + ["more"] * n_extra
    labels = [0, 1, 2, -1, 7, 1] + [0] * n_extra
    schema = pa.schema([("image", IMAGE_TYPE), ("text", pa.string()), ("label", pa.int64())],
                       metadata=hf_metadata(CLASS_FEATURES))
    return pa.table({"image": images, "text": texts, "label": labels}, schema=schema)


def test_parquet_hf_layout_with_defects(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    pq.write_table(image_table(folder=folder), folder / "train-00000-of-00001.parquet", row_group_size=4)
    pq.write_table(image_table().slice(0, 2), folder / "test-00000-of-00001.parquet")
    dataset = open_dataset("parquet", str(tmp_path))
    assert dataset.classes == ["cat", "dog", "emu"] and dataset.task == "multiclass"
    assert [s.id for s in dataset.samples] == [f"test/{i}" for i in range(2)] + [f"train/{i}" for i in range(6)]
    rows = by_id(dataset)
    assert {i: s.absent for i, s in rows.items() if s.absent} == {
        "test/1": {"image": "missing_field"}, "train/1": {"image": "missing_field"},
        "train/2": {"text": "missing_field"}, "train/3": {"image": "missing_file", "text": "empty_text"}}
    assert [rows[f"train/{i}"].label for i in range(6)] == [0, 1, 2, -1, -1, 1]
    assert dataset.problems["unknown_label"] == 1  # 7; -1 is Hugging Face's "no label"
    assert rows["train/2"].image == str(folder / "side.png")  # a path-only image: the file itself
    cell = rows["train/5"].image
    assert (cell.row_group, cell.row, cell.read()) == (1, 1, png())  # row 5 = row group 1, row 1
    assert rows["train/4"].image.read() == TRUNCATED and rows["train/0"].image.read() == GOOD


def test_parquet_index_pass_never_reads_image_bytes(tmp_path, monkeypatch):
    pq.write_table(pa.table({"image": [{"bytes": GOOD, "path": None}] * 5, "text": list("abcde"),
                             "id": [f"r{i}" for i in range(5)], "split": ["train", "val", "test", "dev", "train"]},
                            schema=pa.schema([("image", IMAGE_TYPE), ("text", pa.string()), ("id", pa.string()),
                                              ("split", pa.string())])),
                   tmp_path / "rows.parquet", row_group_size=2)
    read = []
    real = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group",
                        lambda self, i, columns=None, **kw: read.append(columns) or real(self, i, columns=columns, **kw))
    dataset = open_dataset("parquet", str(tmp_path / "rows.parquet"))
    assert [s.split for s in dataset.samples] == ["train", "val", "test", "val", "train"]  # the split column
    assert [s.id for s in dataset.samples] == [f"r{i}" for i in range(5)]
    assert read and all("image" not in cols for cols in read), read  # only image.path, text, id, split
    assert dataset.samples[3].image.read() == GOOD and ["image"] in read  # the lazy read takes the bytes


def test_parquet_binary_and_path_columns_multilabel_and_options(tmp_path):
    (tmp_path / "p.jpg").write_bytes(GOOD)
    pq.write_table(pa.table({"img": [GOOD, None], "caption": ["x", "y"], "labels": [["b", "a"], []]}),
                   tmp_path / "bin.parquet")
    dataset = open_dataset("parquet", str(tmp_path / "bin.parquet"), split="train", image_column="img",
                           text_column="caption")
    assert dataset.task == "multilabel" and dataset.classes == ["a", "b"]
    assert [s.label for s in dataset.samples] == [[0, 1], []]
    assert dataset.samples[0].image.read() == GOOD and dataset.samples[1].absent == {"image": "missing_field"}
    pq.write_table(pa.table({"image": ["p.jpg", "q.jpg"], "text": ["x", "y"]}), tmp_path / "paths.parquet")
    paths = open_dataset("parquet", str(tmp_path / "paths.parquet"), split="test", text_column="")
    assert paths.samples[0].image == str(tmp_path / "p.jpg") and paths.samples[1].absent["image"] == "missing_file"
    assert all(s.absent["text"] == "missing_field" for s in paths.samples)  # text_column= : none


@pytest.mark.parametrize("options,match", [
    ({}, r"bad.parquet: no image column 'image' \(columns: \['picture', 'text'\]\)"),
    ({"image_column": "picture", "label_column": "y"}, r"bad.parquet: no label column 'y'"),
    ({"image_column": "picture", "id_column": "key"}, r"bad.parquet: no id column 'key'"),
])
def test_parquet_missing_columns_raise(tmp_path, options, match):
    pq.write_table(pa.table({"picture": [GOOD], "text": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(DatasetError, match=match):
        open_dataset("parquet", str(tmp_path / "bad.parquet"), split="train", **options)


def test_parquet_duplicate_id_and_unknown_split_raise(tmp_path):
    pq.write_table(pa.table({"image": [GOOD, GOOD], "text": ["a", "b"], "id": ["x", "x"]}), tmp_path / "train-0.parquet")
    with pytest.raises(DatasetError, match=r"duplicate_id: id 'x' appears at .*train-0.parquet row 0 and again at "
                                           r".*train-0.parquet row 1"):
        open_dataset("parquet", str(tmp_path))
    (tmp_path / "flat").mkdir()
    pq.write_table(pa.table({"image": [GOOD], "text": ["a"]}), tmp_path / "flat" / "other.parquet")
    with pytest.raises(DatasetError, match="flat/other.parquet: cannot tell the split"):
        open_dataset("parquet", str(tmp_path / "flat" / "other.parquet"))


def test_parquet_through_memory_url(tmp_path):
    pq.write_table(image_table(folder=tmp_path), tmp_path / "train-0.parquet", row_group_size=4)
    url = f"memory://pq-{os.getpid()}/data/train-0.parquet"
    fsspec.filesystem("memory").pipe(url, (tmp_path / "train-0.parquet").read_bytes())
    local, remote = open_dataset("parquet", str(tmp_path / "train-0.parquet")), open_dataset("parquet", url)
    assert [(s.id, s.text, s.label) for s in remote.samples] == [(s.id, s.text, s.label) for s in local.samples]
    assert remote.samples[5].image.read() == png()
    assert remote.samples[2].absent["image"] == "missing_file"  # side.png exists locally, not under the URL


# --------------------------------------------------------------------------- save_to_disk folders


def save_to_disk(folder, tables: dict[str | None, pa.Table], features: dict) -> str:
    """What `datasets.Dataset(Dict).save_to_disk` writes: Arrow stream files, state.json, dataset_info.json
    (and dataset_dict.json with one sub-folder per split)."""
    def one(path, table, split):
        os.makedirs(path, exist_ok=True)
        with pa.OSFile(os.path.join(path, "data-00000-of-00001.arrow"), "wb") as sink:
            with pa.ipc.new_stream(sink, table.schema) as writer:
                for batch in table.to_batches(max_chunksize=3):
                    writer.write_batch(batch)
        json.dump({"_data_files": [{"filename": "data-00000-of-00001.arrow"}], "_split": split},
                  open(os.path.join(path, "state.json"), "w"))
        json.dump({"features": features}, open(os.path.join(path, "dataset_info.json"), "w"))

    if list(tables) == [None]:
        one(str(folder), tables[None], None)
    else:
        os.makedirs(folder, exist_ok=True)
        json.dump({"splits": list(tables)}, open(os.path.join(folder, "dataset_dict.json"), "w"))
        for split, table in tables.items():
            one(os.path.join(folder, split), table, split)
    return str(folder)


def test_hf_dataset_dict(tmp_path):
    plain = image_table(n_extra=2).replace_schema_metadata(None)  # class names from dataset_info.json only
    root = save_to_disk(tmp_path / "dd", {"train": plain, "validation": plain.slice(0, 2)}, CLASS_FEATURES)
    dataset = open_dataset("hf", root)
    assert dataset.classes == ["cat", "dog", "emu"]
    assert [s.id for s in dataset.samples] == [f"train/{i}" for i in range(8)] + ["val/0", "val/1"]
    rows = by_id(dataset)
    assert [rows[f"train/{i}"].label for i in range(6)] == [0, 1, 2, -1, -1, 1]
    assert {i: s.absent for i, s in rows.items() if s.absent} == {
        "train/1": {"image": "missing_field"}, "train/2": {"image": "missing_file", "text": "missing_field"},
        "train/3": {"image": "missing_file", "text": "empty_text"}, "val/1": {"image": "missing_field"}}
    cell = rows["train/5"].image
    assert isinstance(cell, fmt.ArrowCell) and cell.row == 2 and cell.read() == png()  # batch 2, row 2
    assert rows["train/4"].image.read() == TRUNCATED and rows["val/0"].image.read() == GOOD


def test_hf_single_split_folder_and_url(tmp_path):
    table = pa.table({"image": [{"bytes": GOOD, "path": None}] * 4, "text": list("abcd")}, schema=pa.schema(
        [("image", IMAGE_TYPE), ("text", pa.string())]))
    root = save_to_disk(tmp_path / "one", {None: table}, {"image": {"_type": "Image"}})
    with pytest.raises(DatasetError, match="one: cannot tell the split"):
        open_dataset("hf", root)
    dataset = open_dataset("hf", f"file://{root}", split="test")
    assert [s.split for s in dataset.samples] == ["test"] * 4 and dataset.samples[3].image.read() == GOOD
    assert dataset.samples[3].image.file.url.startswith("file://")
    with pytest.raises(DatasetError, match="not a save_to_disk folder"):
        open_dataset("hf", str(tmp_path))
    with pytest.raises(DatasetError, match=r"no text column 'caption'"):
        open_dataset("hf", root, split="train", text_column="caption")


# --------------------------------------------------------------------------- extraction


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_extract_options(tmp_path_factory.mktemp("enc"))


DEMO_SHARD_ROWS = 300  # several shards per split; extracting all 1,300 demo rows twice took minutes


@pytest.fixture(scope="module")
def demo_shards(tmp_path_factory):
    """The first DEMO_SHARD_ROWS demo rows as shards of 32 samples, one folder per split."""
    demo = open_dataset("manifest", DEMO)
    demo = dataclasses.replace(demo, samples=demo.samples[:DEMO_SHARD_ROWS])
    return fmt.write_webdataset(demo, str(tmp_path_factory.mktemp("demo") / "shards"), 32)


def run_extract(tiny, dataset, root, out, **kw):
    cfg = ExtractConfig(**{**dict(dataset=dataset, root=str(root), out=str(out), workers=0, batch_size=4,
                                  chunk_rows=8), **tiny, **kw})
    return extract(cfg, progress=False, log=lambda *_: None)


def test_extract_from_shards_equals_the_manifest_per_id(tiny, demo_shards, tmp_path):
    run_extract(tiny, "webdataset", demo_shards, tmp_path / "wds.zarr", workers=2)
    run_extract(tiny, "manifest", DEMO, tmp_path / "manifest.zarr", limit=DEMO_SHARD_ROWS)
    a, b = st.open_store(str(tmp_path / "wds.zarr")).load(), st.open_store(str(tmp_path / "manifest.zarr")).load()
    order = {i: k for k, i in enumerate(b.ids)}
    rows = [order[i] for i in a.ids]
    assert sorted(a.ids) == sorted(b.ids) and len(rows) == DEMO_SHARD_ROWS
    for m in ("image", "text"):
        # same bytes -> same features, up to one float16 step where the rows shared a batch with other rows
        # (the shards come split by split, so the batches differ; the CPU kernels' sums depend on them)
        np.testing.assert_allclose(a.emb[m], b.emb[m][rows], rtol=2e-3, atol=1e-5, err_msg=m)
        np.testing.assert_array_equal(a.present[m], b.present[m][rows])


@pytest.mark.parametrize("kind", ["webdataset", "parquet", "hf"])
def test_extract_records_decode_failures_from_references(tiny, tmp_path, kind):
    if kind == "webdataset":
        root = str(tmp_path / "in")
        write_tar(tmp_path / "in" / "train" / "00000.tar", train_members())
        bad = {"k1": "truncated_image", "sub.d/k5": "undecodable_image", "k2": "missing_field"}
    elif kind == "parquet":
        (tmp_path / "in").mkdir()
        pq.write_table(image_table(folder=tmp_path / "in"), tmp_path / "in" / "train-0.parquet", row_group_size=4)
        root = f"file://{tmp_path}/in"
        bad = {"train/4": "truncated_image", "train/1": "missing_field", "train/3": "missing_file"}
    else:
        root = save_to_disk(tmp_path / "in", {"train": image_table()}, CLASS_FEATURES)
        bad = {"train/4": "truncated_image", "train/1": "missing_field",  # paths: relative to the Arrow file
               "train/2": "missing_file", "train/3": "missing_file"}
    run_extract(tiny, kind, root, tmp_path / "s.zarr")
    store = st.open_store(str(tmp_path / "s.zarr"))
    names = store.reasons("image")
    got = {i: names[c] for i, c in zip(store.ids(), store.reason_codes("image")) if c}
    assert got == bad
    assert store.meta["problems"]["truncated_image"] == 1


def cli_args(root, out, limit, extra=()):
    return [sys.executable, "-m", "embcache.cli", "extract", "--dataset", "webdataset", "--root", root,
            "--out", str(out), "--limit", str(limit), "--chunk-rows", "8", "--batch-size", "4", "--workers", "0",
            "--quiet", *extra]


def test_sigkill_mid_extraction_from_shards_then_resume(tiny, demo_shards, tmp_path):
    # The default EfficientNet-Lite0 image encoder is slow enough on the CPU to be killed mid-run.
    root = f"{demo_shards}/{{train,val,test}}/*.tar"
    args = cli_args(root, tmp_path / "killed.zarr", 96, ["--text-encoder", tiny["text_encoder"]])
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline, done = time.time() + 120, 0
    while time.time() < deadline and proc.poll() is None:
        if st.read_meta(str(tmp_path / "killed.zarr")) is not None:
            done = int(st.chunks_done(zarr.open_group(str(tmp_path / "killed.zarr"), mode="r")).sum())
            if done >= 3:
                break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert done >= 3 and not st.read_meta(str(tmp_path / "killed.zarr"))["complete"], "killed part-way"
    resumed = subprocess.run(args, capture_output=True, text=True)
    assert resumed.returncode == 0 and "resuming" in resumed.stdout, resumed.stdout + resumed.stderr
    straight = subprocess.run(cli_args(root, tmp_path / "straight.zarr", 96, ["--text-encoder", tiny["text_encoder"]]),
                              capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr
    assert_same_store(str(tmp_path / "killed.zarr"), str(tmp_path / "straight.zarr"))


def test_two_ranks_from_shards_equal_one_process(tiny, demo_shards, tmp_path):
    run_extract(tiny, "webdataset", demo_shards, tmp_path / "single.zarr", limit=40)
    args = cli_args(demo_shards, tmp_path / "multi.zarr", 40, [
        "--text-encoder", tiny["text_encoder"], "--image-encoder", tiny["image_encoder"],
        "--image-checkpoint", tiny["image_checkpoint"]])
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    procs = [subprocess.Popen(args, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    assert_same_store(str(tmp_path / "single.zarr"), str(tmp_path / "multi.zarr"))


def test_fingerprint_covers_the_index(tiny, shards, tmp_path):
    before = [s.image and s.image.fingerprint() for s in open_dataset("webdataset", str(shards)).samples]
    write_tar(shards / "train" / "00001.tar", [("k6.jpg", GOOD + b"\0"), ("k6.txt", b"second shard"),
                                               ("k6.cls", b"1")])
    after = [s.image and s.image.fingerprint() for s in open_dataset("webdataset", str(shards)).samples]
    assert before[:6] == after[:6] and before[6] != after[6]  # same key and text, another member size
    assert ds.DATASET_NAMES[-3:] == ds.FORMAT_NAMES == tuple(fmt.FORMAT_READERS)
