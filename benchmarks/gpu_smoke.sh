#!/usr/bin/env bash
# First device call of a session (<= 10 min on an H200) for what awaits a GPU:
#  1. the KIVI kernel reading the layer-stacked cache in place: decode_step_ab arms scan (in
#     place) vs sliced (per-layer slices, as before) -- compiled, so it also checks that the
#     in-place kernel lowers on the device's jax;
#  2. the in-place stacked matmul: kernel tilings vs XLA's sliced scan vs cuBLAS on unstacked
#     matrices, and whole steps with it (arm pallas);
#  3. kernel knobs incl. the "swap" variant (dequantized tiles as the dots' first operands),
#     each checked against the first configuration's output;
#  4. the decode-attention benchmark's target shape (the consecutive layout's whole-call times).
# Then, as separate calls: the 4096-token sweep from batch 32 (about 7 min:
#   python -m benchmarks.e2e --skip-paper --skip-hf --skip-compile-check --sweep-start 32 --budget-s 540)
# and the paper setting with HF (about 5 min, carry .whl; see benchmarks/e2e.py) plus --mistral.
#   KIVI_COMMIT=<sha> PYTHONPATH=. bash benchmarks/gpu_smoke.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="${PYTHONPATH:-.}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 170 python -m benchmarks.decode_step_ab --layers 32 --caches dense,kivi2 --arms scan,sliced,pallas 2>&1 \
    | grep -v "^WARNING" | cut -c1-300
rm -f "${OUT:-benchmarks/results}"/decode-step-*.hlo.txt
timeout 120 python -m benchmarks.stacked_matmul 2>&1 | grep -v "^WARNING" | grep "|" | tail -24
timeout 110 python -m benchmarks.kernel_tuning 2>&1 | grep -v "^WARNING" | tail -20
timeout 150 python -m benchmarks.decode_attention --quick 2>&1 | grep -v "^WARNING" | grep "|" | tail -20
