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
# vector extensions that pick oneDNN's convolution kernels, and so the bits of train and later stages on CPUs
# (README "Reproducibility"): the same bits measured with AVX-512 and AMX, other bits with AVX2 only
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile")


def cpu_facts(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, Any]:
    """``{"cpu": model name, "isa": [the ISA_FLAGS this CPU has]}`` from ``cpuinfo`` (Linux); on other systems
    ``platform.processor()`` and no flags."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return {"cpu": platform.processor(), "isa": []}
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)  # the last CPU's lines
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    return {"cpu": fields.get("model name", platform.processor()), "isa": [f for f in ISA_FLAGS if f in flags]}


def record(stage: str, seconds: float, path: Path = RUNLOG) -> None:
    """Append ``{"stage", "seconds", "finished", "host", "cores", "cpu", "isa"}`` as one line to ``path``
    (``stage`` as DVC names it, e.g. ``generate@brass``).

    Best effort: a read-only working directory loses the line, never the command's result.
    """
    entry = {
        "stage": stage,
        "seconds": round(seconds, 3),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": platform.node(),
        "cores": os.cpu_count(),
        **cpu_facts(),
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
