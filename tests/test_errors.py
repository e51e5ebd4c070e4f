"""User errors: every stage raises an EmbcacheError subclass, which the CLI prints as one line; anything else is a
bug and keeps its traceback."""
import ast
import io
import pathlib
import traceback

import click
import numpy as np
import pytest
from click.testing import CliRunner

from embcache import store as st
from embcache.bench import synthetic
from embcache.bundle import BundleError
from embcache.config import FitError
from embcache.datasets import DatasetError
from embcache.encoders import EncoderError
from embcache.errors import EmbcacheError
from embcache.extract import ExtractError
from embcache.interchange import InterchangeError
from embcache.prompts import PromptError
from embcache.store import IncompleteStoreError, StoreError
from embcache.tune import TuneError

from embcache.cli.main import main as cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "data" / "fixtures"
DEMO = ROOT / "data" / "demo" / "manifest.jsonl"
SMALL_FIT = ["--epochs", "1", "--predictor-hidden", "16", "--classifier-hidden", "16", "--quiet"]


def user_error(args, expected: type[EmbcacheError]) -> EmbcacheError:
    """Run the command; it must stop with `expected` (possibly as the cause of another stage's error) and show it
    as the one line `Error: <message>`, exit code 1. Returns the error the command raised."""
    result = CliRunner().invoke(cli, [str(a) for a in args], standalone_mode=False)
    assert isinstance(result.exception, click.ClickException), repr(result.exception)
    raised, chain = result.exception.__cause__, []
    error = raised
    while error is not None:
        chain.append(error)
        error = error.__cause__
    assert isinstance(raised, EmbcacheError) and any(isinstance(e, expected) for e in chain), chain
    shown = io.StringIO()
    result.exception.show(file=shown)
    assert result.exception.exit_code == 1 and shown.getvalue() == f"Error: {raised}\n", shown.getvalue()
    assert "\n" not in str(raised)
    return raised


@pytest.fixture(scope="module")
def features_store(tmp_path_factory):
    return synthetic.make_store(str(tmp_path_factory.mktemp("stores") / "s.zarr"), n_train=200, n_val=50, n_test=50)


@pytest.fixture
def unfinished_store(tmp_path):
    url = str(tmp_path / "half.zarr")
    st.create_store(url, ids=["x"], split=np.zeros(1), labels=np.zeros(1, np.int64), dataset={"name": "toy"},
                    task={"type": "multiclass", "classes": ["a"]},
                    encoders={m: {"backend": "npy", "model": m, "dim": 4, "dtype": "float32"} for m in ("image", "text")},
                    reasons=["present", "missing_field"])
    return url


def test_every_stage_error_is_an_embcache_error_and_still_a_value_error():
    for error in (DatasetError, EncoderError, TuneError, ExtractError, StoreError, IncompleteStoreError,
                  InterchangeError, FitError, PromptError, BundleError):
        assert issubclass(error, EmbcacheError) and issubclass(error, ValueError), error
    assert issubclass(IncompleteStoreError, StoreError) and issubclass(PromptError, FitError)


@pytest.mark.parametrize("path", sorted((ROOT / "embcache").rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_error_class_bypasses_the_base(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    bypassing = [node.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef)
                 and any(isinstance(base, ast.Name) and base.id in ("ValueError", "Exception") for base in node.bases)]
    assert bypassing == [] or path.name == "errors.py" and bypassing == ["EmbcacheError"], bypassing


def test_datasets_malformed_metadata(tmp_path):
    error = user_error(["extract", "--dataset", "manifest", "--root", FIXTURES / "bad" / "duplicate_ids.jsonl",
                        "--out", tmp_path / "s.zarr"], DatasetError)
    assert "d1" in str(error) and not (tmp_path / "s.zarr").exists()


def test_encoders_bad_spec(tmp_path):
    error = user_error(["extract", "--dataset", "manifest", "--root", DEMO, "--image-encoder", "efficientnet",
                        "--out", tmp_path / "s.zarr", "--workers", "0"], EncoderError)
    assert "backend:model" in str(error)


def test_tune_no_training_rows(tmp_path):
    error = user_error(["tune", "--dataset", "manifest", "--root", DEMO, "--modality", "text",
                        "--train-missing-rate", "1", "--train-missing-type", "text", "--out", tmp_path / "b.safetensors"],
                       TuneError)
    assert "no labeled training row" in str(error)


def test_extract_no_samples(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    error = user_error(["extract", "--dataset", "manifest", "--root", empty, "--out", tmp_path / "s.zarr"],
                       ExtractError)
    assert "no samples" in str(error)


def test_store_not_a_store_and_unfinished(tmp_path, unfinished_store):
    (tmp_path / "folder").mkdir()
    user_error(["export-features", tmp_path / "folder", "--to", tmp_path / "f.h5"], StoreError)
    error = user_error(["export-features", unfinished_store, "--to", tmp_path / "half.h5"], IncompleteStoreError)
    assert "did not finish" in str(error)


def test_interchange_refuses_to_overwrite(tmp_path, features_store):
    (tmp_path / "f.h5").write_text("keep me")
    error = user_error(["export-features", features_store, "--to", tmp_path / "f.h5"], InterchangeError)
    assert "--overwrite" in str(error) and (tmp_path / "f.h5").read_text() == "keep me"


def test_fit_unusable_inputs(tmp_path, features_store, unfinished_store):
    error = user_error(["fit", features_store, "--out", features_store, "--overwrite", *SMALL_FIT], FitError)
    assert "is the input store" in str(error)
    error = user_error(["fit", unfinished_store, "--out", tmp_path / "run", *SMALL_FIT], IncompleteStoreError)
    assert isinstance(error, FitError) and "--allow-partial" in str(error)  # the isinstance check in data.py


def test_prompts_more_layers_than_the_encoder_has():
    error = user_error(["bench", "fit", "--predictor", "prompts", "--cache-layers", "99", "--n-train", "100",
                        "--dim", "384", "--epochs", "1"], PromptError)
    assert "--cache-layers 99" in str(error) and "blocks" in str(error)


def test_bundle_not_a_bundle(tmp_path):
    fake = tmp_path / "model.embcache"
    fake.write_text("not a zip")
    error = user_error(["predict", fake, "--manifest", DEMO, "--out", tmp_path / "p.jsonl"], BundleError)
    assert "not an embcache bundle" in str(error)


def test_an_unexpected_error_keeps_its_traceback(tmp_path, features_store, monkeypatch):
    def library_bug(*args, **kwargs):
        raise ValueError("a library bug, not a user error")

    monkeypatch.setattr("embcache.cli.interchange.export_features", library_bug)
    result = CliRunner().invoke(cli, ["export-features", features_store, "--to", str(tmp_path / "f.h5")])
    assert type(result.exception) is ValueError and "Error:" not in result.output
    assert traceback.extract_tb(result.exc_info[2])[-1].name == "library_bug"  # the whole traceback, to the bug
