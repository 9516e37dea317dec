#!/usr/bin/env bash
# A device call (about 9 min on an H200; the timeouts sum to 560 s) for what awaits a GPU:
#  0. the compiled check of the KIVI kernel with the magic-number dequantization (the default
#     on GPU) and with integer->float conversions, the dense kernel, the >2^31-element /
#     stacked-in-place cases;
#  1. the decode-attention target shape and rows of mixed lengths (the paper's batch at 256 and
#     512 tokens), whole calls next to dense; the breakdown (kernel only, magic and convert);
#  2. one decode step, dense and KIVI-2, traced per kernel;
#  3. the paper setting end to end (dense, KIVI-2).
# What sessions 39-41 left pending ran in sessions 42-43: extend's cuDNN attention on BNTH operands,
# the row_writes bounds mask and sessions 40-41's test files compiled (gpu-tests-run144-146, an H100),
# the dense continuation at capacity 16384 (continuation-gpu-run155-156-dense, an H200).
# Then, as separate calls (each <= 10 min). Session 23 ran the issue's decode-attention grid with the
# Mosaic path in three calls (python -m benchmarks.decode_attention --no-breakdown --kv-heads 32
# --bits-mha 2 --budget-s 470; --kv-heads 8; --bits-mha 4 --budget-s 220: 4.5 / 6.3 / ~1.5 min) and a
# whole call kernel by kernel (--trace, ~50 s; with XLA_FLAGS=--xla_gpu_enable_command_buffer= it
# names the kernels). Long context end to end: e2e --skip-paper --skip-hf --skip-compile-check
# --sweep-prompts 16384 --sweep-caches kivi2m --sweep-start 64 --sweep-cap 64 --child-timeout 280
# --budget-s 290 (~2.5 min; --sweep-start applies to every cache: dense starts at 8 alone).
# Sliding windows: mosaic_attention --sliding --rounds 5 (~3.5 min with its checks), decode_attention
# --sliding (~1 min).
# mosaic_attention --auto-layout: what KIVIConfig()'s "auto" resolves to on the machine (~40 s).
# The test suite on the GPU: python -m benchmarks.gpu_tests --name runNN --budget-s 540 (file groups,
# kernel-side first, each its own pytest run; the summary survives the call's limit). Whole suite
# ~10 min at -n 6-7 (run94: 200 + 193 s + tests/models): two calls, --groups kernels,attention then
# --groups library,models,tools.
# mosaic_attention --quick --checks-only --kv-heads 32 needs more than 130 s (its sliding cache check);
# give it 300: since session 20 it also checks jax.vmap over requests compiled (check_vmap: the kernel
# under vmap vs float64, the whole MosaicKIVICache call batched vs unbatched; passed in run55).
# decode_step_ab at 4096 tokens needs --batch <= 64 and no dense cache (B=128 ran out of memory).
# The Mosaic kernel sits at 0.38-0.41 ms between calls (run26-run46; offsets, prefetch_bk, group4
# and 3 stages no faster: mosaic_attention --ab times variants in turns); a kernel change needs its
# baseline in the same call (.devtree_base, as run32).
# The PTX comes with MOSAIC_GPU_DUMP_PTX=1 MOSAIC_GPU_DUMP_PTXAS=1 MOSAIC_GPU_DUMP_TO=/tmp/d (mkdir
# first; tar it to $OUT): its ptxas report (body_0.ptxas) has the registers, and the triton wheel's
# ptxas (after `sed s/^.version 9.0/.version 8.7/`) and cuobjdump give the SASS offline.
# the prefill's memory of any cache: python -m benchmarks.prefill_memory (compile only, ~1 min);
# where generate's decode loop spends a step vs the same steps driven from Python (the loop's idle GPU
# time): python -m benchmarks.decode_loop_gap, then again with XLA_FLAGS=--xla_gpu_enable_command_buffer=
# --name decode-loop-gap-nocb (~2 min each);
#  - the Mosaic GPU kernel (pallas_kernels/kivi_mosaic.py): python -m benchmarks.mosaic_attention
#    --stages 2 --name mosaic-attention (~4 min: checks incl. GQA 2/4 and the MosaicKIVICache path,
#    the target shape with 32 and 8 KV heads next to the Triton kernel and dense, the whole call
#    and its plain-JAX window; --kv-heads 32 --skip-checks: ~2.5 min); --sweep (~3 min); --profile
#    (Mosaic's profiler, phases of a step). Registers and spills: MOSAIC_GPU_DUMP_PTXAS=1
#    MOSAIC_GPU_DUMP_TO=/tmp/d, then grep Used /tmp/d/*.ptxas;
#  - a decode step per kernel with the Mosaic cache: decode_step_ab --layers 32 --caches kivi2,kivi2m
#    --arms allpallas --trace (~1 min); long context end to end: e2e --skip-paper --skip-hf
#    --skip-compile-check --sweep-prompts 4096 --sweep-caches kivi2,kivi2m --sweep-start 128
#    --sweep-cap 128 (~5 min); at 16384 tokens a child needs more than 115 s (-run12-16k);
#  - the batches the time budget cut, each alone (a 200 s child timeout was not enough for either,
#    e2e-2026-12-01-run7/-run8; a child killed after its warm-up generate now still counts as fitting): python -m benchmarks.e2e --skip-paper --skip-hf --skip-compile-check
#    --sweep-caches kivi2 --sweep-start 256 --child-timeout 540 --budget-s 560 (4096 tokens: batch
#    256 fits, 132.6 GiB, e2e-2026-12-01-run11-mosaic, but its timed call was never reached), and
#    --sweep-prompts 16384 --sweep-start 64 (likewise, batch 64);
#  - decode_step_ab --writes xla,pallas / decode_attention --quick (mixed-length rows) after any
#    change to the cache writes or the ring;
#  - HF needs `python -m pip install --no-deps $PWD/.whl/optimum_quanto-0.2.7-py3-none-any.whl`
#    first (carry .whl; plain `pip` installed it where `python` did not see it).
#   KIVI_COMMIT=<sha> PYTHONPATH=. bash benchmarks/gpu_smoke.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="${PYTHONPATH:-.}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# rows print as dicts as they pass (kept: a timeout still shows how far it got)
timeout 200 python -m benchmarks.check_kernel_gpu --variants swap --quick 2>&1 | grep -v "^WARNING" \
    | grep "'ok'\|passed\|Error" | cut -c1-150 | tail -24
timeout 60 python -m benchmarks.check_kernel_gpu --variants swap/convert --quick --only "k2v2,k4v2,sinks4" --skip-large \
    --name kernel-check-convert 2>&1 \
    | grep -v "^WARNING" | grep "'ok'\|passed\|Error" | cut -c1-150 | tail -6
timeout 130 python -m benchmarks.decode_attention --quick --name decode-attention-quick 2>&1 \
    | grep -v "^WARNING" | grep "^|" | head -24
XLA_FLAGS=--xla_gpu_enable_command_buffer= timeout 90 python -m benchmarks.decode_step_ab --layers 32 \
    --caches dense,kivi2 --arms allpallas --trace --tag=-magic-trace 2>&1 | grep -v "^WARNING" \
    | grep "step_ms\|^GPU kernel" | cut -c1-260
timeout 80 python -m benchmarks.e2e --skip-hf --skip-sweep --skip-compile-check --paper-caches dense,kivi2 --budget-s 75 2>&1 \
    | grep -v "^WARNING\|bfc_allocator" | grep "^|\|^- " | tail -8
rm -f "${OUT:-benchmarks/results}"/decode-step-*.hlo.txt "${OUT:-benchmarks/results}"/partial-rows.json
