#!/usr/bin/env bash
# Creates .venv with everything fishmp, its Fish Speech engine and its tests need. Idempotent: re-running after a
# successful install only re-checks the stamp. Needs only python3 (>= 3.10) and access to PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.fishmp-installed
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"

# The review page's browser tests (tests/test_server_page.py) drive Debian's chromium through its chromedriver; the
# fit's tests speak real lines with espeak-ng and compare stretchers with Rubber Band's command (rubberband-cli).
# Installed where apt-get can (CI runs as root on Debian), once and quietly; elsewhere those tests skip, saying why.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null || ! command -v espeak-ng >/dev/null \
    || ! command -v rubberband >/dev/null; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        chromium chromium-driver espeak-ng rubberband-cli; } >/dev/null 2>&1 || echo "setup.sh: chromium," \
        "espeak-ng or rubberband-cli could not be installed with apt-get: the tests that need them will skip" >&2
  fi
fi
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
