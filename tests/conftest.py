"""Shared fixtures: small parameter sets and a way to run the real `microfp` CLI."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture
def default_raw() -> dict:
    """The repository's params.yaml as a plain mapping (a fresh copy per test)."""
    return copy.deepcopy(yaml.safe_load((ROOT / "params.yaml").read_text()))


def tiny_raw(**sets: dict) -> dict:
    """A minimal valid parameter mapping: 16^3 VEs at resolution 1 (box of 16 length units)."""
    return {
        "seed": 7,
        "ve_size": 16,
        "resolution": 1.0,
        "latent_dim": 8,
        "encoder": "resnet12",
        "generate": {
            "shard_size": 4,
            "workers": 1,
            "sets": sets or {"train": {"n": 6}, "val": {"n": 2}},
        },
    }


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the installed `microfp` command in a subprocess, as a user would."""
    full_env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **(env or {})}
    return subprocess.run(
        [str(BIN / "microfp"), *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=600
    )
