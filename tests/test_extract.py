"""The extract pipeline on every fixture format, with small random encoders (and once with the defaults)."""
import json
import os

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from embcache import datasets as ds
from embcache import store as st
from embcache.cli.main import main as cli
from embcache.extract import ExtractConfig, ExtractError, extract, load_encoders
from tiny_encoders import tiny_extract_options

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "data", "fixtures")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_extract_options(tmp_path_factory.mktemp("enc"))


def run(tiny, dataset, root, out, **kw):
    cfg = ExtractConfig(dataset=dataset, root=root, out=str(out), workers=kw.pop("workers", 0), **tiny, **kw)
    return cfg, extract(cfg, progress=False, log=lambda *_: None)


def reasons_by_id(store, modality):
    names = store.reasons(modality)
    return {i: names[c] for i, c in zip(store.ids(), store.reason_codes(modality)) if c}


@pytest.mark.parametrize("name,root,decode_failures", [
    ("mmimdb", "mmimdb", {"0000007": "truncated_image"}),
    ("food101", "food101", {"pizza_1": "undecodable_image", "sushi_2": "undecodable_image"}),
    ("hateful_memes", "hateful_memes", {"10004": "truncated_image"}),
    ("manifest", "manifest/manifest.jsonl", {"m08": "undecodable_image"}),
])
def test_each_fixture_format_extracts_with_every_row_kept(tiny, tmp_path, name, root, decode_failures):
    root = os.path.join(FIXTURES, root)
    dataset = ds.open_dataset(name, root)
    _, report = run(tiny, name, root, tmp_path / "s.zarr", batch_size=3, chunk_rows=4)
    store = st.open_store(str(tmp_path / "s.zarr"))

    assert list(store.ids()) == [s.id for s in dataset.samples]  # every row kept, in reader order
    assert store.meta["complete"] and store.task_type == dataset.task and store.classes == dataset.classes
    assert store.split().tolist() == [st.SPLIT_CODES[s.split] for s in dataset.samples]
    image_reasons = reasons_by_id(store, "image")
    for sample in dataset.samples:
        expected = sample.absent.get("image") or decode_failures.get(sample.id)
        assert image_reasons.get(sample.id) == expected, sample.id
        assert reasons_by_id(store, "text").get(sample.id) == sample.absent.get("text"), sample.id
    for modality in ("image", "text"):
        present = store.present(modality)
        emb = store.embeddings(modality)
        assert np.all(np.abs(emb[present]).sum(1) > 0) and np.all(emb[~present] == 0)
        assert report.present[modality] == int(present.sum())
    expected_problems = dict(dataset.problems)
    for reason in decode_failures.values():
        expected_problems[reason] = expected_problems.get(reason, 0) + 1
    assert store.meta["problems"] == expected_problems


def test_cached_embeddings_equal_the_encoders_run_one_by_one(tiny, tmp_path):
    root = os.path.join(FIXTURES, "manifest", "manifest.jsonl")
    cfg, _ = run(tiny, "manifest", root, tmp_path / "s.zarr", batch_size=4, workers=2, dtype="float32")
    store = st.open_store(str(tmp_path / "s.zarr"))
    encoders = load_encoders(cfg)
    dataset = ds.open_dataset("manifest", root)
    cpu = torch.device("cpu")
    from PIL import Image

    for row, sample in enumerate(dataset.samples):
        if store.present("image")[row]:
            pixels = encoders["image"].preprocess(Image.open(sample.image))[None]
            np.testing.assert_allclose(store.embeddings("image")[row], encoders["image"].encode(pixels, cpu)[0],
                                       rtol=1e-4, atol=1e-4)
        if store.present("text")[row]:
            tokens = encoders["text"].preprocess([sample.text])
            np.testing.assert_allclose(store.embeddings("text")[row], encoders["text"].encode(tokens, cpu)[0],
                                       rtol=1e-4, atol=1e-4)


def test_chunking_and_batching_do_not_change_the_result(tiny, tmp_path):
    root = os.path.join(FIXTURES, "mmimdb")
    run(tiny, "mmimdb", root, tmp_path / "a.zarr", batch_size=3, chunk_rows=4)
    run(tiny, "mmimdb", root, tmp_path / "b.zarr", batch_size=16, chunk_rows=1024)
    a, b = zarr.open_group(str(tmp_path / "a.zarr")), zarr.open_group(str(tmp_path / "b.zarr"))
    assert a["image/emb"].chunks == (4, a["image/emb"].shape[1])
    for path in ("image/emb", "image/present", "text/emb", "text/reason", "labels"):
        np.testing.assert_array_equal(a[path][:], b[path][:])
    assert a["labels"].shape == (10, 23)  # MM-IMDb: 23 genres, multilabel


def test_rerun_refuses_other_encoders_and_skips_a_finished_store(tiny, tmp_path):
    root = os.path.join(FIXTURES, "hateful_memes")
    out = tmp_path / "s.zarr"
    run(tiny, "hateful_memes", root, out)
    _, again = run(tiny, "hateful_memes", root, out)
    assert again.skipped
    with pytest.raises(ExtractError, match="text.pooling: 'mean' -> 'cls'.*--overwrite"):
        run(tiny, "hateful_memes", root, out, text_pooling="cls")
    assert st.open_store(str(out)).encoder("text")["pooling"] == "mean"  # the old store is untouched
    run(tiny, "hateful_memes", root, out, text_pooling="cls", overwrite=True)
    assert st.open_store(str(out)).encoder("text")["pooling"] == "cls"


def test_cli_with_the_offline_default_encoders(tmp_path):
    out = tmp_path / "d.zarr"
    result = CliRunner().invoke(cli, ["extract", "--dataset", "manifest", "--root",
                                      os.path.join(FIXTURES, "manifest", "manifest.jsonl"),
                                      "--out", str(out), "--quiet", "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert "wrote 10 rows" in result.output and "undecodable_image 1" in result.output
    store = st.open_store(str(out))
    assert store.encoder("image")["dim"] == 1280 and store.encoder("text")["dim"] == 384
    assert store.encoder("text")["pooling"] == "mean" and store.root["image/emb"].dtype == np.float16


def test_cli_malformed_metadata_stops_with_a_clear_error_and_writes_nothing(tmp_path):
    out = tmp_path / "d.zarr"
    result = CliRunner().invoke(cli, ["extract", "--dataset", "manifest", "--root",
                                      os.path.join(FIXTURES, "bad", "duplicate_ids.jsonl"), "--out", str(out)])
    assert result.exit_code == 1 and "d1" in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_bench_extract_reports_pipeline_and_pure_throughput(tiny, tmp_path):
    from embcache.bench.extract import run_extract_bench

    cfg = ExtractConfig(dataset="manifest", root=os.path.join(FIXTURES, "manifest", "manifest.jsonl"), out="",
                        workers=0, batch_size=4, **tiny)
    result = run_extract_bench(cfg)
    assert result["samples"] == 10 and result["batch_size"] == 4
    assert result["pipeline_samples_per_s"] > 0 and result["pure_forward_samples_per_s"] > 0
    assert result["ratio"] == pytest.approx(result["pipeline_samples_per_s"] / result["pure_forward_samples_per_s"],
                                            rel=0.01)
    json.dumps({k: v for k, v in result.items() if k != "table"})


def test_a_folder_that_is_not_a_store_is_never_replaced(tiny, tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("important")
    root = os.path.join(FIXTURES, "manifest", "manifest.jsonl")
    for overwrite in (False, True):
        with pytest.raises(ExtractError, match="not an embcache store"):
            run(tiny, "manifest", root, precious, overwrite=overwrite)
    assert (precious / "thesis.txt").read_text() == "important"


def test_rerun_on_changed_data_is_refused(tiny, tmp_path):
    source = tmp_path / "m.jsonl"
    original = open(os.path.join(FIXTURES, "manifest", "manifest.jsonl"), "rb").read()  # has non-UTF-8 bytes
    base = os.path.join(FIXTURES, "manifest").encode()
    source.write_bytes(original.replace(b'"images/', b'"' + base + b"/images/"))
    run(tiny, "manifest", str(source), tmp_path / "s.zarr")
    source.write_bytes(source.read_bytes().replace(b"sleeping", b"sleepin!"))  # same rows and size, other text
    with pytest.raises(ExtractError, match="samples_sha256"):
        run(tiny, "manifest", str(source), tmp_path / "s.zarr")


def test_unknown_reader_option_and_bad_numbers_are_clean_cli_errors(tmp_path):
    base = ["extract", "--dataset", "food101", "--root", os.path.join(FIXTURES, "food101"), "--out",
            str(tmp_path / "s.zarr")]
    result = CliRunner().invoke(cli, base + ["--option", "foo=1"])
    assert result.exit_code == 1 and "foo" in result.output and "Traceback" not in result.output
    for flag in ("--batch-size", "--chunk-rows", "--limit"):
        result = CliRunner().invoke(cli, base + [flag, "0"])
        assert result.exit_code == 2 and flag in result.output
    assert not (tmp_path / "s.zarr").exists()
