# Sourced by the device-machine scripts (gpu_session.sh, gpu_batching.sh), from the repository root on a machine
# whose image has torch + CUDA: installs the wheels in .whl (fish-speech 0.1.0 and its deps; gpu_wheels.sh) into
# /tmp/site once per machine, prints the GPU and torch, writes the random S1-mini-sized checkpoint /tmp/s1 once, and
# sets OUT (default ./gpu-out).
export PYTHONUNBUFFERED=1
OUT=${OUT:-$PWD/gpu-out}; mkdir -p "$OUT"
ls .whl/fish_speech-*.whl >/dev/null 2>&1 || [ -d /tmp/site/fish_speech ] || {
  echo "no wheels in .whl: run benchmarks/gpu_wheels.sh where pip can download, then carry .whl"; exit 3; }
[ -d /tmp/site/fish_speech ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv
python3 -c "import torch; print('torch', torch.__version__)"
[ -f /tmp/s1/model.pth ] || { timeout 100 python3 -m fishmp tiny-checkpoint /tmp/s1 --size s1-mini >/dev/null 2>&1; \
  echo "checkpoint rc=$?"; }
