"""embcache.runtime: the torchrun device binding (issue 12), with a fake multi-GPU CUDA; the atomic writes."""
import os
import pathlib

import pytest
import torch

from embcache import runtime
from embcache.runtime import replace_path, staged_dir, staged_file


@pytest.fixture
def fake_cuda(monkeypatch):
    """Two "GPUs" and a recorded set_device; nothing here touches a real CUDA runtime."""
    calls = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(torch.device(device)))
    return calls


@pytest.mark.parametrize("local_rank, expected", [("0", 0), ("1", 1), ("3", 1)])
def test_torchrun_rank_gets_its_own_gpu(fake_cuda, monkeypatch, local_rank, expected):
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    device = runtime.bind_local_cuda_device(torch.device("cuda"))
    assert device == torch.device("cuda", expected)
    assert fake_cuda == [torch.device("cuda", expected)]


def test_explicit_index_is_kept_under_torchrun(fake_cuda, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert runtime.bind_local_cuda_device(torch.device("cuda:0")) == torch.device("cuda", 0)
    assert fake_cuda == [torch.device("cuda", 0)]


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:1"])
def test_nothing_happens_outside_torchrun(fake_cuda, monkeypatch, device):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert runtime.bind_local_cuda_device(torch.device(device)) == torch.device(device)
    assert fake_cuda == []


def test_cpu_under_torchrun_is_left_alone(fake_cuda, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert runtime.bind_local_cuda_device(torch.device("cpu")) == torch.device("cpu")
    assert fake_cuda == []


def test_no_visible_gpu_under_torchrun_is_an_error(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(RuntimeError, match="no CUDA device"):
        runtime.bind_local_cuda_device(torch.device("cuda"))


def test_extract_binds_the_rank_device_before_loading_encoders(monkeypatch, tmp_path):
    """extract() asks for the rank's device first (on the CPU here: the binding returns it unchanged)."""
    from embcache import extract as ex

    seen = []

    def binding(device):
        seen.append(device)
        raise RuntimeError("stop here")

    monkeypatch.setattr(ex, "bind_local_cuda_device", binding)
    monkeypatch.setattr(ex, "load_encoders", lambda cfg: pytest.fail("encoders loaded before the device was bound"))
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"id": "a", "text": "hello", "label": 0, "split": "train"}\n')
    with pytest.raises(RuntimeError, match="stop here"):
        ex.extract(ex.ExtractConfig(dataset="manifest", root=str(manifest), out=str(tmp_path / "s.zarr"),
                                    device="cpu"), progress=False)
    assert seen == [torch.device("cpu")]


def test_staged_dir_replaces_a_folder_only_on_success(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with staged_dir(out) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("killed halfway")
    assert [p.name for p in out.iterdir()] == ["old.txt"]  # the finished work is kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no debris
    with staged_dir(out) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # the old folder, swapped aside, is gone


def test_replace_path_puts_the_old_folder_back_when_the_rename_fails(tmp_path, monkeypatch):
    out, new = tmp_path / "store", tmp_path / "new"
    out.mkdir()
    (out / "keep").write_text("x")
    new.mkdir()
    real = os.replace

    def failing(src, dst):
        if os.fspath(src) == os.fspath(new):
            raise OSError("disk full")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError):
        replace_path(new, out)
    assert (out / "keep").read_text() == "x"


def test_staged_file_writes_atomically(tmp_path):
    path = tmp_path / "a" / "metrics.json"
    with staged_file(path) as tmp:
        pathlib.Path(tmp).write_text("{}")
        assert not path.exists()  # readers never see a half-written file
    assert path.read_text() == "{}" and sorted(p.name for p in path.parent.iterdir()) == ["metrics.json"]
