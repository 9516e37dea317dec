#!/usr/bin/env bash
# One device call (<= 10 min on an H200) that checks and times what landed since the last GPU run:
# the compiled kernel against the reference, the kernel's tuning knobs, and the paper-setting
# decode step with its profile (dense and KIVI-2). Results land in $OUT (the device tool
# brings them back) or benchmarks/results.
#   KIVI_COMMIT=<sha> PYTHONPATH=. bash benchmarks/gpu_smoke.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="${PYTHONPATH:-.}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 150 python -m benchmarks.check_kernel_gpu --quick 2>&1 | grep -v "^WARNING" | tail -20
timeout 100 python -m benchmarks.kernel_tuning 2>&1 | grep -v "^WARNING" | tail -16
timeout 320 python -m benchmarks.e2e --paper-caches dense,kivi2 --skip-hf --skip-sweep --skip-compile-check \
    --profile-step --budget-s 300 2>&1 | grep -v "^WARNING\|@@" | grep "|\|profile\|MISSED\|->" | tail -20
