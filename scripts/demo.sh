#!/usr/bin/env bash
# Installs what is needed (scripts/setup.sh, idempotent) and runs the demo: a real Fish Speech job on a tiny random
# checkpoint, 3 speakers x 12 segments, 2 workers. Nothing is downloaded but Python packages.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m fishmp demo "$@"
