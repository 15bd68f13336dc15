"""`microfp release` and `microfp pull`: a release folder served by a plain static web server on
127.0.0.1 is a read-only DVC remote that fresh clones pull from, byte for byte; an unreachable
remote and a corrupt object give a one-line error and leave the workspace as it was."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import free_port, make_stage_project, md5_files, microfp_command, run_tool, static_http_server
from microfp.release import Output, _matches, select_outputs

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")

SETS = {"train": {"n": 6}, "val": {"n": 2}}  # train: two shards, so data/ves/train is a .dir of 2 files
DATA_OUTS = ["data/ves/train", "data/ves/val"]
METRIC_OUTS = ["metrics/datasets.json", "metrics/datasets/train.json", "metrics/datasets/val.json"]


def microfp(*args: str, cwd: Path, check: bool = True):
    return run_tool(*microfp_command(), *args, cwd=cwd, check=check)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """The tiny pipeline, reproduced and committed (dvc.lock in git, outputs in the DVC cache)."""
    where = make_stage_project(tmp_path_factory.mktemp("release") / "project", SETS)
    run_tool("dvc", "repro", cwd=where)
    run_tool("git", "add", "-A", cwd=where)
    run_tool("git", "commit", "-qm", "reproduced", cwd=where)
    return where


@pytest.fixture(scope="module")
def release_dir(project, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("published") / "release"
    result = microfp("release", str(out), "--with-data", cwd=project)
    assert "5 outputs" in result.stdout, result.stdout
    return out


def fresh_clone(project: Path, where: Path, url: str) -> Path:
    """What a reader does: clone the code, add the release as a (local, not committed) remote."""
    run_tool("git", "clone", "-q", str(project), str(where), cwd=project.parent)
    run_tool("dvc", "remote", "add", "--local", "-d", "release", url, cwd=where)
    run_tool("dvc", "remote", "modify", "--local", "release", "verify", "true", cwd=where)
    return where


def test_release_has_dvc_layout_and_a_manifest_matching_the_files(project, release_dir):
    manifest = json.loads((release_dir / "manifest.json").read_text())
    head = run_tool("git", "rev-parse", "HEAD", cwd=project).stdout.strip()
    assert manifest["git"]["revision"] == head and manifest["git"]["dirty"] is False
    assert sorted(o["path"] for o in manifest["outputs"]) == sorted(DATA_OUTS + METRIC_OUTS)
    originals = md5_files(project, DATA_OUTS + METRIC_OUTS)
    assert {f["path"]: f["md5"] for f in manifest["files"]} == originals
    for f in manifest["files"]:  # each file is a DVC 3 object, files/md5/xx/yyyy..., of that size
        obj = release_dir / f["object"]
        assert f["object"] == f"files/md5/{f['md5'][:2]}/{f['md5'][2:]}"
        assert obj.stat().st_size == f["size"] == (project / f["path"]).stat().st_size
    train = next(o for o in manifest["outputs"] if o["path"] == "data/ves/train")
    listing = json.loads((release_dir / train["object"]).read_text())  # a directory: a .dir object
    assert train["md5"].endswith(".dir") and train["nfiles"] == 2
    assert sorted(e["relpath"] for e in listing) == ["shard-00000.h5", "shard-00001.h5"]


def test_served_release_pulls_byte_identical_into_fresh_clones(project, release_dir, tmp_path):
    originals = md5_files(project, DATA_OUTS + METRIC_OUTS)
    with static_http_server(release_dir) as url:
        # plain DVC, named outputs
        reader = fresh_clone(project, tmp_path / "reader", url)
        run_tool("dvc", "pull", "data/ves/train", "metrics/datasets.json", cwd=reader)
        assert md5_files(reader, ["data/ves/train", "metrics/datasets.json"]) == {
            k: v for k, v in originals.items() if k.startswith(("data/ves/train/", "metrics/datasets.json"))
        }
        # plain DVC, everything the release holds
        everything = fresh_clone(project, tmp_path / "everything", url)
        run_tool("dvc", "pull", "--allow-missing", cwd=everything)
        assert md5_files(everything, DATA_OUTS + METRIC_OUTS) == originals
        # microfp pull: what the release's manifest lists, verified
        other = fresh_clone(project, tmp_path / "other", url)
        result = microfp("pull", cwd=other)
        assert "pulled 5 outputs" in result.stdout
        assert md5_files(other, DATA_OUTS + METRIC_OUTS) == originals


def test_default_release_holds_metrics_and_explicit_targets_are_checked(project, tmp_path):
    out = tmp_path / "metrics-only"
    microfp("release", str(out), cwd=project)  # default: models/, data/fingerprints*, metrics/
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(o["path"] for o in manifest["outputs"]) == sorted(METRIC_OUTS)
    assert not list(out.glob("files/md5/*/*.dir"))  # no dataset directories
    microfp("release", str(out), "--targets", "data/ves/val", cwd=project)
    manifest = json.loads((out / "manifest.json").read_text())
    assert [o["path"] for o in manifest["outputs"]] == ["data/ves/val"]
    result = microfp("release", str(out), "--targets", "models/vae", cwd=project, check=False)
    assert result.returncode == 2 and "models/vae: not a DVC-tracked output" in result.stderr
    # a release must match a committed dvc.lock, or readers cannot pull it
    lock = (project / "dvc.lock").read_text()
    try:
        (project / "dvc.lock").write_text(lock + "# edited\n")
        result = microfp("release", str(out), cwd=project, check=False)
        assert result.returncode == 2 and "dvc.lock: not committed" in result.stderr
    finally:
        (project / "dvc.lock").write_text(lock)


def test_default_targets_extend_to_later_stages():
    outs = [
        Output("models/vae/best.ckpt", "a" * 32, "train", "dvc.yaml"),
        Output("models/vae/last.ckpt", "b" * 32, "train", "dvc.yaml"),
        Output("models/surrogate.ckpt", "", "surrogate", "dvc.yaml"),  # declared, not built yet
        Output("data/fingerprints/train.parquet", "c" * 32, "fingerprint", "dvc.yaml"),
        Output("data/fingerprints", "d" * 32 + ".dir", "fingerprint", "dvc.yaml"),
        Output("data/ves/train", "e" * 32 + ".dir", "generate@train", "dvc.yaml"),
        Output("metrics/train.json", "f" * 32, "train", "dvc.yaml"),
        Output("plots/train/loss.csv", "0" * 32, "train", "dvc.yaml"),
    ]
    chosen = [o.path for o in select_outputs(outs, None)]
    assert chosen == [
        "data/fingerprints",
        "data/fingerprints/train.parquet",
        "metrics/train.json",
        "models/vae/best.ckpt",
        "models/vae/last.ckpt",
    ]
    assert "data/ves/train" in [o.path for o in select_outputs(outs, None, with_data=True)]
    assert _matches("data/ves/train", "data/ves/train/shard-00000.h5")  # a file inside: the output
    assert not _matches("data/ves/training", "data/ves/train")


def test_unreachable_remote_is_named_and_the_workspace_is_unchanged(project, tmp_path):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    reader = fresh_clone(project, tmp_path / "reader", url)
    before = md5_files(reader)
    result = microfp("pull", cwd=reader, check=False)
    assert result.returncode == 2
    assert result.stderr.startswith("microfp: error: ") and len(result.stderr.strip().splitlines()) == 1
    assert f"remote 'release' ({url}) is unreachable" in result.stderr
    assert md5_files(reader) == before
    # plain `dvc pull` fails too (blaming missing cache files rather than the remote) without writing
    assert run_tool("dvc", "pull", *DATA_OUTS, cwd=reader, check=False).returncode != 0
    assert md5_files(reader) == before


def test_corrupt_object_is_rejected_and_never_reaches_the_workspace(project, release_dir, tmp_path):
    tampered = tmp_path / "tampered"
    shutil.copytree(release_dir, tampered)
    manifest = json.loads((tampered / "manifest.json").read_text())
    victim = next(f for f in manifest["files"] if f["path"] == "data/ves/train/shard-00001.h5")
    obj = tampered / victim["object"]
    data = bytearray(obj.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other content
    obj.write_bytes(bytes(data))
    originals = md5_files(project, DATA_OUTS + METRIC_OUTS)

    with static_http_server(tampered) as url:
        reader = fresh_clone(project, tmp_path / "reader", url)
        before = md5_files(reader)
        result = microfp("pull", cwd=reader, check=False)
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
        assert f"data/ves/train/shard-00001.h5 ({victim['object']}) corrupt" in result.stderr
        assert "not checked out: data/ves/train" in result.stderr
        assert not (reader / "data/ves/train").exists()  # no partial directory, no corrupt file
        after = md5_files(reader)
        for path, md5 in after.items():  # what was pulled is intact; the rest is as it was
            assert md5 == originals.get(path, before.get(path)), path
        assert set(after) - set(before) == {p for p in originals if not p.startswith("data/ves/train/")}

        # plain `dvc pull` with `verify true` (as the README says) also refuses the object
        plain = fresh_clone(project, tmp_path / "plain", url)
        result = run_tool("dvc", "pull", "data/ves/train", cwd=plain, check=False)
        assert result.returncode != 0
        assert not (plain / "data/ves/train").exists()
