"""Tests for embcache.datasets on the committed fixtures (data/fixtures, data/demo)."""

from __future__ import annotations

import collections
import importlib.util
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from embcache.datasets import (
    DATASET_NAMES,
    MMIMDB_GENRES,
    SPLITS,
    DatasetError,
    Sample,
    open_dataset,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, "data")
FIXTURES = os.path.join(DATA, "fixtures")


def fixture(*parts: str) -> str:
    return os.path.join(FIXTURES, *parts)


def by_id(dataset) -> dict[str, Sample]:
    return {s.id: s for s in dataset.samples}


def absent_map(dataset) -> dict[str, dict[str, str]]:
    return {s.id: s.absent for s in dataset.samples if s.absent}


def check_images(dataset) -> None:
    """A present image is an existing absolute path; an absent one is None with a reason."""
    for s in dataset.samples:
        assert s.split in SPLITS
        if s.image is None:
            assert "image" in s.absent
        else:
            assert os.path.isabs(s.image) and os.path.isfile(s.image)
        assert (s.text is None) == ("text" in s.absent)


def test_api_constants():
    assert DATASET_NAMES == ("mmimdb", "food101", "hateful_memes", "manifest", "webdataset", "parquet", "hf")
    assert len(MMIMDB_GENRES) == 23 and MMIMDB_GENRES[0] == "Drama" and MMIMDB_GENRES[-1] == "Film-Noir"
    assert issubclass(DatasetError, ValueError)
    with pytest.raises(ValueError, match="unknown dataset"):
        open_dataset("imagenet", FIXTURES)


# --------------------------------------------------------------------------- MM-IMDb


def test_mmimdb():
    ds = open_dataset("mmimdb", fixture("mmimdb"))
    assert (ds.name, ds.task, ds.classes) == ("mmimdb", "multilabel", MMIMDB_GENRES)
    assert ds.source == os.path.abspath(fixture("mmimdb"))
    assert [s.id for s in ds.samples] == [f"{i:07d}" for i in range(1, 11)]
    assert [s.split for s in ds.samples] == ["train"] * 6 + ["val"] * 2 + ["test"] * 2
    s = by_id(ds)
    g = MMIMDB_GENRES.index
    assert s["0000001"].label == sorted([g("Action"), g("Adventure"), g("Sci-Fi")])
    assert s["0000001"].text == "A farm boy joins a rebellion against an empire. An epic space adventure."
    assert s["0000002"].label == [g("Comedy")]  # Reality-TV dropped silently
    assert s["0000007"].label == sorted([g("Crime"), g("Film-Noir")])
    assert s["0000007"].image.endswith("dataset/0000007.jpeg")  # truncated, but exists
    assert absent_map(ds) == {
        "0000003": {"image": "missing_file"},
        "0000004": {"text": "empty_text"},
        "0000005": {"text": "non_utf8_text"},
        "0000006": {"text": "missing_field"},
    }
    assert ds.problems == collections.Counter(
        missing_file=1, empty_text=1, non_utf8_text=1, missing_field=1)
    check_images(ds)


def test_mmimdb_missing_split_file(tmp_path):
    shutil.copytree(fixture("mmimdb"), tmp_path / "mm")
    os.remove(tmp_path / "mm" / "split.json")
    with pytest.raises(DatasetError, match="split.json"):
        open_dataset("mmimdb", str(tmp_path / "mm"))


def test_mmimdb_bad_json_names_file_and_line(tmp_path):
    shutil.copytree(fixture("mmimdb"), tmp_path / "mm")
    (tmp_path / "mm" / "dataset" / "0000008.json").write_text('{"plot": ["x"],\n "genres": [}\n')
    with pytest.raises(DatasetError, match=r"0000008\.json line 2: invalid JSON"):
        open_dataset("mmimdb", str(tmp_path / "mm"))


def test_mmimdb_id_in_two_splits_is_duplicate(tmp_path):
    shutil.copytree(fixture("mmimdb"), tmp_path / "mm")
    split = tmp_path / "mm" / "split.json"
    split.write_text(split.read_text().replace('"test": ["0000009"', '"test": ["0000001"'))
    with pytest.raises(DatasetError, match=r"duplicate_id: id '0000001' .*train\[0\].*test\[0\]"):
        open_dataset("mmimdb", str(tmp_path / "mm"))


# --------------------------------------------------------------------------- Food-101


def test_food101():
    ds = open_dataset("food101", fixture("food101"), val_fraction=0.0)
    assert (ds.name, ds.task, ds.classes) == ("food101", "multiclass", ["apple_pie", "pizza", "sushi"])
    train = [f"{c}_{i}" for c in ds.classes for i in range(4)]
    test = [f"{c}_100" for c in ds.classes] + ["tacos_0"]
    assert [s.id for s in ds.samples] == train + test
    assert [s.split for s in ds.samples] == ["train"] * 12 + ["test"] * 4
    assert [s.label for s in ds.samples] == [0] * 4 + [1] * 4 + [2] * 4 + [0, 1, 2, -1]
    s = by_id(ds)
    assert s["apple_pie_3"].text == 'Grandma\'s "Best" Apple Pie, Easy'
    assert s["pizza_1"].image.endswith("images/train/pizza/pizza_1.jpg")  # undecodable, but exists
    assert s["sushi_2"].image is not None  # zero bytes, but exists
    assert absent_map(ds) == {"apple_pie_2": {"text": "missing_field"}, "tacos_0": {"image": "missing_file"}}
    assert ds.problems == collections.Counter(
        missing_field=1, unknown_label=1, missing_file=1, unlisted_image=1)
    check_images(ds)


def val_ids(root, **options) -> set[str]:
    return {s.id for s in open_dataset("food101", root, **options).samples if s.split == "val"}


def test_food101_val_carve_is_deterministic_and_disjoint():
    root = fixture("food101")
    ds = open_dataset("food101", root)  # defaults: val_fraction=0.1, seed=0
    assert {s.id for s in ds.samples if s.split == "val"} == {"apple_pie_1"}
    half = open_dataset("food101", root, val_fraction=0.5, seed=0)
    again = open_dataset("food101", root, val_fraction=0.5, seed=0)
    assert [(s.id, s.split) for s in half.samples] == [(s.id, s.split) for s in again.samples]
    val = {s.id for s in half.samples if s.split == "val"}
    train = {s.id for s in half.samples if s.split == "train"}
    assert val and train and not val & train
    assert val | train == {s.id for s in ds.samples if s.split != "test"}  # carved from train only
    assert not any(s.split == "val" and s.id.endswith("_100") for s in half.samples)
    assert val != val_ids(root, val_fraction=0.5, seed=1)  # the seed matters
    assert val_ids(root, val_fraction=0.5, seed=0) < val_ids(root, val_fraction=0.9, seed=0)


def test_food101_val_carve_ignores_row_order(tmp_path):
    root = tmp_path / "food"
    shutil.copytree(fixture("food101"), root)
    csv_path = root / "texts" / "train_titles.csv"
    lines = csv_path.read_bytes().splitlines(keepends=True)
    csv_path.write_bytes(b"".join(reversed(lines)))
    assert val_ids(str(root), val_fraction=0.5) == val_ids(fixture("food101"), val_fraction=0.5)


def test_food101_header_and_shared_file_names(tmp_path):
    root = tmp_path / "food"
    shutil.copytree(fixture("food101"), root)
    test_csv = root / "texts" / "test_titles.csv"
    # optional header; a test file named like a train file of another class
    test_csv.write_bytes(b"image_path,text,food\n" + test_csv.read_bytes() + b"pizza_0.jpg,Sushi named pizza,sushi\n")
    shutil.copy(root / "images" / "train" / "sushi" / "sushi_0.jpg", root / "images" / "test" / "sushi" / "pizza_0.jpg")
    ds = open_dataset("food101", str(root), val_fraction=0.0)
    s = by_id(ds)
    assert "image_path" not in s and len(ds.samples) == 17
    assert s["sushi/pizza_0"].split == "test" and s["sushi/pizza_0"].label == 2
    assert s["pizza/pizza_0"].split == "train" and s["pizza/pizza_0"].label == 1
    assert s["sushi/pizza_0"].image.endswith("images/test/sushi/pizza_0.jpg")


# --------------------------------------------------------------------------- Hateful Memes


def test_hateful_memes():
    ds = open_dataset("hateful_memes", fixture("hateful_memes"))
    assert (ds.name, ds.task, ds.classes) == ("hateful_memes", "binary", ["not_hateful", "hateful"])
    test_ids = ["1235", "40002", "40003"]
    assert [s.id for s in ds.samples] == [str(i) for i in range(10001, 10009)] + ["20001", "20002"] + test_ids
    assert [s.split for s in ds.samples] == ["train"] * 8 + ["val"] * 2 + ["test"] * 3  # dev_seen, not dev_unseen
    assert [s.label for s in ds.samples] == [0, 0, 1, 0, -1, 1, 0, 1, 0, 1, -1, -1, -1]
    s = by_id(ds)
    assert s["1235"].image.endswith("img/01235.png")
    assert s["10004"].image.endswith("img/10004.png")  # truncated, but exists
    assert s["20002"].text == "when the wifi goes down"
    assert absent_map(ds) == {
        "10003": {"image": "missing_file"},
        "10006": {"text": "non_utf8_text"},
        "10007": {"image": "missing_field"},
        "10008": {"text": "empty_text"},
    }
    assert ds.problems == collections.Counter(
        missing_file=1, unknown_label=1, non_utf8_text=1, missing_field=1, empty_text=1)
    check_images(ds)


def test_hateful_memes_needs_every_split(tmp_path):
    shutil.copytree(fixture("hateful_memes"), tmp_path / "hm")
    os.remove(tmp_path / "hm" / "test.jsonl")
    with pytest.raises(DatasetError, match="test_seen.jsonl, test.jsonl, test_unseen.jsonl"):
        open_dataset("hateful_memes", str(tmp_path / "hm"))


# --------------------------------------------------------------------------- manifest


def test_manifest_jsonl():
    ds = open_dataset("manifest", fixture("manifest", "manifest.jsonl"))
    assert (ds.name, ds.task, ds.classes) == ("manifest", "multiclass", ["bird", "cat", "dog"])
    assert ds.source == fixture("manifest", "manifest.jsonl")
    assert [s.id for s in ds.samples] == [f"m{i:02d}" for i in range(1, 11)]
    assert [s.split for s in ds.samples] == ["train"] * 6 + ["val"] * 2 + ["test"] * 2
    assert [s.label for s in ds.samples] == [1, 2, 0, 1, 2, 0, 1, 2, -1, 1]
    s = by_id(ds)
    assert s["m10"].text == 'the "fat" cat, again'
    assert s["m01"].image == fixture("manifest", "images", "m01.png")
    assert s["m08"].image == fixture("manifest", "images", "m08.jpg")  # zero bytes, but exists
    assert absent_map(ds) == {
        "m03": {"image": "missing_field"},
        "m04": {"text": "missing_field"},
        "m05": {"text": "empty_text"},
        "m06": {"text": "non_utf8_text"},
        "m07": {"image": "missing_file"},
    }
    assert ds.problems == collections.Counter(missing_field=2, empty_text=1, non_utf8_text=1, missing_file=1)
    check_images(ds)


@pytest.mark.parametrize("stem", ["manifest", "multilabel"])
def test_manifest_csv_and_jsonl_agree(stem):
    from_jsonl = open_dataset("manifest", fixture("manifest", f"{stem}.jsonl"))
    from_csv = open_dataset("manifest", fixture("manifest", f"{stem}.csv"))
    assert from_csv.samples == from_jsonl.samples
    assert (from_csv.task, from_csv.classes, from_csv.problems) == (
        from_jsonl.task, from_jsonl.classes, from_jsonl.problems)


def test_manifest_multilabel():
    ds = open_dataset("manifest", fixture("manifest", "multilabel.csv"))
    assert (ds.task, ds.classes) == ("multilabel", ["bird", "cat", "dog"])
    assert [s.label for s in ds.samples] == [[1, 2], [0], [], [0, 1, 2], [1]]
    only = open_dataset("manifest", fixture("manifest", "multilabel.jsonl"), classes=["dog", "cat"])
    assert [s.label for s in only.samples] == [[0, 1], [], [], [0, 1], [1]]
    assert only.problems["unknown_label"] == 2  # "bird" twice


def test_manifest_classes_option():
    ds = open_dataset("manifest", fixture("manifest", "manifest.csv"), classes=["dog", "cat"])
    assert (ds.task, ds.classes) == ("binary", ["dog", "cat"])
    assert [s.label for s in ds.samples] == [1, 0, -1, 1, 0, -1, 1, 0, -1, 1]
    assert ds.problems["unknown_label"] == 2  # the two birds; m09 is unlabeled, not unknown


def test_manifest_absolute_image_path_and_numeric_labels(tmp_path):
    image = fixture("manifest", "images", "m01.png")
    path = tmp_path / "m.jsonl"
    path.write_text("".join(
        f'{{"id": "a{i}", "image": "{image}", "text": "t", "label": {label}, "split": "train"}}\n'
        for i, label in enumerate([10, 2, 2, 10])))
    ds = open_dataset("manifest", str(path))
    assert ds.classes == ["2", "10"] and ds.task == "binary"
    assert [s.label for s in ds.samples] == [1, 0, 0, 1]
    assert ds.samples[0].image == image


def test_manifest_jsonl_line_breaks(tmp_path):
    path = tmp_path / "m.jsonl"
    text = "line\u2028separator and \x85 next-line"  # both split by str.splitlines
    path.write_bytes(('{"id": "a", "text": "%s", "split": "train"}\r\n\n{"id": "b", "split": "test"}\n' % text)
                     .encode("utf-8"))
    ds = open_dataset("manifest", str(path))
    assert [(s.id, s.text, s.label) for s in ds.samples] == [("a", text, -1), ("b", None, -1)]
    assert ds.samples[1].absent == {"image": "missing_field", "text": "missing_field"}


def test_food101_given_val_split(tmp_path):
    root = tmp_path / "food"
    shutil.copytree(fixture("food101"), root)
    (root / "texts" / "val_titles.csv").write_text("pizza_7.jpg,Pizza from the val folder,pizza\n")
    (root / "images" / "val" / "pizza").mkdir(parents=True)
    shutil.copy(root / "images" / "train" / "pizza" / "pizza_0.jpg", root / "images" / "val" / "pizza" / "pizza_7.jpg")
    ds = open_dataset("food101", str(root), val_fraction=0.9)  # ignored: val is given
    assert [s.id for s in ds.samples if s.split == "val"] == ["pizza_7"]
    assert sum(s.split == "train" for s in ds.samples) == 12
    with pytest.raises(ValueError, match="val_fraction"):
        open_dataset("food101", fixture("food101"), val_fraction=1.5)


@pytest.mark.parametrize("name, match", [
    ("duplicate_ids.jsonl", r"duplicate_id: id 'd1' .*duplicate_ids\.jsonl line 1 .*duplicate_ids\.jsonl line 3"),
    ("malformed.jsonl", r"malformed\.jsonl line 2: invalid JSON"),
    ("no_id.csv", r"no_id\.csv line 1: header has no 'id' column"),
])
def test_bad_manifests_raise(name, match):
    with pytest.raises(DatasetError, match=match):
        open_dataset("manifest", fixture("bad", name))


@pytest.mark.parametrize("content, match", [
    ('{"id": "a", "split": "holdout"}\n', r"line 1: invalid split 'holdout'"),
    ('{"id": "a", "split": "train"}\n{"text": "no id", "split": "train"}\n', r"line 2: missing id"),
    ('{"id": "a", "split": "train"}\n[1, 2]\n', r"line 2: expected a JSON object"),
])
def test_manifest_invalid_rows_raise(tmp_path, content, match):
    path = tmp_path / "m.jsonl"
    path.write_text(content)
    with pytest.raises(DatasetError, match=match):
        open_dataset("manifest", str(path))


def test_manifest_csv_wrong_field_count(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text('id,text,split\na,"two\nlines",train\nb,x,train,extra\n')
    with pytest.raises(DatasetError, match=r"m\.csv line 4: expected 3 fields, got 4"):
        open_dataset("manifest", str(path))


# --------------------------------------------------------------------------- demo and generator


def test_demo_dataset():
    ds = open_dataset("manifest", os.path.join(DATA, "demo", "manifest.jsonl"))
    assert ds.classes == ["blue_food", "blue_sports", "red_food", "red_sports"]
    assert len(ds.samples) == 1300 and not ds.problems
    assert collections.Counter(s.split for s in ds.samples) == {"train": 800, "val": 200, "test": 300}
    labeled = [s for s in ds.samples if s.label >= 0]
    assert collections.Counter(s.split for s in labeled) == {"train": 150, "val": 200, "test": 300}
    for split in SPLITS:  # every class in every split
        assert {s.label for s in labeled if s.split == split} == {0, 1, 2, 3}
    # the label's topic is the text's; the text's time of day follows the label's colour 90% of the time
    sports = ("playing", "watching", "training for")
    assert all(s.text.startswith(sports) == ds.classes[s.label].endswith("sports") for s in labeled)
    evening = ("in the evening", "at night", "after sunset")
    agree = np.mean([s.text.endswith(evening) == ds.classes[s.label].startswith("red") for s in labeled])
    assert 0.85 < agree < 0.95  # the text informative about the colour, not sufficient
    check_images(ds)


def test_data_folder_is_small():
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(DATA) for f in files)
    # icons ~1.9 MiB, the demo ~2.7 MiB (1,300 rows, so that its 300 test rows resolve a 0.01 difference)
    assert total < 5 * 1024 * 1024


def test_make_fixtures_is_deterministic(tmp_path):
    spec = importlib.util.spec_from_file_location("make_fixtures", os.path.join(DATA, "make_fixtures.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--out", str(tmp_path)])

    def files(root):
        return sorted(os.path.relpath(os.path.join(d, f), root)
                      for d, _, names in os.walk(root) for f in names if f != "README.md")

    def decoded(path):
        """Pixels, or None for the deliberately broken image files."""
        try:
            with Image.open(path) as image:
                return np.asarray(image.convert("RGB"), dtype=np.int16)
        except (OSError, ValueError):
            return None

    for folder in ("fixtures", "demo"):
        committed, fresh = os.path.join(DATA, folder), str(tmp_path / folder)
        assert files(fresh) == files(committed)
        for rel in files(committed):
            a_path, b_path = os.path.join(committed, rel), os.path.join(fresh, rel)
            if rel.lower().endswith((".jpg", ".jpeg", ".png")):
                # Image bytes depend on the Pillow version's encoders: compare what a reader sees instead.
                a, b = decoded(a_path), decoded(b_path)
                assert (a is None) == (b is None), rel
                if a is not None:
                    assert a.shape == b.shape and np.abs(a - b).mean() < 3, rel
            else:
                with open(a_path, "rb") as a, open(b_path, "rb") as b:
                    assert a.read() == b.read(), rel
