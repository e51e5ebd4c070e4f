import os

# Triton reads TRITON_INTERPRET when a kernel is defined, so it must be set before any test module
# imports one. setdefault: a GPU run opts out with TRITON_INTERPRET=0 (scripts/gpu_check_kernels.sh).
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
