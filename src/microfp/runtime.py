"""Where a stage runs and what its libraries print: worker processes, the torch device, Lightning's
chatter. Light to import (torch is loaded by the functions that need it)."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from microfp.errors import MicrofpError

if TYPE_CHECKING:
    import torch

__all__ = ["pick_device", "quiet_lightning", "resolve_workers"]


def resolve_workers(workers: int) -> int:
    """0 means all cores available to this process."""
    if workers > 0:
        return workers
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def pick_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA when available, else CPU."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise MicrofpError("evaluate.device is 'cuda' but no CUDA GPU is available (use 'auto' or 'cpu')")
    return torch.device(name)


def quiet_lightning() -> None:
    """No third-party chatter in the stage output: Lightning's hardware lines and tips go below
    WARNING; the stage prints its own one line per epoch."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda",
                 "lightning.fabric.utilities.seed", "lightning.pytorch.trainer.connectors"):
        logging.getLogger(name).setLevel(logging.WARNING)
