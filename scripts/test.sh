#!/usr/bin/env bash
# Install microfp with its test extras (and the system tools of the browser tests: chromium, vega
# bundles; never fatal) and run the test suite (slow tests excluded; add -m slow for those).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
bash scripts/ci-services.sh
export PATH="$PWD/.venv/bin:$PATH"
exec python -m pytest "$@"
