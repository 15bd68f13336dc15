"""The generate stage: determinism, resume, stale shards, statistics and plots of a set."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest
import yaml

from microfp import crystallography, datasets, shards
from microfp.config import parse_params

from conftest import BIN, run_cli, tiny_raw


def md5s(directory) -> dict[str, str]:
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(directory.glob("shard-*.h5"))}


@pytest.fixture
def params():
    return parse_params(tiny_raw(train={"n": 10}, val={"n": 2}, cube={"n": 4, "texture": "cube"}))


def test_same_seed_same_bytes_whatever_the_workers(tmp_path, params):
    datasets.generate_set(params, "train", tmp_path / "one", workers=1, progress=False)
    datasets.generate_set(params, "train", tmp_path / "two", workers=2, progress=False)
    first = md5s(tmp_path / "one")
    assert list(first) == ["shard-00000.h5", "shard-00001.h5", "shard-00002.h5"]  # 10 VEs, shards of 4
    assert first == md5s(tmp_path / "two")
    other = parse_params({**tiny_raw(train={"n": 10}, val={"n": 2}), "seed": 8})
    datasets.generate_set(other, "train", tmp_path / "three", workers=1, progress=False)
    assert md5s(tmp_path / "three") != first


def test_contents_are_the_sets_spec(tmp_path, params):
    datasets.generate_set(params, "cube", tmp_path, workers=1, progress=False)
    ves = shards.read_set(tmp_path)
    assert len(ves) == 4 and ves.ve_size == 16 and ves.crystal == "cubic"
    np.testing.assert_array_equal(ves.ve_index, np.arange(4))
    for i in range(len(ves)):
        assert crystallography.in_fundamental_zone(ves.grain_euler(i).astype(np.float64), "cubic").all()
    attrs = shards.read_attrs(tmp_path / "shard-00000.h5")
    assert attrs["set"] == "cube" and attrs["seed"] == 7 and attrs["texture"] == "cube"
    assert json.loads(attrs["params"])["texture"] == "cube"


def test_resume_keeps_complete_shards_and_replaces_stale_ones(tmp_path, params):
    out = tmp_path / "train"
    datasets.generate_set(params, "train", out, workers=1, progress=False)
    reference = md5s(out)
    # An interrupted run: last shard missing, a temp file left behind.
    (out / "shard-00002.h5").unlink()
    (out / ".shard-00002.1234.tmp.h5").write_bytes(b"partial")
    before = (out / "shard-00000.h5").stat().st_mtime_ns
    assert datasets.generate_set(params, "train", out, workers=1, progress=False) == 2  # only the last shard
    assert (out / "shard-00000.h5").stat().st_mtime_ns == before
    assert md5s(out) == reference and not list(out.glob(".*tmp*"))
    # A corrupt shard is regenerated, not trusted.
    (out / "shard-00001.h5").write_bytes(b"junk")
    assert datasets.generate_set(params, "train", out, workers=1, progress=False) == 4
    assert md5s(out) == reference
    # Changed parameters: every shard is regenerated, surplus shards are removed.
    smaller = parse_params({**tiny_raw(train={"n": 3, "esd_mean": 4.0}, val={"n": 2})})
    assert datasets.generate_set(smaller, "train", out, workers=1, progress=False) == 3
    assert list(md5s(out)) == ["shard-00000.h5"]


def test_statistics_and_plot(tmp_path, params):
    out = tmp_path / "cube"
    datasets.generate_set(params, "cube", out, workers=1, progress=False)
    stats = datasets.write_set_report(params, "cube", out, tmp_path / "m" / "cube.json", tmp_path / "p" / "cube.png")
    assert json.loads((tmp_path / "m" / "cube.json").read_text()) == stats
    assert stats["n_ves"] == 4 and stats["esd_target"] == pytest.approx(5.78)
    assert 0.5 * 5.78 < stats["esd_mean"] < 1.5 * 5.78
    assert stats["texture_mean_to_ideal_deg"] < 5 and 0 < stats["texture_spread_mean_deg"] < 8
    png = (tmp_path / "p" / "cube.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_unknown_set_is_a_one_line_error(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(tiny_raw()))
    result = run_cli("generate", "trian", "--params", str(path), "--out", str(tmp_path / "x"), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == "microfp: error: unknown set 'trian'; params.yaml defines: train, val"
    assert not (tmp_path / "x").exists()


def test_cli_killed_mid_run_resumes_to_identical_shards(tmp_path):
    raw = tiny_raw(train={"n": 24}, val={"n": 2})
    raw["ve_size"], raw["resolution"], raw["generate"]["shard_size"] = 32, 0.5, 4
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    args = [str(BIN / "microfp"), "generate", "train", "--params", str(path), "--no-progress"]
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    proc = subprocess.Popen([*args, "--out", "killed"], cwd=tmp_path, env=env)
    deadline = time.time() + 120
    while not list((tmp_path / "killed").glob("shard-*.h5")) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = len(list((tmp_path / "killed").glob("shard-*.h5")))
    assert 1 <= partial < 6, "the kill should land mid-run"
    assert subprocess.run([*args, "--out", "killed"], cwd=tmp_path, env=env).returncode == 0
    assert subprocess.run([*args, "--out", "fresh"], cwd=tmp_path, env=env).returncode == 0
    assert md5s(tmp_path / "killed") == md5s(tmp_path / "fresh")
    assert len(md5s(tmp_path / "fresh")) == 6


def test_shards_of_other_generator_code_are_regenerated(tmp_path, params, monkeypatch):
    out = tmp_path / "train"
    datasets.generate_set(params, "train", out, workers=1, progress=False)
    assert datasets.generate_set(params, "train", out, workers=1, progress=False) == 0
    monkeypatch.setattr(datasets, "generator_digest", lambda: "0" * 16)  # as after an edit of volumes.py
    assert datasets.generate_set(params, "train", out, workers=1, progress=False) == 10
    assert shards.read_attrs(out / "shard-00000.h5")["generator_code"] == "0" * 16


def test_statistics_lose_the_last_bits_that_differ_between_cpus():
    a = {"n_ves": 16, "esd_mean": 5.755015504330502, "spread": 3.073940867344942}
    b = {**a, "esd_mean": np.nextafter(a["esd_mean"], 10.0), "spread": a["spread"] * (1 + 3e-16)}
    assert b != a and datasets.rounded(a) == datasets.rounded(b)
    assert datasets.rounded(a) == {"n_ves": 16, "esd_mean": 5.7550155, "spread": 3.07394087}
    assert isinstance(datasets.rounded(a)["n_ves"], int)
