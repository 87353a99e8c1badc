#!/usr/bin/env bash
# One prepared GPU check (bench/gpu_check.py): bf16 vs fp8 tokens/s and MFU at d12 and d20, measured vs
# predicted peak memory, decode tokens/s, and a 2-rank NCCL step when there are 2+ GPUs. One table,
# printed row by row; results in $OUT (or a temp folder) as gpu_check.json and gpu_check.txt.
#   bash bench/gpu_check.sh            # on the GPU machine, from the repository root (~6-8 min)
#   bash bench/gpu_check.sh --quick    # tiny CPU version of the same code paths (~30 s)
# PYTHON overrides the interpreter (default python3).
set -u
cd "$(dirname "$0")/.." || exit 2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
exec "${PYTHON:-python3}" bench/gpu_check.py "$@"
