"""Where the torch stages run and what their libraries print: the device, Lightning's chatter."""

from __future__ import annotations

import logging

import torch

from microfp.errors import MicrofpError

__all__ = ["pick_device", "quiet_lightning"]


def pick_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA when available, else CPU."""
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
