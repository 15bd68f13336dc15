"""What a stage prints while it runs: one log line per event, and a progress bar on a terminal.

Stage modules log with ``log = logging.getLogger(__name__)``; :func:`setup_logging` (called once by
``microfp``'s entry point, :func:`microfp.cli.main`) sends the records of the ``microfp`` loggers to
stderr as ``[microfp <stage>] <message>``, one line each. The stage is the command's name, derived
from the module (``microfp.fingerprints`` -> ``fingerprint``) or given per record
(``log.info(..., extra={"stage": "analyse"})``). The records do not propagate to the root logger,
so nothing is printed twice.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

LOGGER = "microfp"
# Modules whose command is not named after them (the rest log as their last name component).
STAGE_OF_MODULE = {
    "microfp.fingerprints": "fingerprint",
    "microfp.analysis": "analyse",
    "microfp.volume_fingerprints": "fingerprint-volume",
}


class StageFormatter(logging.Formatter):
    """``[microfp <stage>] <message>``."""

    def format(self, record: logging.LogRecord) -> str:
        stage = getattr(record, "stage", None) or STAGE_OF_MODULE.get(record.name) or record.name.rsplit(".", 1)[-1]
        return f"[microfp {stage}] {record.getMessage()}"


class StderrHandler(logging.StreamHandler):
    """A stream handler on the *current* ``sys.stderr`` (looked up per record, so redirections and
    pytest's capture see the lines)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> Any:  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def setup_logging(level: int = logging.INFO) -> logging.Logger:
    """Send the ``microfp`` loggers' records to stderr, one line each (idempotent)."""
    logger = logging.getLogger(LOGGER)
    if not any(isinstance(h, StderrHandler) for h in logger.handlers):
        handler = StderrHandler()
        handler.setFormatter(StageFormatter())
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    return logger


class ProgressBar:
    """A rich progress bar with ETA (or nothing when disabled) whose context value is ``advance()``."""

    def __init__(self, enabled: bool, label: str, total: int) -> None:
        self.enabled, self.label, self.total = enabled and total > 0, label, total

    def __enter__(self) -> Callable[[], None]:
        if not self.enabled:
            return lambda: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._bar = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()
        )
        self._bar.__enter__()
        task = self._bar.add_task(self.label, total=self.total)
        return lambda: self._bar.advance(task)

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self._bar.__exit__(*exc)
