#!/usr/bin/env bash
# The first device call of the next session that gets one (about 9 min; the timeouts sum to 540 s):
# what session 42 could not measure or compile. Sessions 39-41's paths and audit files ran compiled in runs
# 144-146 (an H100 80GB) and the paper setting's step was unchanged there (run147/148).
#  1. the layouts' crossover for multi-head attention on this card: the 32-layer Llama-2-7B-shape
#     step at batch 96 for capacities 498 to 4096, the token layout against the Mosaic one (each in
#     its own process). KIVIConfig(layout="auto") picks the Mosaic layout for MHA at every length on
#     any Hopper GPU, measured on the H200 (0.982x dense at the paper setting, run125); on the H100
#     it was 1.087x dense there, the token layout 1.00x (run147/148). Where the token layout wins on
#     a card, resolve_layout should pick it (cache_mosaic.AUTO_GQA_MIN_LENGTH is the GQA rule);
#  2. (an H200 only: 64 GiB of dense cache) the dense continuation at 16384 tokens, which ran out of
#     memory before the BNTH fix (continuation-gpu-run141-dense) and on the H100 (run144).
#   KIVI_COMMIT=<sha> NAME=runNN [LENGTHS="498 1024"] bash benchmarks/gpu_pending.sh     (results under $OUT)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="${PYTHONPATH:-.}"
NAME="${NAME:-pending}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# greedy's total-order reducer (1f980d8), compiled: XLA:GPU's argmax kept the later NaN (run145)
timeout 60 python -m benchmarks.gpu_tests --name "$NAME-greedy" --budget-s 50 --workers 1 \
    --files tests/test_sampling_audit.py,tests/test_generate.py --select greedy 2>&1 | tail -2
for L in ${LENGTHS:-498 1024 2048 4096}; do
  for c in kivi2 kivi2m; do
    timeout 75 python -m benchmarks.decode_step_ab --layers 32 --batch 96 --prompt $((L - 338)) --max-length "$L" \
        --caches "$c" --arms allpallas --tag="-$NAME-$c-$L" 2>&1 | tail -1 | cut -c1-160
  done
done
# one JSON of the 8 runs (8 files come back a call)
python - "${OUT:-benchmarks/results}" "$NAME" <<'EOF'
import json, pathlib, sys
out, name = pathlib.Path(sys.argv[1]), sys.argv[2]
files = sorted(out.glob(f"decode-step-ab-{name}-kivi2*.json"))
env = {k: v for k, v in json.loads(files[0].read_text()).items() if k != "rows"} if files else {}
rows = [dict(r, max_length=int(f.stem.rsplit("-", 1)[1])) for f in files for r in json.loads(f.read_text())["rows"]]
for r in rows:
    r.pop("examples", None)
(out / f"decode-step-ab-{name}-layouts.json").write_text(json.dumps({**env, "rows": rows}, indent=1))
for f in files:
    f.unlink(), f.with_suffix(".md").unlink(missing_ok=True)
for f in out.glob(f"decode-step-*{name}*.hlo.txt"):
    f.unlink()
for r in sorted(rows, key=lambda r: (r["max_length"], r["cache"])):
    print(r["max_length"], r["cache"], round(r["step_ms"], 3))
EOF
if nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | awk '{exit !($1 > 100000)}'; then
  timeout 150 python -m benchmarks.continuation --model llama2-7b --dtype bfloat16 --batch 8 --prompt 2048 \
      --new 1024,64 --capacity 16384 --caches dense --ways extend_in_loop,extend_after,fresh_prefill --reps 2 \
      --out "${OUT:-benchmarks/results}" 2>&1 | tail -12
fi
