#!/usr/bin/env bash
# `bertforge pretrain --compile` against eager on the same shards: recompiles counted from
# TORCH_LOGS=recompiles, whole-run wall time, median samples/s over steps 20-59.
# Usage: benchmarks/bench_compile.sh 'shards128/*.tfrecord' [PRESET]   (results: docs/benchmarks.md)
set -euo pipefail
shards=${1:?give a glob of S=128 shards}
preset=${2:-demo_tiny_128}
out=$(mktemp -d)
for mode in eager compile; do
  flags=()
  [ "$mode" = compile ] && flags=(--compile true)
  start=$(date +%s.%N)
  TORCH_LOGS=recompiles python -m bertforge pretrain --config "$preset" --input-files "$shards" \
    --training-steps 60 --checkpoint-output-dir "$out/$mode" --dataloader-workers 1 \
    --disable-progress-bar true "${flags[@]}" > "$out/$mode.out" 2> "$out/$mode.err"
  end=$(date +%s.%N)
  python - "$out/$mode/metrics.jsonl" "$mode" "$(grep -c 'Recompiling function' "$out/$mode.err" || true)" \
    "$start" "$end" <<'PY'
import json, statistics, sys
lines = [json.loads(l) for l in open(sys.argv[1]) if '"train"' in l]
wall = float(sys.argv[5]) - float(sys.argv[4])
print(f"{sys.argv[2]}: recompiles {sys.argv[3]}, whole run {wall:.1f} s, "
      f"median samples/s over steps 20-59 {statistics.median(l['samples_per_s'] for l in lines[20:]):.1f}")
PY
done
rm -rf "$out"
