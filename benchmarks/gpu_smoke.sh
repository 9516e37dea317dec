#!/usr/bin/env bash
# First device call of a session (about 9 min on an H200; the timeouts sum to 560 s) for what awaits a GPU:
#  0. the compiled check of the KIVI kernel with the residual ring inside it (781aff9: only the
#     interpret-mode tests and the e2e runs have exercised it), the dense kernel, and the
#     >2^31-element / stacked-in-place cases: if a ring case fails, set kivi_window.supported
#     to return False (the plain-JAX window) until it is fixed;
#  1. the decode-attention target shape, whole call (kernel + ring) next to dense;
#  2. one decode step, traced per kernel (where the KIVI-2 step goes with the fused ring);
#  3. the paper setting end to end (dense, KIVI-2).
# Then, as separate calls (each <= 10 min): the 4096-token sweep from batch 64 (batch 128 was cut
# by the time budget in run14: python -m benchmarks.e2e --skip-paper --skip-hf
# --skip-compile-check --sweep-start 64 --budget-s 540), 16384 (--sweep-prompts 16384
# --sweep-start 4), the full decode-attention sweep (python -m benchmarks.decode_attention),
# HF again (carry .whl).
#   KIVI_COMMIT=<sha> PYTHONPATH=. bash benchmarks/gpu_smoke.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="${PYTHONPATH:-.}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# rows print as dicts as they pass (kept: a timeout still shows how far it got)
timeout 240 python -m benchmarks.check_kernel_gpu --variants swap --quick 2>&1 | grep -v "^WARNING" \
    | grep "'ok'\|passed\|Error" | cut -c1-160 | tail -32
timeout 90 python -m benchmarks.decode_attention --quick --name decode-attention-quick-ring 2>&1 \
    | grep -v "^WARNING" | grep "|" | head -12
XLA_FLAGS=--xla_gpu_enable_command_buffer= timeout 90 python -m benchmarks.decode_step_ab --layers 32 \
    --caches kivi2 --arms allpallas --trace --tag=-ring-trace 2>&1 | grep -v "^WARNING" | cut -c1-200 | head -20
timeout 140 python -m benchmarks.e2e --skip-hf --skip-sweep --skip-compile-check --paper-caches dense,kivi2 --budget-s 130 2>&1 \
    | grep -v "^WARNING\|bfc_allocator" | grep "^|\|^- " | tail -8
rm -f "${OUT:-benchmarks/results}"/decode-step-*.hlo.txt
