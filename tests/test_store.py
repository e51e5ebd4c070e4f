import numpy as np
import pytest
import zarr

from embcache import store as st

ENCODERS = {"image": {"backend": "timm", "model": "timm:x", "checkpoint_sha256": "a" * 64, "dim": 4,
                      "dtype": "float16"},
            "text": {"backend": "hf", "model": "hf:y", "checkpoint_sha256": "b" * 64, "dim": 3,
                     "dtype": "float32"}}


def make(url, chunk_rows=2, task=None, labels=None):
    task = task or {"type": "binary", "classes": ["no", "yes"]}
    labels = np.array([0, 1, -1]) if labels is None else labels
    return st.create_store(url, ids=["a", "b", "c"], split=np.array([0, 1, 2]), labels=labels,
                           dataset={"name": "toy", "source": "/x"}, task=task, encoders=ENCODERS,
                           reasons=["present", "missing_file"], chunk_rows=chunk_rows)


def test_roundtrip_through_plain_zarr_and_the_reader(tmp_path):
    url = str(tmp_path / "s.zarr")
    root = make(url)
    emb = np.arange(12, dtype=np.float32).reshape(3, 4)
    st.write_rows(root, "image", 0, emb[:2], np.array([True, True]), np.array([0, 0], np.uint8))
    st.write_rows(root, "image", 2, emb[2:], np.array([False]), np.array([1], np.uint8))
    st.mark_complete(root, {"missing_file": 1})

    raw = zarr.open_group(url, mode="r")  # the documented layout, read without embcache
    meta = raw.attrs["embcache"]
    assert meta["format"] == 1 and meta["complete"] and meta["problems"] == {"missing_file": 1}
    assert raw["image/emb"].dtype == np.float16 and raw["text/emb"].dtype == np.float32
    assert raw["image/emb"].chunks == (2, 4)
    assert list(raw["image"].attrs["reasons"]) == ["present", "missing_file"]

    features = st.open_store(url).load()
    assert list(features.ids) == ["a", "b", "c"]
    assert features.split.tolist() == [0, 1, 2] and features.labels.tolist() == [0, 1, -1]
    np.testing.assert_array_equal(features.emb["image"], emb)
    assert features.present["image"].tolist() == [True, True, False]
    assert features.present["text"].tolist() == [False, False, False]  # never written: absent, not garbage


def test_multilabel_labels_are_a_uint8_matrix(tmp_path):
    labels = np.array([[1, 0, 1], [0, 0, 0], [0, 1, 0]], dtype=np.uint8)
    make(str(tmp_path / "m.zarr"), task={"type": "multilabel", "classes": ["x", "y", "z"]}, labels=labels)
    raw = zarr.open_group(str(tmp_path / "m.zarr"), mode="r")
    assert raw["labels"].dtype == np.uint8 and raw["labels"].shape == (3, 3)


def test_reader_refuses_incomplete_unknown_format_and_non_stores(tmp_path):
    url = str(tmp_path / "s.zarr")
    root = make(url)
    with pytest.raises(st.StoreError, match="did not finish"):
        st.open_store(url)
    assert st.open_store(url, require_complete=False).n_rows == 3
    meta = dict(root.attrs["embcache"], format=99)
    root.attrs["embcache"] = meta
    with pytest.raises(st.StoreError, match="format 99"):
        st.open_store(url)
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    with pytest.raises(st.StoreError, match="not an embcache store"):
        st.open_store(str(tmp_path / "plain.zarr"))
    with pytest.raises(st.StoreError, match="not a readable"):
        st.open_store(str(tmp_path / "nothing-here.zarr"))


def test_fingerprint_diff_names_the_changed_fields(tmp_path):
    make(str(tmp_path / "s.zarr"))
    old = st.read_meta(str(tmp_path / "s.zarr"))["fingerprint"]
    changed = {**ENCODERS, "text": {**ENCODERS["text"], "pooling": "cls", "versions": {"torch": "9"}}}
    new = st.fingerprint({"dataset": {"name": "toy", "n_rows": 3}}, changed)
    assert st.fingerprint_diff(old, new) == ["text.pooling: None -> 'cls'"]  # versions do not count
    assert st.fingerprint_diff(old, old) == []
    assert st.read_meta(str(tmp_path / "missing.zarr")) is None


def test_unknown_task_and_dtype_are_refused(tmp_path):
    with pytest.raises(st.StoreError, match="task type"):
        make(str(tmp_path / "a.zarr"), task={"type": "regression", "classes": []})
    bad = {"image": {**ENCODERS["image"], "dtype": "int8"}}
    with pytest.raises(st.StoreError, match="dtype"):
        st.create_store(str(tmp_path / "b.zarr"), ids=["a"], split=np.array([0]), labels=np.array([0]),
                        dataset={"name": "t"}, task={"type": "binary", "classes": ["n", "y"]}, encoders=bad,
                        reasons=["present"])
