#!/usr/bin/env bash
# One device call (<= 10 min on an H200) for what awaits a GPU: the KIVI kernel reading the
# layer-stacked cache in place (arm scan vs sliced), the in-place stacked matmul
# (kernel tilings vs XLA's sliced scan vs cuBLAS on unstacked matrices; then whole decode steps
# with it), and the 4096-token sweep from batch 32 (prefill in row slices: KIVI-2 batch 128 and
# 256 have not run yet). Results land in $OUT (the device tool brings them back) or
# benchmarks/results.
#   KIVI_COMMIT=<sha> PYTHONPATH=. bash benchmarks/gpu_smoke.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="${PYTHONPATH:-.}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 120 python -m benchmarks.stacked_matmul 2>&1 | grep -v "^WARNING" | grep "|" | tail -24
timeout 110 python -m benchmarks.decode_step_ab --layers 32 --caches dense,kivi2 --arms scan,sliced,pallas 2>&1 \
    | grep -v "^WARNING" | cut -c1-300
rm -f "${OUT:-benchmarks/results}"/decode-step-*.hlo.txt
timeout 330 python -m benchmarks.e2e --skip-paper --skip-hf --skip-compile-check --sweep-start 32 --budget-s 320 \
    2>&1 | grep -v "^WARNING\|@@" | grep "|\|->\|sweep_" | tail -20
