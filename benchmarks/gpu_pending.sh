#!/usr/bin/env bash
# The first device call of the next session that gets one (about 9.5 min; the timeouts sum to
# 580 s): what sessions 39-41 changed and could not compile, then the one timing still missing.
#  1. the tests of those paths, compiled (gpu_tests sets XLA_PYTHON_CLIENT_PREALLOCATE=false: a bare
#     pytest -n 4 failed most tests in session 39): extend's cuDNN attention on [B, heads, T, D]
#     operands (attention._cudnn_bnth), the row-writes kernel's bounds mask (session 40), session
#     41's kernel paths under jax.grad (kivi_jax.derivatives: the decode, append and row-writes
#     kernels differentiated as their XLA references), the padded head_dim dispatch, the float16
#     scale rule inside the append kernels (quant.group_params), and the audit files of sessions 40-41;
#  2. a dense continuation at 16384 tokens (it ran out of memory in every way before the BNTH fix,
#     continuation-gpu-run141-dense; the README says "not yet timed");
#  3. a 32-layer decode step after the mask and the derivative wrappers, dense and KIVI-2 in both layouts
#     (the row writes and appends are in every step; the forward program should be unchanged).
#   KIVI_COMMIT=<sha> NAME=runNN bash benchmarks/gpu_pending.sh     (results under $OUT)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="${PYTHONPATH:-.}"
NAME="${NAME:-pending}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 200 python -m benchmarks.gpu_tests --name "$NAME-paths" --budget-s 190 \
    --files tests/test_attention.py,tests/test_extend.py,tests/test_prefill_chunk.py,tests/test_row_writes.py,tests/test_kivi_append.py,tests/test_cache_mosaic.py \
    --select "cudnn or extend or chunk or does_not_copy or row_writes or writes or grad" 2>&1 | tail -15
timeout 130 python -m benchmarks.gpu_tests --name "$NAME-audits" --budget-s 120 \
    --files tests/test_sampling_audit.py,tests/test_checkpoint_cli_audit.py,tests/models/test_models_checkpoint.py,tests/test_kernel_audit.py,tests/test_quant_audit.py,tests/models/test_models_training_audit.py \
    2>&1 | tail -15
timeout 150 python -m benchmarks.continuation --model llama2-7b --dtype bfloat16 --batch 8 --prompt 2048 \
    --new 1024,64 --capacity 16384 --caches dense --ways extend_in_loop,extend_after,fresh_prefill --reps 2 \
    --out "${OUT:-benchmarks/results}" 2>&1 | tail -12
timeout 100 python -m benchmarks.decode_step_ab --layers 32 --caches dense,kivi2,kivi2m --arms allpallas \
    --tag="-$NAME-mask" 2>&1 | tail -8
