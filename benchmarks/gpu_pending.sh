#!/usr/bin/env bash
# The first device call of the next session that gets one (about 8 min; the timeouts sum to 480 s):
# what session 42 could not measure or compile. Sessions 39-42's paths and audit files ran compiled in runs
# 144-146 and 150 (an H100 80GB) and the paper setting's step was unchanged there (run147/148).
#  1. the layouts' crossover for multi-head attention, refined: the 32-layer Llama-2-7B-shape step at
#     batch 96, token layout vs Mosaic layout (each in its own process), at capacities between the
#     two measured on the H100 (run150: token layout faster at 498, Mosaic at 1024; the rule,
#     cache_mosaic.AUTO_MHA_MIN_LENGTH_H100 = 640, is where the lines through them cross). On an
#     H100 this places the threshold; on an H200 it checks "every length" (measured at 498 and up);
#  2. (an H200 only: 64 GiB of dense cache) the dense continuation at 16384 tokens, which ran out of
#     memory before the BNTH fix (continuation-gpu-run141-dense) and on the H100 (run144).
#   KIVI_COMMIT=<sha> NAME=runNN [LENGTHS="498 1024"] bash benchmarks/gpu_pending.sh     (results under $OUT)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="${PYTHONPATH:-.}"
NAME="${NAME:-pending}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
for L in ${LENGTHS:-576 640 768 896}; do
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
for f in [*files, *(f.with_suffix(".md") for f in files), *out.glob(f"decode-step-*{name}*.hlo.txt")]:
    f.unlink(missing_ok=True)
for r in sorted(rows, key=lambda r: (r["max_length"], r["cache"])):
    print(r["max_length"], r["cache"], round(r["step_ms"], 3))
EOF
if nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | awk '{exit !($1 > 100000)}'; then
  timeout 150 python -m benchmarks.continuation --model llama2-7b --dtype bfloat16 --batch 8 --prompt 2048 \
      --new 1024,64 --capacity 16384 --caches dense --ways extend_in_loop,extend_after,fresh_prefill --reps 2 \
      --out "${OUT:-benchmarks/results}" 2>&1 | tail -12
fi
