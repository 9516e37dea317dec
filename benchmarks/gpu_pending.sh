#!/usr/bin/env bash
# The first device call of the next session that gets an H200 (about 9 min): the figures of record,
# last taken at session 37's tree (run125/126/134), re-taken at HEAD. Sessions 38-43 changed the
# quantizer's rounding, the kernels' derivative wrappers, the row-writes mask, greedy's reducer and
# the layout rule (GQA from 576 tokens); on an H100 the paper step was unchanged (run147/148).
#  1. decode attention at the issue's target shape (B=64, T=4096, 32 heads, 2-bit), whole calls next
#     to dense bf16 in the same run, and the issue's grid's rows at B=64 for 8 KV heads;
#  2. the paper setting end to end (prompt 160 + 338 new, batch 96), Llama-2-7B and Mistral-7B shapes,
#     dense vs KIVI-2 (KIVIConfig()'s layout) vs KIVI-4, without the HF baselines (they need the quanto
#     wheel carried: see benchmarks/e2e.py).
# On an H100 the same figures are that card's, not the H200's of record: name the card in the results.
# Session 44 ran it twice on H100s (results/*h100-run157*, *h100-run158*): the H200 re-take is still to do.
# Done in session 43 (results/*run151*-*run156*): the layout thresholds on both cards (MHA on an H100
# from 640 tokens confirmed; GQA from 576 on both) and the dense continuation at 16384 tokens.
#   NAME=runNN KIVI_COMMIT=<sha> bash benchmarks/gpu_pending.sh     (results under $OUT)
# Also pending on any GPU (sessions 45-46, not yet compiled): the magic-number tile rule, the in-kernel
# layer clamps, the Triton kernels' unscaled q with the scale on the products and l from the rounded p
# (session 46; its timing at the target shape is this script's first line, against run157/158):
#   python -m benchmarks.gpu_tests --name runNN-s46 --files tests/test_api_audit.py,tests/test_kernel_audit.py,\
#   tests/test_pallas_kernels.py,tests/test_dense_kernels_audit.py,tests/test_kivi_append.py,tests/test_cache_mosaic.py
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="${PYTHONPATH:-.}"
NAME="${NAME:-pending}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 150 python -m benchmarks.decode_attention --no-breakdown --kv-heads 32 --batches 64 --lengths 4096 \
    --bits-mha 2 --budget-s 140 --name "decode-attention-target-$NAME" 2>&1 | grep "^|" | head -8
timeout 100 python -m benchmarks.decode_attention --no-breakdown --kv-heads 8 --batches 64 --lengths 4096 \
    --budget-s 90 --name "decode-attention-gqa-$NAME" 2>&1 | grep "^|" | head -8
timeout 300 python -m benchmarks.e2e --mistral --skip-hf --skip-sweep --skip-compile-check --budget-s 290 \
    --out "${OUT:-benchmarks/results}" 2>&1 | grep -v "^WARNING\|bfc_allocator" | grep "^|\|^- " | tail -12
rm -f "${OUT:-benchmarks/results}"/decode-step-*.hlo.txt "${OUT:-benchmarks/results}"/partial-rows.json
