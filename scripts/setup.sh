#!/usr/bin/env bash
# Creates .venv with everything fishmp, its Fish Speech engine and its tests need. Idempotent: re-running after a
# successful install only re-checks the stamp. Needs only python3 (>= 3.10) and access to PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.fishmp-installed
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then exit 0; fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch and torchaudio from one release (PyPI's builds run on CPU as well as CUDA), plus fishmp, its test tools, Ray
# (the Ray backend's tests run a real local Ray cluster) and the HTTP server's parts (`fishmp serve`).
"$VENV/bin/python" -m pip install -q -e ".[fish,dev,ray,serve]"
# fish-speech 0.1.0 pins numpy<=1.26, pydantic==2.9.2, gradio, wandb...: install it and the descript codec packages
# without their declared dependencies; the modules they actually import came with the [fish] extra above.
"$VENV/bin/python" -m pip install -q --no-deps fish-speech==0.1.0 descript-audiotools==0.7.2 descript-audio-codec==1.0.0
echo "$want" > "$STAMP"
