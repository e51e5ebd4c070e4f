import os

# Triton reads TRITON_INTERPRET when a kernel is defined, so it must be set before any test module
# imports one. setdefault: a GPU run opts out with TRITON_INTERPRET=0 (scripts/gpu_check.sh).
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


import pytest  # noqa: E402 - after the environment defaults above


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run as fast on one thread, and are then immune to other processes competing for the cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
