#!/usr/bin/env bash
# One-call GPU check of the VICReg Triton kernels (issue 4), for a machine with a CUDA GPU.
#   bash scripts/gpu_check_kernels.sh            # from the repository root; results go to $OUT
# Writes to $OUT (default ./gpu_check_out): env.txt, pytest.log, junit.xml, bench.log, bench.json.
# Budget: tests about 1-2 min; bench (6 sizes x fp32/tf32/bf16, compile budget 120 s) about 4-6 min.
# Override: BENCH_ARGS="--dtypes bf16 --sizes 256x8192" bash scripts/gpu_check_kernels.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu_check_out}"
PY="${PYTHON:-python}"
mkdir -p "$OUT"

# embcache.kernels / embcache.cli map to kernels/ and cli/ through setup.cfg: install editable if needed.
if ! "$PY" -c "import embcache.kernels, embcache.cli" 2>/dev/null; then
  "$PY" -m pip install --no-deps --no-build-isolation -e . >"$OUT/pip.log" 2>&1 \
    || echo "editable install failed, see $OUT/pip.log" >&2
fi

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__); print('float32 matmul precision:', torch.get_float32_matmul_precision(), 'allow_tf32:', torch.backends.cuda.matmul.allow_tf32)"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# Correctness: compiled Triton (not the interpreter) on CUDA tensors, including the GPU-size tests.
TRITON_INTERPRET=0 timeout 300 "$PY" -m pytest tests/test_vicreg_kernel.py -q -rs \
  --junitxml="$OUT/junit.xml" 2>&1 | tee "$OUT/pytest.log" | tail -25
test_rc=${PIPESTATUS[0]}

# Bench: every variant at the issue's sizes; fp32 with TF32 off and on, and bf16.
TRITON_INTERPRET=0 timeout 420 "$PY" -m embcache.cli.bench_kernels --device cuda \
  --dtypes fp32,tf32,bf16 --compile-budget 120 --json "$OUT/bench.json" ${BENCH_ARGS:-} 2>&1 \
  | tee "$OUT/bench.log" | grep -v "^W"
bench_rc=${PIPESTATUS[0]}

echo "pytest rc=$test_rc bench rc=$bench_rc (results in $OUT)"
exit $(( test_rc != 0 || bench_rc != 0 ))
