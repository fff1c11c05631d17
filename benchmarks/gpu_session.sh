#!/usr/bin/env bash
# The device-machine session that produced the README's GPU numbers of this round (one call, ~7 minutes):
#   1. FISH_MODEL_MEMORY_GB=auto on a random S1-mini-sized checkpoint: a 48-segment job through the CLI, with GPU
#      telemetry every 2 s and worker recycling after 8 segments (issue 13 item 3, issue 15 items 4-5);
#   2. benchmarks/batching.py eager vs FISH_COMPILE at B = 1, 16, 64 (issue 10 item 6).
# Run from the repository root on a machine whose image has torch + CUDA (setup: gpu_setup.sh). Results go to $OUT
# (default ./gpu-out).
set -uo pipefail
source "$(dirname "$0")/gpu_setup.sh"  # wheels, PYTHONPATH, GPU name, /tmp/s1, OUT

# 1. auto + telemetry + recycling
mkdir -p /tmp/auto && python3 - <<'PY'
import json, soundfile as sf
from fishmp.engines.audio import speech_like
sf.write("/tmp/auto/ref.wav", speech_like(10.0, 44100, 140.0, seed=1), 44100)
segs = [{"id": f"{i:03d}", "speaker": "a", "text": f"The quick brown fox jumps over the lazy dog, take {i}."}
        for i in range(48)]
json.dump({"speakers": {"a": {"reference_audio": "ref.wav", "reference_text": "A synthetic reference voice."}},
           "segments": segs, "params": {"max_new_tokens": 64, "seed": 0}}, open("/tmp/auto/job.json", "w"))
PY
(cd /tmp/auto && FISH_MODEL_MEMORY_GB=auto FISH_CHECKPOINT_DIR=/tmp/s1 FISH_MAX_WORKERS=6 FISH_CACHE_DIR=/tmp/auto/cache \
  FISH_TAKE_CHECK=false FISH_TELEMETRY_INTERVAL_S=2 FISH_WORKER_MAX_SEGMENTS=8 \
  timeout "${AUTO_TIMEOUT:-170}" python3 -m fishmp generate job.json -o out --progress jsonl \
  >"$OUT/auto.jsonl" 2>"$OUT/auto.err"; echo "auto job rc=$?")
grep -E '^\[(GPU|Main)\]' "$OUT/auto.err" | grep -v Generated | head -24
grep -c '"event": "gpu"' "$OUT/auto.jsonl"; grep -m2 '"event": "gpu"' "$OUT/auto.jsonl"
grep '"event": "worker_recycled"' "$OUT/auto.jsonl" | head -3
grep '"event": "finished"' "$OUT/auto.jsonl" | cut -c1-900
tail -1 "$OUT/auto.jsonl"

# 2. compile vs eager, batched
timeout "${COMPILE_TIMEOUT:-230}" python3 benchmarks/batching.py --device cuda --checkpoint /tmp/s1 --sizes 1,16,64 \
  --refill on --compile both --no-compile-baseline --seconds-per-config 5 --rounds 1 --match 2 --max-new-tokens 64 \
  --json-out "$OUT/compile.jsonl" 2>&1 | grep -v '"measure"\|Warning\|"""' > "$OUT/compile.log"; echo "compile rc=$?"
grep -E '^\[|compile|match' "$OUT/compile.log" | tail -20
