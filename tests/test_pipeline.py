"""The DVC pipeline end to end on a tiny profile, in a throw-away git + DVC repository."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import make_stage_project, run_tool

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")

SETS = {
    "train": {"n": 4},
    "val": {"n": 2},
    "elongated": {"n": 2, "esd_mean": 9.54, "aspect": [2, 1, 1]},
    "cube": {"n": 2, "texture": "cube"},
    "small_mixed": {"n": 2, "esd_mean": [2.73, 4.01]},
    "hcp": {"n": 2, "crystal": "hexagonal"},
}


def sh(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    return run_tool(*args, cwd=cwd, check=check, timeout=900)


def make_project(where: Path) -> Path:
    """A git + DVC copy of the generate part of the pipeline with a tiny params.yaml."""
    return make_stage_project(where, SETS)


def lock_hashes(project: Path) -> dict[str, str]:
    """md5 of every stage output recorded in dvc.lock."""
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    return {
        f"{stage}:{out['path']}": out["md5"]
        for stage, body in lock["stages"].items()
        for out in body.get("outs", [])
        if not out["path"].startswith(".microfp")
    }


def test_repro_is_complete_clean_and_idempotent(tmp_path):
    first = make_project(tmp_path / "first")
    sh("dvc", "repro", cwd=first)
    for name in SETS:
        assert list((first / "data" / "ves" / name).glob("shard-*.h5"))
        assert (first / "plots" / "ves" / f"{name}.png").stat().st_size > 1000
    metrics = yaml.safe_load((first / "metrics" / "datasets.json").read_text())
    assert set(metrics) == set(SETS) and metrics["train"]["n_ves"] == 4
    assert "Data and pipelines are up to date" in sh("dvc", "status", cwd=first).stdout
    again = sh("dvc", "repro", cwd=first).stdout
    assert "Running stage" not in again
    # outputs are DVC's, not git's
    status = sh("git", "status", "--porcelain", "--ignored", cwd=first).stdout
    assert "!! data/ves/train/" in status and "!! metrics/datasets.json" in status
    assert any(key.endswith("data/ves/train") for key in lock_hashes(first))
    # The same seed on another checkout gives the same bytes: the whole pipeline's outputs are compared
    # in tests/test_experiments.py (test_repro_in_another_directory_reproduces_every_output_to_the_bit).


def test_experiment_with_a_misspelt_key_is_rejected(tmp_path):
    project = make_project(tmp_path / "exp")
    # DVC itself refuses to override a key that does not exist ...
    result = sh("dvc", "exp", "run", "-S", "latnt_dim=512", cwd=project, check=False)
    assert result.returncode != 0 and "latnt_dim" in result.stderr
    # ... but adds one when asked with '+': then our schema stops the pipeline before any stage.
    result = sh("dvc", "exp", "run", "-S", "+latnt_dim=512", cwd=project, check=False)
    assert result.returncode != 0
    assert "params.yaml: latnt_dim: unknown key" in result.stdout + result.stderr
    assert not list(project.glob("data/ves/*/shard-*.h5"))
    # a valid change runs (after undoing the typo that `dvc exp run` left in params.yaml)
    sh("git", "checkout", "params.yaml", cwd=project)
    sh("dvc", "exp", "run", "-S", "generate.sets.train.n=2", "generate@train", cwd=project)
