#!/usr/bin/env bash
# The device-machine session that finishes issue 10's GPU numbers (prepared on a CPU, never run yet). Two calls fit a
# 15-minute device budget: `benchmarks/gpu_batching.sh compile` (~7 min), then `... workers pipeline` (~6 min).
#   compile   benchmarks/batching.py eager AND compiled in one run at B = 1, 16, 64 against fish-speech's batch-1
#             path eager AND compiled (its own CUDA-graph step): the "best batch-1 configuration" and the 5x goal;
#             step times and host ops per step at B=64 (--profile); its last line counts the graphs compiled,
#             CUDA graphs recorded and skipped (a skip's reason: perf_hints);
#   workers   benchmarks/gpu.py with 8 batch-1 workers on the card (1 and 4 were measured before, 8 never finished);
#   pipeline  benchmarks/gpu.py with 1 worker at FISH_BATCH_SIZE=64 through fishmp.Pool (codec and wav writes included).
#   cworkers  (not in the default) benchmarks/gpu.py --compile with 1, 4, 8 batch-1 workers: the first worker fills
#             torch's inductor cache (/tmp/torchinductor_$USER), the next ones load from it. For a third call, if
#             compiled batch 1 turns out much faster than eager: then k compiled workers are the baseline to beat.
# Usage: benchmarks/gpu_batching.sh [compile] [workers] [pipeline] [cworkers]   (default: the first three, ~12 min)
# Run from the repository root on a machine whose image has torch + CUDA (setup: gpu_setup.sh). Results go to $OUT
# (default ./gpu-out); each part has its own timeout (COMPILE_TIMEOUT, WORKERS_TIMEOUT, PIPELINE_TIMEOUT,
# CWORKERS_TIMEOUT) so a slow part cannot eat the next one's time.
set -uo pipefail
source "$(dirname "$0")/gpu_setup.sh"  # wheels, PYTHONPATH, GPU name, /tmp/s1, OUT
PARTS=${*:-compile workers pipeline}

for part in $PARTS; do
  t0=$(date +%s)
  case $part in
    compile)
      TORCH_LOGS=recompiles,perf_hints timeout "${COMPILE_TIMEOUT:-330}" python3 benchmarks/batching.py --device cuda \
        --checkpoint /tmp/s1 --sizes 1,16,64 --refill on --compile both --seconds-per-config 5 --rounds 1 --match 2 \
        --profile 64 --max-new-tokens 64 --json-out "$OUT/compile.jsonl" > "$OUT/compile.log" 2>&1; echo "compile rc=$?"
      grep -E '^\[|"compile"|"match"|"profile"|compile_counters|Recompiling|guard failure|skipping cudagraphs' \
        "$OUT/compile.log" | cut -c1-300 | tail -28 ;;
    workers)
      timeout "${WORKERS_TIMEOUT:-200}" python3 benchmarks/gpu.py --checkpoint /tmp/s1 --workers 8 \
        --segments-per-worker 2 --max-new-tokens 96 --no-write --json-out "$OUT/workers.jsonl" \
        > "$OUT/workers.log" 2>&1; echo "workers rc=$?"
      tail -8 "$OUT/workers.log" ;;
    pipeline)
      timeout "${PIPELINE_TIMEOUT:-120}" python3 benchmarks/gpu.py --checkpoint /tmp/s1 --workers 1 --batch-size 64 \
        --segments-per-worker 1 --max-new-tokens 96 --no-write --json-out "$OUT/pipeline.jsonl" \
        > "$OUT/pipeline.log" 2>&1; echo "pipeline rc=$?"
      tail -8 "$OUT/pipeline.log" ;;
    cworkers)
      timeout "${CWORKERS_TIMEOUT:-420}" python3 benchmarks/gpu.py --checkpoint /tmp/s1 --workers 1,4,8 --compile \
        --segments-per-worker 2 --max-new-tokens 96 --no-write --json-out "$OUT/cworkers.jsonl" \
        > "$OUT/cworkers.log" 2>&1; echo "cworkers rc=$?"
      tail -8 "$OUT/cworkers.log" ;;
    *) echo "unknown part: $part (compile, workers, pipeline or cworkers)"; exit 2 ;;
  esac
  echo "$part took $(( $(date +%s) - t0 )) s"
done
