"""Shared fixtures: small parameter sets and a way to run the real `microfp` CLI."""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(autouse=True, scope="session")
def _stage_logging():
    """The stages' log lines go to stderr as under `microfp` (whose entry point sets this up)."""
    from microfp.console import setup_logging

    setup_logging()


@pytest.fixture(autouse=True)
def _mlflow_store(tmp_path_factory, monkeypatch):
    """Runs that the stages log during tests go to a throw-away store, never the repo's mlflow.db.
    Tests that start their own `mlflow server` override MLFLOW_TRACKING_URI themselves."""
    store = tmp_path_factory.getbasetemp() / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models: one intra-op thread is as fast, and avoids OpenMP spin-waiting when other
    processes share the 2 cores (which made the model/train tests 10-20x slower under load)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


def microfp_click_group():
    """The click group of `microfp` with every command registered (as `microfp --help` sees it)."""
    import typer

    from microfp import cli

    if not any(c.name == "train" for c in cli.app.registered_commands):
        cli._register_lazy_commands([])
    return typer.main.get_command(cli.app)


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the installed `microfp` command in a subprocess, as a user would."""
    full_env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **(env or {})}
    return subprocess.run(
        [str(BIN / "microfp"), *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=600
    )


# --- Throw-away DVC projects and local servers (remotes, releases, plots; added for issue 7) -------


def run_tool(*args: str, cwd: Path, check: bool = True, env: dict | None = None, timeout: int = 600):
    """Run git, dvc or microfp (from the venv) in ``cwd``; raise with its output when ``check`` fails."""
    full_env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "DVC_NO_ANALYTICS": "1",
        **(env or {}),
    }
    result = subprocess.run(args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def make_stage_project(
    where: Path,
    sets: dict,
    stages: tuple[str, ...] = ("check-params", "generate", "datasets-summary"),
    plots: list | None = None,
    dvc_config: Path | None = None,
) -> Path:
    """A git + DVC copy of the pipeline with only ``stages`` of the repository's dvc.yaml and a tiny
    params.yaml (committed). Stages added to dvc.yaml later do not slow down or break the tests that
    only need these. ``plots`` replaces the top-level plots section; ``dvc_config`` (e.g. the
    repository's .dvc/config) replaces the one `dvc init` writes."""
    where.mkdir(parents=True)
    pipeline = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    pipeline["stages"] = {name: body for name, body in pipeline["stages"].items() if name in stages}
    if plots is not None:
        pipeline["plots"] = plots
    (where / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    for name in (".dvcignore", ".gitignore"):
        shutil.copy(ROOT / name, where / name)
    # byte code is left behind, numba's compiled CP kernel (__pycache__/*.nbi, *.nbc, valid for a copy
    # with the source's mtime) comes along: each tiny project would otherwise compile it again (~40 s)
    shutil.copytree(ROOT / "src", where / "src", ignore=shutil.ignore_patterns("*.pyc"))
    raw = tiny_raw(**sets)
    (where / "params.yaml").write_text(yaml.safe_dump(raw))
    run_tool("git", "init", "-q", "-b", "main", cwd=where)
    run_tool("git", "config", "user.email", "test@example.com", cwd=where)
    run_tool("git", "config", "user.name", "test", cwd=where)
    run_tool("dvc", "init", "-q", cwd=where)
    if dvc_config is not None:
        shutil.copy(dvc_config, where / ".dvc" / "config")
    run_tool("dvc", "config", "core.analytics", "false", cwd=where)
    run_tool("git", "add", "-A", cwd=where)
    run_tool("git", "commit", "-qm", "tiny project", cwd=where)
    return where


def md5_files(root: Path, paths: list[str] | None = None) -> dict[str, str]:
    """md5 of every file under ``root`` (or under the given relative paths), keyed by posix path;
    git's and DVC's own folders excluded."""
    import hashlib

    result = {}
    starts = [root / p for p in paths] if paths else [root]
    for start in starts:
        candidates = [start] if start.is_file() else sorted(start.rglob("*")) if start.exists() else []
        for f in candidates:
            rel = f.relative_to(root).as_posix()
            if f.is_file() and not rel.startswith((".git/", ".dvc/")):
                result[rel] = hashlib.md5(f.read_bytes()).hexdigest()
    return result


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (closed again, so usable as 'unreachable')."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def static_http_server(directory: Path):
    """Serve ``directory`` read-only over HTTP on 127.0.0.1 (a plain static host, as a release is
    published); yields the base URL. Stopped on exit."""
    import functools
    import http.server
    import threading

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):  # noqa: ANN002 - keep test output clean
            pass

    handler = functools.partial(Quiet, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def microfp_command() -> list[str]:
    """The installed `microfp` command."""
    return [str(BIN / "microfp")]
