#!/usr/bin/env bash
# The device check: benchmarks/gpu_smoke.py on a lent GPU machine, as that machine is.
#
#   bash benchmarks/device_check.sh prepare     # here, once a session: the wheels it carries
#   bash benchmarks/device_check.sh run         # there: device tool `run`, carry [".device"]
#
# The lent machine has Python 3.12 and torch 2.11 with CUDA, pyarrow, safetensors, tokenizers,
# numpy, rich and einops, no network, no vLLM and no Ray; a call carries at most 64 MiB. What
# the project needs beyond that travels as wheels in .device/wheels (git ignores .device/):
# torchtitan and the three packages it imports at start-up (spmd_types, torch_checkpointing,
# tyro with docstring_parser and typeguard), and pyzmq (the run's buffer service). torchtitan
# 0.3.0 wants torch 2.13; gpu_smoke.py's _torch_compat covers what it misses on 2.11.
# `run` installs them under /tmp/site, runs every row of gpu_smoke.py --device cuda within
# 9 minutes and writes the table to $OUT/gpu_smoke.txt (the whole log to $OUT/gpu_smoke.log).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=.device/wheels
PYTHON=${PYTHON:-python3}

case "${1:-}" in
prepare)
  rm -rf "$WHEELS" && mkdir -p "$WHEELS"
  platforms=()
  for n in 17 27 28; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" --platform manylinux2014_x86_64 -d "$WHEELS" \
    torchtitan==0.3.0 spmd_types==0.2.3 torch_checkpointing==0.1.1 tyro==1.0.17 \
    docstring_parser==0.18.0 typeguard==4.6.1 pyzmq==27.3.0
  ls -l "$WHEELS" | awk 'NR > 1 {printf "%8.1f KiB  %s\n", $5 / 1024, $9}'
  du -sh "$WHEELS"
  ;;
run)
  [ -d "$WHEELS" ] || { echo "no $WHEELS: run 'prepare' here and carry .device" >&2; exit 2; }
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$WHEELS"/*.whl
  export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 WANDB_MODE=disabled
  out=${OUT:-/tmp}
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  status=0
  timeout 540 "$PYTHON" benchmarks/gpu_smoke.py --device cuda 2>&1 | tee "$out/gpu_smoke.log" \
    || status=$?
  grep -E '^(check|env|embedded|vllm|learner|vocab|30B|end to end) ' "$out/gpu_smoke.log" \
    > "$out/gpu_smoke.txt" || true
  exit "$status"
  ;;
*)
  echo "usage: $0 prepare|run" >&2
  exit 2
  ;;
esac
