#!/usr/bin/env bash
# The batch-size table on a GPU (issue 15, part 4): `dyntree bench --batch-size 1,2,4,8,16,32` in bf16 (and
# fp16), plain decoding (ar) against the static and dynamic trees, greedy exactness measured per sequence.
#
# The GPU image has torch + transformers but not `gguf`, so the model cannot be converted there from the
# GGUF file dyntree ships with: it is loaded from a Hugging Face directory instead (dyntree's loader takes any
# local HF directory). Two ways to get one there:
#
#   MODEL_DIR=/path/to/hf-dir benchmarks/gpu_batch_sweep.sh run      # a machine that already has the model
#
#   benchmarks/gpu_batch_sweep.sh pack      # here, on a machine with dyntree's default model (and gguf):
#                                           # the model in bf16 as a HF directory (~270 MB), tarred and split
#                                           # into .gpu_model/parts/part-NN of at most 60 MiB each (git-ignored)
#   then carry the parts to the GPU machine (with the device tool: at most 64 MiB travels per call, and a warm
#   machine keeps what earlier calls carried, so carry one part per call, back to back, e.g.
#   carry=[".gpu_model/parts/part-00"], command "ls .gpu_model/parts"), and finally
#   benchmarks/gpu_batch_sweep.sh run       # there: checks and unpacks the parts, then runs the sweep
#
# run's settings (environment): DTYPES="bfloat16 float16" (default: bfloat16 only: each dtype is one sweep of
# about 4-6 minutes on an H200 for 32 prompts x 128 tokens), BATCHES=1,2,4,8,16,32, PER_CATEGORY=4 (MT-Bench:
# 8 categories -> 32 prompts, enough for batch 32), MAX_NEW=128, METHODS="ar,static,dynamic,dynamic:n=auto",
# DEVICE=cuda, HEADS (default: the trained heads bundled in dyntree/assets).
# Outputs in $OUT (the device tool's folder; else bench-out/): per dtype the table (gpu-<dtype>-batch_sweep.md,
# the lines to paste into BENCHMARKS.md), its plot (.png), the log, and every run's results as a .tar.gz.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PARTS=.gpu_model/parts
PART_SIZE=60m

pack() {
  local src=${1:-default} dir=.gpu_model/model
  rm -rf .gpu_model && mkdir -p "$dir" "$PARTS"
  "$PY" - "$src" "$dir" <<'EOF'
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dyntree.loading import load_model

source, target = sys.argv[1], sys.argv[2]
model_dir = load_model(source, dtype="float32").model_dir  # the default model: converted from GGUF once, cached
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
model.save_pretrained(target)
AutoTokenizer.from_pretrained(model_dir).save_pretrained(target)
print(f"exported {model_dir} in bfloat16 to {target}")
EOF
  tar -C .gpu_model -cf - model | split -b "$PART_SIZE" -d - "$PARTS/part-"
  (cd "$PARTS" && sha256sum part-* > SHA256SUMS)
  rm -rf "$dir"
  ls -l "$PARTS"
  echo "carry each of $PARTS/part-* (and $PARTS/SHA256SUMS) to the GPU machine, then run: $0 run"
}

unpack() {
  local target=${TMPDIR:-/tmp}/dyntree-gpu-model
  if [ ! -f "$PARTS/SHA256SUMS" ]; then
    echo "no MODEL_DIR and no $PARTS/SHA256SUMS: set MODEL_DIR to a Hugging Face directory or carry the parts" \
         "made by '$0 pack'" >&2
    exit 2
  fi
  if ! (cd "$PARTS" && sha256sum --quiet -c SHA256SUMS) >&2; then
    echo "model parts missing or damaged (listed above): carry them again" >&2
    exit 2
  fi
  rm -rf "$target" && mkdir -p "$target"
  cat "$PARTS"/part-* | tar -C "$target" -xf -
  echo "$target/model"
}

run() {
  local model=${MODEL_DIR:-}
  [ -n "$model" ] || model=$(unpack)
  local out=${OUT:-bench-out} work=${TMPDIR:-/tmp}/dyntree-gpu-sweep
  local heads=${HEADS:-dyntree/assets/heads/smollm2-135m-instruct}
  local device=${DEVICE:-cuda}
  if [ "$device" = cuda ]; then
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible to torch')"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  fi
  mkdir -p "$out"
  for dtype in ${DTYPES:-bfloat16}; do
    rm -rf "$work-$dtype"
    "$PY" -m dyntree bench --methods "${METHODS:-ar,static,dynamic,dynamic:n=auto}" \
      --prompts "${PROMPTS:-mtbench}" --per-category "${PER_CATEGORY:-4}" --max-new-tokens "${MAX_NEW:-128}" \
      --batch-size "${BATCHES:-1,2,4,8,16,32}" --model "$model" --heads "$heads" --device "$device" \
      --dtype "$dtype" --kl-samples 0 --warmup 1 --out "$work-$dtype" 2>&1 | tee "$out/gpu-$dtype-log.txt"
    for f in batch_sweep.md batch_sweep.png; do
      [ -f "$work-$dtype/$f" ] && cp "$work-$dtype/$f" "$out/gpu-$dtype-$f"
    done
    tar -C "$work-$dtype" -czf "$out/gpu-$dtype-results.tar.gz" .
    cat "$out/gpu-$dtype-batch_sweep.md"
  done
}

case "${1:-}" in
  pack) pack "${2:-default}" ;;
  run) run ;;
  *) echo "usage: $0 pack [MODEL]   (here: export the model as bf16 HF-directory parts)" >&2
     echo "       $0 run            (on the GPU machine; MODEL_DIR=DIR to skip the parts)" >&2
     exit 2 ;;
esac
