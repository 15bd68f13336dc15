"""Atomic outputs: write to a temporary sibling, then rename.

An interrupted stage therefore leaves either the old file or the complete new one, never a
half-written file, and a rerun of the stage resumes cleanly.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def atomic_path(path: Path) -> Path:
    """Temporary sibling of ``path`` (same directory, so the final rename is atomic).

    The suffix is kept so that writers that infer the format from the name (matplotlib,
    pandas) still work.
    """
    return path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")


@contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; rename it to ``path`` if the block succeeds."""
    with atomic_outputs(path) as (tmp,):
        yield tmp


@contextmanager
def atomic_outputs(*paths: str | Path) -> Iterator[list[Path]]:
    """:func:`atomic_output` for files that belong together (a grid and its material file): yield a
    temporary path per file and rename them all if the block succeeds. If it fails, or a rename
    fails, none of the files that did not exist before is left (a replaced one is not restored)."""
    targets = [Path(p) for p in paths]
    for path in targets:
        path.parent.mkdir(parents=True, exist_ok=True)
    temps = [atomic_path(path) for path in targets]
    created: list[Path] = []
    try:
        yield temps
        for path, tmp in zip(targets, temps):
            existed = path.exists()
            os.replace(tmp, path)
            if not existed:
                created.append(path)
    except BaseException:  # KeyboardInterrupt too: leave nothing half-done
        for path in created:
            _unlink(path)
        raise
    finally:
        for tmp in temps:
            _unlink(tmp)


def _unlink(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_output(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as indented, key-sorted JSON atomically (stable for ``dvc metrics diff``)."""
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_figure(fig: Any, path: str | Path, dpi: int = 110) -> None:
    """Save a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png", metadata={"Software": None})
    plt.close(fig)
