#!/usr/bin/env bash
# First device call of a session (about 8 min on an H200; the timeouts sum to 580 s) for what awaits a GPU:
#  0. the compiled check of the kernel reading a stack of more than 2**32 bytes in place
#     (64-bit offsets; the guard that fell back to copied slices is gone): if it fails,
#     restore the size check in attention_pallas._in_place;
#  1. the decode-attention target shape with the default "swap" kernel (whole call: kernel +
#     residual window) next to "dequant" and dense bf16;
#  2. the paper setting end to end with swap (dense, KIVI-2; no HF: see e2e.py);
#  3. kernel knobs, incl. value scales stored tokens-minor (v_scales_t, a candidate cache layout);
#  4. dense decode with everything read in place (dense Pallas attention + stacked matmul, arm
#     allpallas) vs XLA's dense step: if faster, make it generate's dense default.
# Then, as separate calls (each <= 10 min): the full decode-attention sweep of issue #7
#   (python -m benchmarks.decode_attention), the 4096- and 16384-token e2e sweeps
#   (python -m benchmarks.e2e --skip-paper --skip-hf --skip-compile-check --sweep-start 32
#    --budget-s 540; then --sweep-prompts 16384 --sweep-start 4), HF again (carry .whl) and
#   --profile-step (where the KIVI-2 step goes now).
#   KIVI_COMMIT=<sha> PYTHONPATH=. bash benchmarks/gpu_smoke.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="${PYTHONPATH:-.}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 120 python -m benchmarks.check_kernel_gpu --variants swap --only "2^31" 2>&1 | grep -v "^WARNING" | tail -4
timeout 100 python -m benchmarks.decode_attention --quick --name decode-attention-quick-swap 2>&1 \
    | grep -v "^WARNING" | grep "|" | tail -20
timeout 150 python -m benchmarks.e2e --skip-hf --skip-sweep --skip-compile-check --paper-caches dense,kivi2 --budget-s 140 2>&1 \
    | grep -v "^WARNING\|bfc_allocator" | grep "^|\|^- " | tail -12
timeout 110 python -m benchmarks.kernel_tuning 2>&1 | grep -v "^WARNING" | tail -15
timeout 100 python -m benchmarks.decode_step_ab --layers 32 --caches dense --arms scan,allpallas --tag=-dense-allpallas \
    2>&1 | grep -v "^WARNING" | cut -c1-160
rm -f "${OUT:-benchmarks/results}"/decode-step-*.hlo.txt
