"""MLflow tracking shared by the stages: where runs go and how they lead back to DVC and git.

Runs go to ``MLFLOW_TRACKING_URI`` when set, else to a sqlite file ``mlflow.db`` in the working
directory (the repository root under ``dvc repro``; ignored by git). Every run is tagged with the git
revision and, under ``dvc exp run``, the DVC experiment name, so a run found in ``mlflow ui`` leads
back to its ``dvc exp``.
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from microfp.config import Params

log = logging.getLogger(__name__)


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"


def git_revision() -> str | None:
    """``git rev-parse HEAD`` of the working directory, or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def run_tags(stage: str) -> dict[str, str]:
    """Tags that tie a run to its stage, git revision and DVC experiment."""
    tags = {"microfp.stage": stage, "mlflow.source.name": f"microfp {stage}"}
    if rev := git_revision():
        tags["mlflow.source.git.commit"] = tags["git_revision"] = rev
    if name := os.environ.get("DVC_EXP_NAME"):
        tags["dvc_exp_name"] = name
    return tags


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def log_finished_run(
    experiment: str, stage: str, params: dict[str, Any], metrics: dict[str, float], tags: dict[str, str] | None = None
) -> str:
    """Log one complete run (params, final metrics, tags) and return its id."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    client = MlflowClient(tracking_uri=tracking_uri())
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    run = client.create_run(exp_id, run_name=os.environ.get("DVC_EXP_NAME") or None, tags=run_tags(stage))
    now = int(time.time() * 1000)
    plist = [Param(k, str(v)[:6000]) for k, v in sorted(flatten(params).items())]
    mlist = [Metric(k, float(v), now, 0) for k, v in sorted(flatten(metrics).items()) if isinstance(v, (int, float))]
    tlist = [RunTag(k, v) for k, v in (tags or {}).items()]
    for i in range(0, max(len(plist), len(mlist), 1), 100):
        client.log_batch(run.info.run_id, params=plist[i : i + 100], metrics=mlist[i : i + 100], tags=tlist if i == 0 else [])
    client.set_terminated(run.info.run_id, status="FINISHED")
    return run.info.run_id


def log_mlflow(stage: str, params: Params, metrics: dict[str, Any], checkpoint: str | Path | None) -> str | None:
    """Log a finished stage to MLflow (experiment ``microfp-<stage>``, ``MLFLOW_TRACKING_URI`` or
    ``sqlite:///mlflow.db``) when ``evaluate.mlflow`` is on: parameters, the finite numbers of
    ``metrics`` flattened to ``a.b`` keys, the checkpoint. A tracking failure is reported, never
    fatal (the stage's files are written). Returns the run id."""
    if not params.evaluate.mlflow:
        return None
    try:
        numbers = {k: float(v) for k, v in flatten(metrics).items() if isinstance(v, (int, float))}
        finite = {k: v for k, v in numbers.items() if math.isfinite(v)}
        tags = {"checkpoint": str(Path(checkpoint).resolve())} if checkpoint is not None else None
        return log_finished_run(f"microfp-{stage}", stage, params.model_dump(mode="json"), finite, tags)
    except Exception as err:  # noqa: BLE001 - tracking is secondary to the stage's files
        reason = (str(err).splitlines() or [type(err).__name__])[0][:200]
        log.warning("warning: MLflow logging failed (%s)", reason, extra={"stage": stage})
        return None
