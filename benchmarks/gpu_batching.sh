#!/usr/bin/env bash
# The device-machine session for issue 24 (prepared on a CPU; its parts dry-run there with the tiny checkpoint, see
# below). One call of ~10 minutes on one card, results in $OUT (default ./gpu-out):
#   frames    benchmarks/batching.py at B = 1, 16, 64, 128, eager AND compiled (FISH_COMPILE's steps: the slow
#             transformer per layer, the fast transformer and sampling, CUDA graphs), the codec on its own thread
#             AND inline, against fish-speech's own batch-1 path (eager): frames/s, the codec's share of the time,
#             thread vs inline, peak memory, the compile time (its "compile" line), B=64 step times and host ops per
#             step eager and compiled (--profile), and the last line's compile_counters (graphs, graph breaks, CUDA
#             graphs recorded and skipped; a skip's reason: TORCH_LOGS=perf_hints). Goal: B=64 compiled >= 1,500
#             frames/s on an H200 (stretch 3,000).
#   workers   benchmarks/gpu.py with k = 1, 4, 8 batch-1 workers on the card (what fishmp did before batching).
#   cworkers  (not in the default) benchmarks/gpu.py --compile with 1, 4 compiled batch-1 workers.
#   pipeline  (not in the default) benchmarks/gpu.py with 1 worker at FISH_BATCH_SIZE=64 through fishmp.Pool.
# Usage: benchmarks/gpu_batching.sh [frames] [workers] [cworkers] [pipeline]   (default: frames workers, ~10 min)
# Each part has its own timeout (FRAMES_TIMEOUT, WORKERS_TIMEOUT, CWORKERS_TIMEOUT, PIPELINE_TIMEOUT) so a slow part
# cannot eat the next one's time.
# Dry run on a CPU (no GPU, no wheels, the tiny checkpoint): DEVICE=cpu benchmarks/gpu_batching.sh frames workers
#   (with DEVICE=cpu: PYTHONPATH is the checkout, the checkpoint a random tiny one, smaller sizes and times; override
#   with CKPT, SIZES, BENCH_SECONDS, PROFILE, WORKERS).
set -uo pipefail
DEVICE=${DEVICE:-cuda}
if [ "$DEVICE" = cpu ]; then
  export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
  OUT=${OUT:-$PWD/gpu-out}; mkdir -p "$OUT"
  PY=${PY:-python3}
  CKPT=${CKPT:-/tmp/fishmp-bench-tiny}
  [ -f "$CKPT/model.pth" ] || "$PY" -m fishmp tiny-checkpoint "$CKPT" >/dev/null
  SIZES=${SIZES:-1,4}; SECONDS_PER=${BENCH_SECONDS:-2}; PROFILE=${PROFILE:-4}; WORKERS=${WORKERS:-1,2}
  ALLOW=--allow-cpu
else
  source "$(dirname "$0")/gpu_setup.sh"  # wheels, PYTHONPATH, GPU name, /tmp/s1, OUT
  PY=${PY:-python3}
  CKPT=${CKPT:-/tmp/s1}
  SIZES=${SIZES:-1,16,64,128}; SECONDS_PER=${BENCH_SECONDS:-4}; PROFILE=${PROFILE:-64}; WORKERS=${WORKERS:-1,4,8}
  ALLOW=
fi
PARTS=${*:-frames workers}

for part in $PARTS; do
  t0=$(date +%s)
  case $part in
    frames)
      # 2560 KV slots: B=128 of S1-mini is 128 x 0.29 GB per session (eager and compiled sessions each hold one)
      TORCH_LOGS=recompiles,perf_hints timeout "${FRAMES_TIMEOUT:-420}" "$PY" benchmarks/batching.py --device "$DEVICE" \
        --checkpoint "$CKPT" --sizes "$SIZES" --refill on --codec thread,inline --compile both --no-compile-baseline \
        --seconds-per-config "$SECONDS_PER" --rounds 1 --match 2 --profile "$PROFILE" --max-new-tokens 64 \
        --max-seq-len 2560 --json-out "$OUT/frames.jsonl" > "$OUT/frames.log" 2>&1; echo "frames rc=$?"
      grep -E '^\[|"compile"|"match"|host_ops|step_ms|compile_counters|Recompiling|skipping cudagraphs' \
        "$OUT/frames.log" | cut -c1-300 | tail -40 ;;
    workers)
      timeout "${WORKERS_TIMEOUT:-200}" "$PY" benchmarks/gpu.py --checkpoint "$CKPT" $ALLOW --workers "$WORKERS" \
        --segments-per-worker 2 --max-new-tokens 96 --no-write --json-out "$OUT/workers.jsonl" \
        > "$OUT/workers.log" 2>&1; echo "workers rc=$?"
      tail -8 "$OUT/workers.log" ;;
    cworkers)
      timeout "${CWORKERS_TIMEOUT:-300}" "$PY" benchmarks/gpu.py --checkpoint "$CKPT" $ALLOW --workers "${WORKERS%,8}" --compile \
        --segments-per-worker 2 --max-new-tokens 96 --no-write --json-out "$OUT/cworkers.jsonl" \
        > "$OUT/cworkers.log" 2>&1; echo "cworkers rc=$?"
      tail -8 "$OUT/cworkers.log" ;;
    pipeline)
      timeout "${PIPELINE_TIMEOUT:-120}" "$PY" benchmarks/gpu.py --checkpoint "$CKPT" $ALLOW \
        --workers 1 --batch-size 64 --segments-per-worker 1 --max-new-tokens 96 --no-write \
        --json-out "$OUT/pipeline.jsonl" > "$OUT/pipeline.log" 2>&1; echo "pipeline rc=$?"
      tail -8 "$OUT/pipeline.log" ;;
    *) echo "unknown part: $part (frames, workers, cworkers or pipeline)"; exit 2 ;;
  esac
  echo "$part took $(( $(date +%s) - t0 )) s"
done
