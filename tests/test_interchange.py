"""export-features / import-features: HDF5 round trip, clip-retrieval folders, plain .npy + metadata."""
import importlib.util
import json
import os

import h5py
import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from embcache import store as st
from embcache.cli.interchange import export_features_command, import_features_command
from embcache.interchange import IMPORT_REASONS, InterchangeError, import_npy

ENCODERS = {"image": {"backend": "timm", "model": "timm:x", "checkpoint_sha256": "a" * 64, "bitfit_sha256": None,
                      "preprocess": {"size": 224}, "pooling": "avg", "dim": 6, "dtype": "float16", "versions": {}},
            "text": {"backend": "hf", "model": "hf:y", "checkpoint_sha256": "b" * 64, "bitfit_sha256": None,
                     "preprocess": {"max_length": 77}, "pooling": "cls", "dim": 4, "dtype": "float32",
                     "versions": {}}}
REASONS = ["present", "missing_field", "missing_file", "empty_text"]


def invoke(command, *args):
    return CliRunner().invoke(command, [str(a) for a in args])


# Hidden states as `extract --cache-layers 2` stores them: (tokens T, width W) per modality; text has a mask.
HIDDEN = {"image": (5, 3), "text": (7, 4)}


def make_store(url, n=23, task="multilabel", chunk_rows=5, seed=0, hidden=False):
    """A finished store with random embeddings, some absent rows and a partial last chunk.

    hidden: also cached hidden states (`<m>/hidden`, `text/hidden_mask`, encoder attrs `cache_layers` and
    `hidden_layer_index`), written the way extract writes them (docs/cache-format.md).
    """
    rng = np.random.default_rng(seed)
    classes = ["a", "b", "c"]
    labels = (rng.integers(0, 2, (n, 3)).astype(np.uint8) if task == "multilabel"
              else rng.integers(-1, 3, n).astype(np.int64))
    encoders = {m: {**enc, "cache_layers": 2, "hidden_layer_index": 4} if hidden else enc
                for m, enc in ENCODERS.items()}
    root = st.create_store(url, ids=[f"id-{i}-é" for i in range(n)], split=rng.integers(0, 3, n).astype(np.int8),
                           labels=labels, dataset={"name": "toy", "source": "/data/toy"},
                           task={"type": task, "classes": classes}, encoders=encoders, reasons=REASONS,
                           chunk_rows=chunk_rows)
    for m, enc in ENCODERS.items():
        present = rng.random(n) > 0.2
        emb = rng.standard_normal((n, enc["dim"])) * present[:, None]
        st.write_rows(root, m, 0, emb, present, np.where(present, 0, 2).astype(np.uint8))
        if hidden:
            tokens, width = HIDDEN[m]
            states = root[m].create_array("hidden", shape=(n, tokens, width), dtype="float16",
                                          chunks=(chunk_rows, tokens, width), fill_value=0)
            values = rng.standard_normal((n, tokens, width)) * present[:, None, None]
            if m == "text":  # real tokens first, zeros after them
                lengths = rng.integers(1, tokens + 1, n) * present
                mask = np.arange(tokens)[None, :] < lengths[:, None]
                root[m].create_array("hidden_mask", shape=(n, tokens), dtype="bool", chunks=(chunk_rows, tokens),
                                     fill_value=False)[:] = mask
                values = values * mask[:, :, None]
            states[:] = values.astype(np.float16)
    for chunk in range(st.n_chunks(n, chunk_rows)):
        st.mark_chunk_done(root, chunk)
    st.mark_complete(root, {"missing_file": 7}, extra={"extract": {"batch_size": 8}})
    return url


def assert_same_store(a_url, b_url):
    a, b = zarr.open_group(a_url, mode="r"), zarr.open_group(b_url, mode="r")
    assert a.attrs.asdict() == b.attrs.asdict()
    arrays = sorted(path for path, _ in a.members(max_depth=None) if isinstance(a[path], zarr.Array))
    assert arrays == sorted(path for path, _ in b.members(max_depth=None) if isinstance(b[path], zarr.Array))
    assert "chunks_done" in arrays and "image/emb" in arrays
    for path in arrays:
        x, y = a[path], b[path]
        assert (x.dtype, x.shape, x.chunks) == (y.dtype, y.shape, y.chunks), path
        np.testing.assert_array_equal(x[:], y[:], err_msg=path)
    for m in ("image", "text"):
        assert a[m].attrs.asdict() == b[m].attrs.asdict()


# ------------------------------------------------------------------------------------------------ HDF5
@pytest.mark.parametrize("task,hidden", [("multilabel", False), ("multiclass", False), ("multilabel", True)])
def test_hdf5_round_trip_restores_an_identical_store(tmp_path, task, hidden):
    src = make_store(str(tmp_path / "src.zarr"), task=task, hidden=hidden)
    h5_path, out = tmp_path / "features.h5", tmp_path / "back.zarr"
    result = invoke(export_features_command, src, "--to", h5_path)
    assert result.exit_code == 0, result.output
    result = invoke(import_features_command, "--from", h5_path, "--out", out)
    assert result.exit_code == 0, result.output
    assert_same_store(src, str(out))
    assert sorted(os.listdir(tmp_path)) == ["back.zarr", "features.h5", "src.zarr"]  # no .partial left
    back = st.open_store(str(out))
    assert back.hidden_modalities() == (["image", "text"] if hidden else [])
    if hidden:  # what `fit --predictor prompts` reads
        for m in HIDDEN:
            a, b = st.open_store(src).hidden(m), back.hidden(m)
            np.testing.assert_array_equal(a[0], b[0])
            assert (a[1] is None and b[1] is None) or (a[1] == b[1]).all()
        with h5py.File(h5_path, "r") as h5:
            assert h5["text/hidden"].shape == (23, *HIDDEN["text"]) and h5["text/hidden_mask"].dtype == bool
            assert h5["image/hidden"].chunks == (5, *HIDDEN["image"]) and "hidden_mask" not in h5["image"]


def test_hdf5_layout_is_readable_without_embcache(tmp_path):
    src = make_store(str(tmp_path / "src.zarr"))
    h5_path = tmp_path / "features.h5"
    invoke(export_features_command, src, "--to", h5_path)
    with h5py.File(h5_path, "r") as h5:
        meta = json.loads(h5.attrs["embcache"])
        assert meta["format"] == 1 and meta["complete"] and meta["modalities"] == ["image", "text"]
        assert h5["ids"].asstr()[0] == "id-0-é" and h5["split"].dtype == np.int8
        assert h5["labels"].shape == (23, 3) and h5["labels"].dtype == np.uint8
        assert h5["image/emb"].dtype == np.float16 and h5["text/emb"].shape == (23, 4)
        assert h5["image/present"].dtype == bool and h5["image/reason"].dtype == np.uint8
        assert json.loads(h5["text"].attrs["encoder"])["model"] == "hf:y"
        assert json.loads(h5["text"].attrs["reasons"]) == REASONS
        assert h5["image/emb"].chunks == (5, 6)  # streamed in the store's row chunks


def test_export_refuses_to_overwrite_and_unfinished_stores(tmp_path):
    src = make_store(str(tmp_path / "src.zarr"))
    h5_path = tmp_path / "features.h5"
    h5_path.write_text("keep me")
    result = invoke(export_features_command, src, "--to", h5_path)
    assert result.exit_code == 1 and "already exists; pass --overwrite" in result.output
    assert h5_path.read_text() == "keep me"
    assert invoke(export_features_command, src, "--to", h5_path, "--overwrite").exit_code == 0
    assert h5py.is_hdf5(h5_path)
    result = invoke(export_features_command, src, "--to", tmp_path / "new" / "f.h5")  # a folder not there yet
    assert result.exit_code == 0 and os.listdir(tmp_path / "new") == ["f.h5"], result.output

    st.create_store(str(tmp_path / "half.zarr"), ids=["x"], split=np.zeros(1), labels=np.zeros(1, np.int64),
                    dataset={"name": "toy"}, task={"type": "multiclass", "classes": ["a"]},
                    encoders=ENCODERS, reasons=REASONS)
    result = invoke(export_features_command, tmp_path / "half.zarr", "--to", tmp_path / "half.h5")
    assert result.exit_code == 1 and "did not finish" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "half.h5").exists() and not (tmp_path / "half.h5.partial").exists()


def test_hdf5_import_names_a_bad_file_and_rejects_npy_options(tmp_path):
    src = make_store(str(tmp_path / "src.zarr"))
    h5_path = tmp_path / "features.h5"
    invoke(export_features_command, src, "--to", h5_path)
    result = invoke(import_features_command, "--from", h5_path, "--out", tmp_path / "o.zarr", "--task", "binary")
    assert result.exit_code == 2 and "--task" in result.output
    with h5py.File(h5_path, "a") as h5:
        del h5["text/reason"]
    result = invoke(import_features_command, "--from", h5_path, "--out", tmp_path / "o.zarr")
    assert result.exit_code == 1 and "no 'text/reason' dataset" in result.output
    assert not (tmp_path / "o.zarr").exists()


# ------------------------------------------------------------------------------------------------ npy
def write_clip_retrieval(folder, n_parts=2, rows=30, seed=0, meta_ext=".csv"):
    """A clip-retrieval style output folder; returns (image, text) embeddings and the metadata rows."""
    rng = np.random.default_rng(seed)
    for sub in ("img_emb", "text_emb", "metadata"):
        (folder / sub).mkdir(parents=True)
    img = rng.standard_normal((n_parts * rows, 8)).astype(np.float32)
    txt = rng.standard_normal((n_parts * rows, 5)).astype(np.float32)
    img[3] = 0            # all zeros: what tools write for a missing image
    txt[4, 2] = np.nan    # not finite
    records = [{"image_path": f"images/{i:04d}.jpg", "caption": f"caption {i}", "label": ["cat", "dog"][i % 2],
                "split": "test" if i % 10 == 9 else "train", "has_text": "0" if i == 5 else "1"}
               for i in range(n_parts * rows)]
    for p in range(n_parts):
        part = slice(p * rows, (p + 1) * rows)
        np.save(folder / "img_emb" / f"img_emb_{p}.npy", img[part])
        np.save(folder / "text_emb" / f"text_emb_{p}.npy", txt[part])
        path = folder / "metadata" / f"metadata_{p}{meta_ext}"
        if meta_ext == ".csv":
            lines = [",".join(records[0])] + [",".join(r.values()) for r in records[part]]
            path.write_text("\n".join(lines) + "\n")
        else:
            path.write_text("".join(json.dumps(r) + "\n" for r in records[part]))
    return img, txt, records


@pytest.mark.parametrize("meta_ext", [".csv", ".jsonl"])
def test_clip_retrieval_folder_imports_and_loads(tmp_path, meta_ext):
    img, txt, records = write_clip_retrieval(tmp_path / "clip", meta_ext=meta_ext)
    out = tmp_path / "imported.zarr"
    result = invoke(import_features_command, "--from", tmp_path / "clip", "--out", out, "--dtype", "float32",
                    "--image-model", "open_clip:ViT-B-32", "--chunk-rows", 16)
    assert result.exit_code == 0, result.output
    assert "task binary (2 classes)" in result.output

    fs = st.open_store(str(out))
    data = fs.load()
    assert list(data.ids) == [r["image_path"] for r in records]  # no id/key column: image_path is the id
    assert data.task_type == "binary" and data.classes == ["cat", "dog"]
    assert data.labels.tolist() == [i % 2 for i in range(60)]
    assert data.split.tolist() == [2 if i % 10 == 9 else 0 for i in range(60)]
    assert np.flatnonzero(~data.present["image"]).tolist() == [3]
    assert np.flatnonzero(~data.present["text"]).tolist() == [4, 5]
    reasons = fs.reasons("text")
    assert reasons == list(IMPORT_REASONS)
    assert [reasons[c] for c in fs.reason_codes("text")[[4, 5]]] == ["nonfinite_embedding", "missing_field"]
    assert fs.reason_codes("image")[3] == reasons.index("zero_embedding")
    assert np.isfinite(data.emb["text"]).all() and not data.emb["text"][4].any()  # absent rows hold zeros
    np.testing.assert_array_equal(data.emb["image"][data.present["image"]], img[data.present["image"]])
    assert data.meta["problems"] == {"missing_field": 1, "nonfinite_embedding": 1, "zero_embedding": 1}

    enc = fs.encoder("image")
    assert enc["backend"] == "imported" and enc["model"] == "open_clip:ViT-B-32" and enc["dim"] == 8
    assert fs.encoder("text")["model"] == "text_emb"  # several parts: named after their folder
    assert len(enc["checkpoint_sha256"]) == 64 and enc["dtype"] == "float32"
    assert data.meta["dataset"]["layout"] == "clip-retrieval" and data.meta["chunk_rows"] == 16


def test_imported_store_trains_with_fit(tmp_path):
    torch = pytest.importorskip("torch")
    train = pytest.importorskip("embcache.train")
    from embcache.config import FitConfig

    write_clip_retrieval(tmp_path / "clip", n_parts=1, rows=120)
    out = tmp_path / "s.zarr"
    result = invoke(import_features_command, "--from", tmp_path / "clip", "--out", out, "--val-fraction", 0.2)
    assert result.exit_code == 0, result.output
    assert set(st.open_store(str(out)).split().tolist()) == {0, 1, 2}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = FitConfig(store=str(out), epochs=2, predictor_hidden=16, classifier_hidden=16, device="cpu")
        metrics = train.fit(cfg, tmp_path / "run", progress=False)
    finally:
        torch.set_num_threads(threads)
    assert metrics["task"] == "binary" and (tmp_path / "run" / "metrics.json").exists()


def test_plain_npy_files_with_multilabel_jsonl_metadata(tmp_path):
    rng = np.random.default_rng(1)
    np.save(tmp_path / "img.npy", rng.standard_normal((6, 4)).astype(np.float32))
    meta = tmp_path / "meta.jsonl"
    meta.write_text("".join(json.dumps({"key": f"k{i}", "labels": [["x"], ["x", "y"], [], ["z", "x"]][i % 4],
                                        "split": ["train", "dev", "test"][i % 3]}) + "\n" for i in range(6)))
    out = tmp_path / "ml.zarr"
    result = invoke(import_features_command, "--image-npy", tmp_path / "img.npy", "--metadata", meta,
                    "--out", out, "--classes", "z,y,x")
    assert result.exit_code == 0, result.output
    data = st.open_store(str(out)).load()
    assert data.task_type == "multilabel" and data.classes == ["z", "y", "x"]
    assert list(data.emb) == ["image"] and data.labels.tolist()[:4] == [[0, 0, 1], [0, 1, 1], [0, 0, 0], [1, 0, 1]]
    assert list(data.ids) == [f"k{i}" for i in range(6)] and data.split.tolist() == [0, 1, 2, 0, 1, 2]
    assert st.open_store(str(out)).root["image/emb"].dtype == np.float16  # the default dtype

    # an existing output is kept unless --overwrite
    result = invoke(import_features_command, "--image-npy", tmp_path / "img.npy", "--metadata", meta, "--out", out)
    assert result.exit_code == 1 and "already exists" in result.output
    result = invoke(import_features_command, "--image-npy", tmp_path / "img.npy", "--metadata", meta, "--out", out,
                    "--overwrite", "--dtype", "float32")
    assert result.exit_code == 0 and st.open_store(str(out)).root["image/emb"].dtype == np.float32


def test_val_fraction_is_a_stable_carve_of_train_rows(tmp_path):
    np.save(tmp_path / "t.npy", np.ones((400, 3), np.float32))
    (tmp_path / "m.csv").write_text("id,label\n" + "".join(f"r{i},{i % 3}\n" for i in range(400)))
    splits = []
    for run in range(2):
        out = str(tmp_path / f"{run}.zarr")
        import_npy(out, text=[str(tmp_path / "t.npy")], metadata=[str(tmp_path / "m.csv")], val_fraction=0.25)
        splits.append(st.open_store(out).split())
    np.testing.assert_array_equal(splits[0], splits[1])
    assert set(splits[0].tolist()) == {0, 1} and 60 < (splits[0] == 1).sum() < 140
    assert st.open_store(out).task_type == "multiclass"


def test_errors_name_the_problem(tmp_path):
    np.save(tmp_path / "a.npy", np.ones((5, 3), np.float32))
    (tmp_path / "m.csv").write_text("id,label\n" + "".join(f"r{i},{i % 2}\n" for i in range(4)))
    with pytest.raises(InterchangeError, match=r"metadata .*m.csv\) has 4 rows, the image embeddings have 5 "
                                               r"\(.*a.npy: 5\)"):
        import_npy(str(tmp_path / "o.zarr"), image=[str(tmp_path / "a.npy")], metadata=[str(tmp_path / "m.csv")])
    assert not os.path.exists(tmp_path / "o.zarr") and not os.path.exists(tmp_path / "o.zarr.partial")

    (tmp_path / "dup.csv").write_text("id,label\nr0,a\nr1,b\nr0,a\nr2,b\nr3,a\n")
    with pytest.raises(InterchangeError, match=r"duplicate id 'r0' at .*dup.csv row 1 and .*dup.csv row 3"):
        import_npy(str(tmp_path / "o.zarr"), image=[str(tmp_path / "a.npy")], metadata=[str(tmp_path / "dup.csv")])

    (tmp_path / "nolabel.csv").write_text("id\nr0\n")
    with pytest.raises(InterchangeError, match="exactly one of the columns 'label' or 'labels'"):
        import_npy(str(tmp_path / "o.zarr"), image=[str(tmp_path / "a.npy")],
                   metadata=[str(tmp_path / "nolabel.csv")])

    np.save(tmp_path / "big.npy", np.full((4, 3), 1e6, np.float32))
    with pytest.raises(InterchangeError, match="float16 range; use --dtype float32"):
        import_npy(str(tmp_path / "o.zarr"), image=[str(tmp_path / "big.npy")], metadata=[str(tmp_path / "m.csv")])

    (tmp_path / "clip" / "img_emb").mkdir(parents=True)
    (tmp_path / "clip" / "metadata").mkdir()
    np.save(tmp_path / "clip" / "img_emb" / "img_emb_1.npy", np.ones((2, 3), np.float32))
    result = invoke(import_features_command, "--from", tmp_path / "clip", "--out", tmp_path / "o.zarr")
    assert result.exit_code == 1 and "not numbered 0..0" in result.output

    if importlib.util.find_spec("pyarrow"):
        return  # parquet is readable here
    (tmp_path / "clip" / "img_emb" / "img_emb_1.npy").rename(tmp_path / "clip" / "img_emb" / "img_emb_0.npy")
    (tmp_path / "clip" / "metadata" / "metadata_0.parquet").write_bytes(b"PAR1")
    result = invoke(import_features_command, "--from", tmp_path / "clip", "--out", tmp_path / "o.zarr")
    assert result.exit_code == 1 and "needs pyarrow" in result.output and "--metadata" in result.output
    assert not os.path.exists(tmp_path / "o.zarr")
