#!/usr/bin/env bash
# Install microfp with its test extras and run the test suite (slow tests excluded; add -m slow).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
export PATH="$PWD/.venv/bin:$PATH"
exec python -m pytest "$@"
