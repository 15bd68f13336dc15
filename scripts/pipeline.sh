#!/usr/bin/env bash
# Install microfp, run the whole DVC pipeline (`dvc repro`) of params.yaml, print report.md.
# Usage: bash scripts/pipeline.sh                          # default small profile
#        bash scripts/pipeline.sh --params configs/paper.yaml  # paper scale (copies it to params.yaml)
#        bash scripts/pipeline.sh -- [dvc repro args]     # e.g. -- generate@train
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export PATH="$PWD/.venv/bin:$PATH"
if [ "${1:-}" = "--params" ]; then
    microfp check-params --params "$2"
    [ "$2" -ef params.yaml ] || cp "$2" params.yaml
    shift 2
fi
[ "${1:-}" = "--" ] && shift
dvc repro "$@"
# The result on one screen (report.md) and what each stage cost here; `dvc metrics show` has the rest.
microfp report --show
