#!/usr/bin/env bash
# The first device call of the next session that gets one (about 8 min on an H100): the layout rule's
# thresholds on the card that comes. Sessions 39-42's paths and audit files ran compiled in runs
# 144-146 and 150 (an H100 80GB) and the paper setting's step was unchanged there (run147/148).
#  1. multi-head attention (Llama-2-7B shape, 32 layers, batch 96, prompt = capacity - 338, arm
#     allpallas): token layout (kivi2) vs Mosaic layout (kivi2m), each in its own process, at
#     capacities between the two measured on the H100 (run150: token layout faster at 498, Mosaic
#     at 1024; the rule, cache_mosaic.AUTO_MHA_MIN_LENGTH_H100 = 640, is where the lines cross);
#  2. GQA (Mistral-7B shape, 32 layers, batch 64, prompt = 3/4 capacity, arm pallas, dense/kivi2/kivi2m
#     in one process, as run91-93 measured the H200's rule AUTO_GQA_MIN_LENGTH = 1024): never
#     measured on an H100;
#  3. (an H200 only: 64 GiB of dense cache) the dense continuation at 16384 tokens, which ran out of
#     memory before the BNTH fix (continuation-gpu-run141-dense) and on the H100 (run144).
#   NAME=runNN [LENGTHS="576 640 768"] [GQA_LENGTHS="1024 1536 2048"] bash benchmarks/gpu_pending.sh
# Results under $OUT: one JSON a part (a call returns at most 8 files), each row with its max_length.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="${PYTHONPATH:-.}"
NAME="${NAME:-pending}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
for L in ${LENGTHS:-576 640 768}; do
  for c in kivi2 kivi2m; do
    timeout 75 python -m benchmarks.decode_step_ab --layers 32 --batch 96 --prompt $((L - 338)) --max-length "$L" \
        --caches "$c" --arms allpallas --tag="-$NAME-mha-$c-$L" 2>&1 | tail -1 | cut -c1-160
  done
done
for L in ${GQA_LENGTHS:-1024 1536 2048}; do
  timeout 120 python -m benchmarks.decode_step_ab --model mistral-7b --layers 32 --batch 64 --prompt $((L * 3 / 4)) \
      --max-length "$L" --caches dense,kivi2,kivi2m --arms pallas --tag="-$NAME-gqa-$L" 2>&1 | tail -1 | cut -c1-160
done
python - "${OUT:-benchmarks/results}" "$NAME" <<'PY'
import json, pathlib, sys
out, name = pathlib.Path(sys.argv[1]), sys.argv[2]
for part in ("mha", "gqa"):
    files = sorted(out.glob(f"decode-step-ab-{name}-{part}-*.json"))
    if not files:
        continue
    env = {k: v for k, v in json.loads(files[0].read_text()).items() if k != "rows"}
    rows = [dict(r, max_length=int(f.stem.rsplit("-", 1)[1])) for f in files for r in json.loads(f.read_text())["rows"]]
    for r in rows:
        r.pop("examples", None)
    (out / f"decode-step-ab-{name}-{part}-layouts.json").write_text(json.dumps({**env, "rows": rows}, indent=1))
    for f in [*files, *(f.with_suffix(".md") for f in files), *out.glob(f"decode-step-*{name}-{part}-*.hlo.txt")]:
        f.unlink(missing_ok=True)
    for r in sorted(rows, key=lambda r: (r["max_length"], r["cache"])):
        print(part, r["max_length"], r["cache"], round(r["step_ms"], 3))
PY
if nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | awk '{exit !($1 > 100000)}'; then
  timeout 150 python -m benchmarks.continuation --model llama2-7b --dtype bfloat16 --batch 8 --prompt 2048 \
      --new 1024,64 --capacity 16384 --caches dense --ways extend_in_loop,extend_after,fresh_prefill --reps 2 \
      --out "${OUT:-benchmarks/results}" 2>&1 | tail -12
fi
