"""What every command shares about where it runs and how it writes: the device, the process ranks under
torchrun, and atomic outputs."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

_UMASK = os.umask(0)  # read the process umask once (os.umask can only be read by setting it)
os.umask(_UMASK)


def resolve_device(name: str) -> torch.device:
    """`auto` = the GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def bind_local_cuda_device(device: torch.device) -> torch.device:
    """Under torchrun, make this process's own GPU the current CUDA device; call before any CUDA work.

    torchrun starts one process per GPU and sets LOCAL_RANK; without `torch.cuda.set_device`, every process
    would allocate, launch (Triton included) and build its NCCL communicator on cuda:0. For a bare "cuda"
    device with LOCAL_RANK set, this sets and returns cuda:<LOCAL_RANK> (modulo the visible GPUs, so more
    processes than GPUs share them round-robin; NCCL refuses that, gloo does not). An explicit index
    ("cuda:1") is kept and made current. CPU devices, and processes without LOCAL_RANK (not under
    torchrun), are returned as they are, without touching CUDA.
    """
    local_rank = os.environ.get("LOCAL_RANK")
    if device.type != "cuda" or local_rank is None:
        return device
    if device.index is None:
        count = torch.cuda.device_count()
        if count == 0:
            raise RuntimeError("--device cuda under torchrun, but no CUDA device is visible")
        device = torch.device("cuda", int(local_rank) % count)
    torch.cuda.set_device(device)
    return device


@dataclass
class Ranks:
    """This process's place in a job run by several processes (torchrun sets RANK / WORLD_SIZE)."""

    rank: int = 0
    world: int = 1
    owns_group: bool = False            # this job initialised the process group (and destroys it)

    @classmethod
    def from_env(cls, device: torch.device) -> "Ranks":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        owns = False
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
            owns = True
        return cls(torch.distributed.get_rank(), torch.distributed.get_world_size(), owns)

    def steps(self, steps: int) -> range:
        """The steps of an epoch's schedule this process runs: a contiguous 1/world share."""
        share = steps // self.world
        return range(self.rank * share, (self.rank + 1) * share)

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def broadcast(self, value):
        """Rank 0's `value` on every rank (any picklable object)."""
        if self.world <= 1:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.owns_group:
            torch.distributed.destroy_process_group()


def replace_path(tmp: str | os.PathLike, out: str | os.PathLike) -> None:
    """Put `tmp` (a file or a folder) at `out` by a rename. os.replace cannot put anything over a non-empty
    folder, so a folder at `out` is renamed aside first, put back if the rename fails, and deleted after."""
    out = Path(out)
    old = None
    if out.is_dir() and not out.is_symlink():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_file(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside `path`; on success it replaces `path`, on any error it is removed.

    Readers never see a half-written file, and a failed run leaves no debris. The folder is created if needed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the mode a plain open() would
        replace_path(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def staged_dir(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `out`; on success it replaces `out` (`replace_path`), on any error
    it is removed."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield tmp
        tmp.chmod(0o777 & ~_UMASK)  # mkdtemp makes 0700; give the folder the mode a plain mkdir would
        replace_path(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def looks_like_run(path: Path) -> bool:
    """A folder `embcache fit` wrote (one seed's run, or the seed-* runs of --seeds)."""
    return (path / "config.json").exists() or any(path.glob("seed-*/config.json"))


__all__ = ["resolve_device", "bind_local_cuda_device", "Ranks", "staged_file", "looks_like_run"]


def save_safetensors(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str]) -> None:
    """`safetensors.torch.save_file`, with the header written in sorted key order. The library writes the metadata
    in hash-map order, which changes from one call to the next, so the same content gave other bytes and another
    sha256, and a store fingerprinted with the file's sha256 refused a rewritten but identical file."""
    from safetensors.torch import save

    blob = save(tensors, metadata=metadata)
    n = int.from_bytes(blob[:8], "little")
    header = json.dumps(json.loads(blob[8:8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the data stays 8-byte aligned, as the library writes it
    with open(path, "wb") as fh:
        fh.write(len(header).to_bytes(8, "little") + header + blob[8 + n:])
