#!/usr/bin/env bash
# Create .venv (Python 3.11) and install microfp with pinned dependencies (CPU torch 2.13.0).
# Reinstalls only when pyproject.toml changed. Usage: bash scripts/install.sh [extras, e.g. test]
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
py="${PYTHON:-python3.11}"
command -v "$py" >/dev/null 2>&1 || py=python3
if [ ! -x .venv/bin/python ]; then
    "$py" -m venv .venv
    .venv/bin/python -m pip install --quiet --upgrade "pip>=24"
fi
stamp=".venv/.microfp-installed-$(cat pyproject.toml | sha1sum | cut -c1-12)${extras:+-$extras}"
if [ ! -f "$stamp" ]; then
    spec="."
    [ -n "$extras" ] && spec=".[$extras]"
    .venv/bin/python -m pip install --quiet -e "$spec"
    touch "$stamp"
fi
