"""What each `microfp` command cost on this machine, kept out of every DVC-tracked output.

Wall-clock times and host facts change from run to run, so they never go into a file that DVC
hashes (that would break bit-for-bit `dvc repro`). When DVC runs a stage (it sets ``DVC_STAGE`` and
``DVC_ROOT``), `microfp` appends one JSON line per finished stage command to
``.microfp/runlog.jsonl`` under the repository root (ignored by git and DVC); `microfp report --show`
prints the last run of each stage from it beside the report.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

RUNLOG = Path(".microfp/runlog.jsonl")


def record(stage: str, seconds: float, path: Path = RUNLOG) -> None:
    """Append ``{"stage", "seconds", "finished", "host", "cores"}`` as one line to ``path``
    (``stage`` as DVC names it, e.g. ``generate@brass``).

    Best effort: a read-only working directory loses the line, never the command's result.
    """
    entry = {
        "stage": stage,
        "seconds": round(seconds, 3),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": platform.node(),
        "cores": os.cpu_count(),
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:  # one short write per line: lines of parallel stages don't mix
            f.write(json.dumps(entry) + "\n")
    except OSError:
        pass


def last_runs(path: Path = RUNLOG) -> dict[str, dict[str, Any]]:
    """The newest entry of each stage in ``path`` (``{}`` when there is none)."""
    runs: dict[str, dict[str, Any]] = {}
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return runs
    for line in lines:
        try:
            entry = json.loads(line)
            runs[str(entry["stage"])] = entry
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a torn line of an interrupted write
    return runs
