"""DVC remotes against real servers on 127.0.0.1: the default local-directory remote of .dvc/config
(and pointing it elsewhere with --local), an S3 remote (dvc-s3) on moto's S3 server, and a
read-only HTTP remote served by a plain static web server. Each pushes from one clone and pulls
into a fresh one; the outputs are byte-identical."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import ROOT, free_port, make_stage_project, md5_files, run_tool, static_http_server

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")

SETS = {"train": {"n": 6}, "val": {"n": 2}}
OUTS = ["data/ves/train", "data/ves/val", "metrics/datasets.json", "metrics/datasets", "plots/ves"]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """The tiny pipeline with the repository's .dvc/config (remote `localstore`), reproduced and
    committed. It lives in <tmp>/work/project, so `localstore` is <tmp>/work/microfp-dvc-remote."""
    where = make_stage_project(
        tmp_path_factory.mktemp("remotes") / "work" / "project", SETS, dvc_config=ROOT / ".dvc" / "config"
    )
    run_tool("dvc", "repro", cwd=where)
    run_tool("git", "add", "-A", cwd=where)
    run_tool("git", "commit", "-qm", "reproduced", cwd=where)
    return where


def clone(project: Path, where: Path) -> Path:
    run_tool("git", "clone", "-q", str(project), str(where), cwd=project.parent)
    return where


def test_default_remote_is_a_directory_beside_the_repository(project, tmp_path):
    originals = md5_files(project, OUTS)
    store = project.parent / "microfp-dvc-remote"
    listed = run_tool("dvc", "remote", "list", cwd=project).stdout.split()
    assert listed[:2] == ["localstore", str(store)]  # relative to .dvc/: beside the repository
    run_tool("dvc", "push", cwd=project)
    assert list(store.glob("files/md5/*/*.dir"))  # DVC 3 layout

    beside = clone(project, project.parent / "beside")  # same parent folder: same remote
    run_tool("dvc", "pull", cwd=beside)
    assert md5_files(beside, OUTS) == originals

    # Point it elsewhere without editing the committed config (README "Remotes").
    elsewhere = clone(project, tmp_path / "elsewhere")
    other_store = tmp_path / "other-store"
    shutil.copytree(store, other_store)
    run_tool("dvc", "remote", "modify", "--local", "localstore", "url", str(other_store), cwd=elsewhere)
    run_tool("dvc", "pull", cwd=elsewhere)
    assert md5_files(elsewhere, OUTS) == originals
    assert run_tool("git", "status", "--porcelain", cwd=elsewhere).stdout == ""  # config.local is ignored


def test_s3_remote_on_a_local_s3_server(project, tmp_path, monkeypatch):
    boto3 = pytest.importorskip("boto3", reason="boto3 (test extras) not installed")
    moto_server = pytest.importorskip("moto.server", reason="moto (test extras) not installed")
    pytest.importorskip("dvc_s3", reason="dvc-s3 (test extras) not installed")
    # Fake credentials only, and no AWS configuration of this machine in the way.
    aws = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
    }
    for key, value in aws.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="microfp")

        writer = clone(project, tmp_path / "writer")
        shutil.copytree(project / ".dvc" / "cache", writer / ".dvc" / "cache")  # the writer has the data
        run_tool("dvc", "checkout", cwd=writer)
        originals = md5_files(writer, OUTS)
        assert originals == md5_files(project, OUTS)
        # the remote (committed) ...
        run_tool("dvc", "remote", "add", "-d", "s3store", "s3://microfp/cache", cwd=writer)
        run_tool("dvc", "remote", "modify", "s3store", "endpointurl", endpoint, cwd=writer)
        run_tool("git", "commit", "-qam", "S3 remote", cwd=writer)
        # ... and the credentials (per machine, never committed)
        for key, value in (("access_key_id", "testing"), ("secret_access_key", "testing")):
            run_tool("dvc", "remote", "modify", "--local", "s3store", key, value, cwd=writer)
        run_tool("dvc", "push", cwd=writer)
        keys = [o["Key"] for o in boto3.client("s3", endpoint_url=endpoint).list_objects_v2(Bucket="microfp")["Contents"]]
        assert any(k.startswith("cache/files/md5/") and k.endswith(".dir") for k in keys)

        reader = clone(writer, tmp_path / "reader")
        for key, value in (("access_key_id", "testing"), ("secret_access_key", "testing")):
            run_tool("dvc", "remote", "modify", "--local", "s3store", key, value, cwd=reader)
        run_tool("dvc", "pull", cwd=reader)
        assert md5_files(reader, OUTS) == originals
    finally:
        server.stop()


def test_read_only_http_remote_on_a_static_web_server(project, tmp_path):
    originals = md5_files(project, OUTS)
    store = tmp_path / "public"
    run_tool("dvc", "push", "-r", "localstore", cwd=project)  # what the maintainers publish
    shutil.copytree(project.parent / "microfp-dvc-remote", store)
    with static_http_server(store) as url:
        reader = clone(project, tmp_path / "reader")
        run_tool("dvc", "remote", "add", "--local", "-d", "public", url, cwd=reader)
        run_tool("dvc", "pull", cwd=reader)
        assert md5_files(reader, OUTS) == originals
        # read-only: a plain static server takes no uploads, and `dvc push` says it failed
        (reader / "notes.txt").write_text("a new file to push\n")
        run_tool("dvc", "add", "notes.txt", cwd=reader)
        pushed = run_tool("dvc", "push", "notes.txt", cwd=reader, check=False)
        assert pushed.returncode != 0 and "failed to push" in pushed.stderr.lower(), pushed.stderr
