"""The workflows users come for, end to end on a tiny profile of the whole pipeline, as a user runs them:

`dvc repro` -> `dvc exp run -S latent_dim=...` -> `dvc metrics diff` / `dvc exp show` -> `dvc plots diff`
in a browser -> MLflow runs that lead back to the experiment -> `dvc push`, then a fresh clone that
`dvc pull`s the trained models and predicts without training.
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, make_stage_project, md5_files, run_tool
from test_plots_diff import browser, open_in_chromium, write_template  # noqa: F401 - fixture

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")

SETS = {
    "train": {"n": 8},
    "val": {"n": 4},
    "brass": {"n": 3, "texture": "brass"},
    "cube": {"n": 3, "texture": "cube"},
    "hcp": {"n": 8, "crystal": "hexagonal"},
    "hcp_val": {"n": 3, "crystal": "hexagonal"},
}
PARAMS = {
    "train": {"epochs": 1, "hidden_dim": 32, "base_channels": 4, "bottleneck_channels": 4, "lr": 1e-3, "threads": 1},
    "evaluate": {
        "sets": ["train", "val", "brass", "cube"],
        "max_ves_per_set": 4,
        "twopoint_max_fit": 8,
        "cluster_groups": {"texture": ["brass", "cube"]},
    },
    "simulate": {"max_ves": 6, "grid": 8, "increments": 4, "batch_size": 3, "workers": 1},
    "surrogate": {"epochs": 20, "lr": 1e-2, "hidden": 16, "test_fraction": 0.34},
}


def stage_names() -> tuple[str, ...]:
    return tuple(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])


def build_project(where: Path, env: dict[str, str]) -> Path:
    """The whole pipeline with the tiny PARAMS in ``where``, after `dvc repro`, committed."""
    project = make_stage_project(where, SETS, stages=stage_names())
    raw = yaml.safe_load((project / "params.yaml").read_text())
    repo = yaml.safe_load((ROOT / "params.yaml").read_text())
    # every key a stage lists must be in params.yaml: the repository's blocks, shrunk
    raw.update({block: {**repo.get(block, {}), **values} for block, values in PARAMS.items()})
    (project / "params.yaml").write_text(yaml.safe_dump(raw))
    run_tool("dvc", "repro", cwd=project, env=env, timeout=900)
    run_tool("git", "add", "-A", cwd=project)
    run_tool("git", "commit", "-qm", "baseline", cwd=project)
    return project


def committed_lock(project: Path) -> dict:
    """The dvc.lock of the project's last commit."""
    return yaml.safe_load(run_tool("git", "show", "HEAD:dvc.lock", cwd=project).stdout)


class Build(threading.Thread):
    """:func:`build_project` in a thread (the work is in `dvc repro`'s subprocesses), so the two tiny
    pipelines of the reproducibility test are built side by side on the two cores."""

    def __init__(self, where: Path, env: dict[str, str]) -> None:
        super().__init__(daemon=True)
        self.where, self.env = where, env
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            build_project(self.where, self.env)
        except BaseException as err:  # re-raised by result()
            self.error = err

    def result(self) -> Path:
        self.join()
        if self.error is not None:
            raise self.error
        return self.where


# One torch thread per stage process: the two builds share the cores without oversubscribing them
# (bits do not depend on it: both builds use the same setting, and training fixes its own threads).
SINGLE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """The tiny project after `dvc repro`, committed, with its own MLflow store; and a second build of
    the same commit in another directory with another store (started alongside, joined by the test
    that compares them)."""
    base = tmp_path_factory.mktemp("experiments")
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{base / 'mlflow.db'}", **SINGLE_THREAD}
    second = Build(base / "second", {"MLFLOW_TRACKING_URI": f"sqlite:///{base / 'mlflow2.db'}", **SINGLE_THREAD})
    second.start()
    first = build_project(base / "project", env)
    return first, env, base, second


def test_repro_builds_every_output(project):
    root = project[0]
    for path in ("models/vae/best.ckpt", "models/vae_hcp/best.ckpt", "models/surrogate.ckpt",
                 "data/fingerprints/train.parquet", "data/fingerprints_2pt/cube.parquet",
                 "data/fingerprints_hcp/hcp.parquet", "data/curves/hcp.parquet", "plots/latent/interpolation.png"):
        assert (root / path).is_file(), path
    for name in ("train", "reconstruction", "latent", "surrogate", "datasets", "summary"):
        json.loads((root / "metrics" / f"{name}.json").read_text())
    assert (root / "report.md").read_text().startswith("# microfp report")
    assert "Data and pipelines are up to date" in run_tool("dvc", "status", cwd=root).stdout


def test_repro_in_another_directory_reproduces_every_output_to_the_bit(project):
    """Same commit, same machine: `dvc repro` elsewhere gives a dvc.lock identical to the first one
    (every dataset, checkpoint, fingerprint table, curve, metric, plot and report.md)."""
    root, second = project[0], project[3].result()
    first_lock, second_lock = committed_lock(root), committed_lock(second)
    assert set(first_lock["stages"]) == set(second_lock["stages"]) >= {"train", "simulate@hcp", "surrogate", "report"}
    differ = [
        f"{stage}: {out['path']}"
        for stage, body in first_lock["stages"].items()
        for out, again in zip(body.get("outs", []), second_lock["stages"][stage].get("outs", []))
        if out != again
    ]
    assert not differ, "not reproduced: " + ", ".join(differ)
    assert first_lock == second_lock


def test_experiment_metrics_diff_plots_and_mlflow(project, browser, tmp_path):  # noqa: F811 - fixture
    root, env = project[0], project[1]
    run_tool("dvc", "exp", "run", "-n", "latent12", "-S", "latent_dim=12", cwd=root, env=env, timeout=900)

    # `dvc metrics diff` compares phi4 and the surrogate's errors of the baseline and the experiment
    diff = json.loads(run_tool("dvc", "metrics", "diff", "HEAD", "--json", cwd=root).stdout)
    keys = {f"{path}:{key}" for path, metrics in diff.items() for key in metrics}
    assert "metrics/summary.json:reconstruction.val.phi4_mean" in keys
    assert "metrics/summary.json:surrogate.vae.test_mae_mpa" in keys
    assert "metrics/summary.json:surrogate.twopoint.test_mae_mpa" in keys
    assert len(keys) <= 60, f"{len(keys)} headline metrics: too many for a terminal"
    shown = json.loads(run_tool("dvc", "exp", "show", "--json", cwd=root).stdout)
    assert "latent12" in json.dumps(shown)
    # the detail files are still there for `dvc metrics show FILE`
    detail = run_tool("dvc", "metrics", "show", "metrics/reconstruction.json", "--json", cwd=root).stdout
    assert "phi4_mean" in detail

    # a typo in a -S key never reaches the stages
    typo = run_tool("dvc", "exp", "run", "-S", "+latnt_dim=8", cwd=root, env=env, check=False)
    assert typo.returncode != 0 and "latnt_dim: unknown key" in typo.stdout + typo.stderr
    run_tool("git", "checkout", "params.yaml", cwd=root)

    # the training curves and stress-strain plots of both experiments, rendered in a browser
    out = tmp_path / "diff"
    run_tool("dvc", "plots", "diff", "HEAD", "latent12", "-o", str(out), "--html-template",
             str(write_template(tmp_path)), cwd=root)
    page = out / "index.html"
    html = page.read_text()
    assert "plots/train/loss.csv" in html and "plots/curves/hcp" in html
    check, shot = open_in_chromium(browser, page, tmp_path)
    assert check["images"] == check["images_loaded"] > 0, check
    if check["vega_loaded"]:
        assert check["vega_views"] >= 2, check
    assert shot.stat().st_size > 10_000

    # the MLflow runs of the experiment carry its name and git revision
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    ours = [r for r in runs if r.data.tags.get("dvc_exp_name") == "latent12"]
    assert {"train", "surrogate"} <= {r.data.tags.get("microfp.stage") for r in ours}
    baseline = run_tool("git", "rev-parse", "HEAD", cwd=root).stdout.strip()  # the experiment's baseline commit
    assert all(r.data.tags.get("git_revision") == baseline for r in ours)
    assert all(r.data.tags.get("git_revision") for r in runs)


def test_fresh_clone_pulls_models_and_predicts_without_training(project, tmp_path):
    root = project[0]
    remote = tmp_path / "remote"
    run_tool("dvc", "remote", "add", "--local", "-d", "store", str(remote), cwd=root)
    run_tool("dvc", "push", "--all-commits", cwd=root)  # the committed outputs, whatever the workspace holds
    clone = tmp_path / "clone"
    run_tool("git", "clone", "-q", str(root), str(clone), cwd=tmp_path)
    run_tool("dvc", "remote", "add", "--local", "-d", "store", str(remote), cwd=clone)
    run_tool("dvc", "pull", "models/vae_hcp", "models/surrogate.ckpt", "models/vae", "data/ves/hcp",
             "data/ves/train", "data/ves/val", "data/ves/brass", "data/ves/cube", cwd=clone)
    assert not (clone / "data" / "fingerprints").exists()
    pulled = md5_files(clone, ["models"])
    predicted = run_tool("microfp", "predict", "data/ves/hcp/shard-00000.h5", cwd=clone).stdout
    assert len(predicted.strip().splitlines()) == PARAMS["simulate"]["increments"] + 2  # header + points
    run_tool("microfp", "fingerprint", "--checkpoint", "models/vae/best.ckpt", "--out", "fp", "--out-2pt", "fp2", cwd=clone)
    assert sorted(p.name for p in (clone / "fp").iterdir()) == ["brass.parquet", "cube.parquet", "train.parquet", "val.parquet"]
    assert md5_files(clone, ["models"]) == pulled  # nothing was trained
