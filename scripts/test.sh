#!/usr/bin/env bash
# Installs what is needed (scripts/setup.sh, idempotent) and runs the whole test suite: lint, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check fishmp tests benchmarks
exec .venv/bin/python -m pytest "$@"
