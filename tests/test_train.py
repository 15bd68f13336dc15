"""Training with Lightning on synthetic 16^3 shards: outputs, resume, checkpoints, bad input, MLflow."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch

from microfp.config import Params, parse_params
from microfp.errors import MicrofpError
from microfp.shards import EULER_SCALE, VESet, read_shard, write_shard
from microfp.model import CheckpointError, load_vae
import microfp.train as train_module
from microfp.train import ShardDataset, curve_columns, train, train_command

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N = 16


def make_ves(rng: np.random.Generator, count: int, n: int = N, grains: int = 4) -> VESet:
    """Periodic Voronoi grain maps with orientations from a narrow band (a 'texture'), so that a tiny
    VAE has something to learn in a few steps."""
    grid = np.stack(np.meshgrid(*[np.arange(n)] * 3, indexing="ij"), -1).reshape(-1, 3)
    gids, euler = [], []
    for _ in range(count):
        seeds = rng.uniform(0, n, (grains, 3))
        d = np.abs(grid[:, None, :] - seeds[None])
        d = np.minimum(d, n - d)
        gids.append((d**2).sum(-1).argmin(1).reshape(n, n, n).astype(np.uint16))
        euler.append((rng.uniform(0.1, 0.4, (grains, 3)) * EULER_SCALE).astype(np.float32))
    return VESet(
        grain_ids=np.stack(gids),
        euler=np.stack(euler),
        n_grains=np.full(count, grains, np.int32),
        ve_index=np.arange(count, dtype=np.int64),
        esd_target=np.full(count, 2.0, np.float32),
        crystal="cubic",
        resolution=0.5,
        attrs={"set": "synthetic"},
    )


def write_set(directory: Path, count: int, seed: int, per_shard: int = 8, n: int = N) -> None:
    ves = make_ves(np.random.default_rng(seed), count, n)
    for k, start in enumerate(range(0, count, per_shard)):
        sl = slice(start, start + per_shard)
        part = VESet(ves.grain_ids[sl], ves.euler[sl], ves.n_grains[sl], ves.ve_index[sl], ves.esd_target[sl],
                     ves.crystal, ves.resolution, ves.attrs)
        write_shard(directory / f"shard-{k:05d}.h5", part)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ves")
    write_set(root / "train", 32, seed=0)
    write_set(root / "val", 8, seed=1)
    return root


def make_params(**train: Any) -> Params:
    top = {k: train.pop(k) for k in ("latent_dim", "ve_size", "encoder", "seed") if k in train}
    raw = {
        "seed": 0,
        "ve_size": N,
        "resolution": 0.5,
        "latent_dim": 8,
        "encoder": "resnet12",
        "generate": {"sets": {"train": {"n": 32}, "val": {"n": 8}}},
        "train": {
            "epochs": 2,
            "batch_size": 4,
            "hidden_dim": 32,
            "base_channels": 4,
            "bottleneck_channels": 4,
            "lr": 0.01,
            "mlflow": False,
            "num_workers": 0,
        },
    }
    raw.update(top)
    raw["train"].update(train)
    return parse_params(raw)


@pytest.fixture(autouse=True)
def _isolate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Never write mlflow.db into the repository, whatever a test does.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)


def run(params: Params, data: Path, tmp: Path) -> dict[str, float]:
    return train(params, data, tmp / "models/vae", tmp / "metrics/train.json", tmp / "plots/train")


def read_curve(tmp: Path) -> list[dict[str, str]]:
    with open(tmp / "plots/train/loss.csv") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------
# Data


def test_dataset_expands_grain_ids_cached_and_lazy(data_dir: Path) -> None:
    ves = read_shard(data_dir / "train/shard-00001.h5")
    cached = ShardDataset(data_dir / "train", N, cache_mb=100)
    lazy = ShardDataset(data_dir / "train", N, cache_mb=0)
    assert cached.cached and not lazy.cached
    assert len(cached) == len(lazy) == 32
    for i in (0, 8, 11, 31):
        assert torch.equal(cached[i], lazy[i])
    x = lazy[10]  # shard 1, VE 2
    assert x.dtype == torch.float32 and x.shape == (3, N, N, N)
    assert np.array_equal(x.numpy(), ves.orientation_field(2))
    assert 0 <= float(x.min()) and float(x.max()) <= 1
    with pytest.raises(IndexError):
        lazy[32]


# ---------------------------------------------------------------------------------------------
# End to end


def test_training_writes_outputs_and_reconstruction_improves(data_dir: Path, tmp_path: Path) -> None:
    result = run(make_params(epochs=3), data_dir, tmp_path)
    assert (tmp_path / "models/vae/best.ckpt").is_file() and (tmp_path / "models/vae/last.ckpt").is_file()
    assert not list((tmp_path / "models/vae").glob("*.tmp")) and not list((tmp_path / "models/vae").glob(".*"))

    rows = read_curve(tmp_path)
    assert list(rows[0]) == curve_columns("euler")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    first, last = rows[0], rows[-1]
    assert float(last["val_recon"]) < float(first["val_recon"])
    # the BCE of a non-binary target has a floor (the entropy of x), so look at the FFT term
    # (n^3 x MSE) for the size of the improvement
    assert float(last["val_fft"]) < 0.9 * float(first["val_fft"])
    assert float(last["train_recon"]) < 0.9 * float(first["train_recon"])

    metrics = json.loads((tmp_path / "metrics/train.json").read_text())
    assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in metrics.values())  # flat, numeric
    assert metrics["epochs"] == 3 and metrics["steps"] == 3 * 32 // 4
    assert metrics["val_recon"] < metrics["val_recon_first"]
    assert metrics["val_recon_first"] == pytest.approx(float(rows[0]["val_recon"]), rel=1e-6)
    assert metrics["param_count"] == result["param_count"] > 0
    assert "seconds" not in metrics  # no run facts in a DVC-tracked file: it must reproduce to the bit
    # best.ckpt, the reader's file: weights and one model config, no optimizer state
    best = torch.load(tmp_path / "models/vae/best.ckpt", weights_only=True)
    assert set(best) == {"model_config", "state_dict"}
    assert best["model_config"]["latent_dim"] == 8 and best["model_config"]["representation"] == "euler"
    assert "optimizer_states" in torch.load(tmp_path / "models/vae/last.ckpt", weights_only=True)

    vae = load_vae(tmp_path / "models/vae/best.ckpt", expect=make_params())
    assert not vae.training
    x = ShardDataset(data_dir / "val", N)[0].unsqueeze(0)
    mu, logvar = vae.encode(x)
    assert mu.shape == (1, 8)
    assert torch.equal(vae.encode(x)[0], mu)  # deterministic fingerprint


def test_resume_continues_from_last_checkpoint(data_dir: Path, tmp_path: Path) -> None:
    run(make_params(epochs=1), data_dir, tmp_path)
    first = read_curve(tmp_path)
    ckpt1 = torch.load(tmp_path / "models/vae/last.ckpt", weights_only=True)
    assert (ckpt1["epoch"], ckpt1["global_step"]) == (0, 8)

    result = run(make_params(epochs=2, lr=0.005), data_dir, tmp_path)
    ckpt2 = torch.load(tmp_path / "models/vae/last.ckpt", weights_only=True)
    assert (ckpt2["epoch"], ckpt2["global_step"]) == (1, 16)  # continued, not restarted (that gives 0, 8)
    assert result["steps"] == 16 and result["epochs"] == 2
    rows = read_curve(tmp_path)
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert rows[0] == first[0]  # the first epoch's row comes from the checkpoint, unchanged
    # the current lr applies to the continued epochs
    assert ckpt2["optimizer_states"][0]["param_groups"][0]["lr"] == 0.005
    # running again with the same epochs does no more training, and still writes the curves
    (tmp_path / "plots/train/loss.csv").unlink()  # DVC removes non-persistent outputs before a run
    result = run(make_params(epochs=2), data_dir, tmp_path)
    assert result["steps"] == 16 and len(read_curve(tmp_path)) == 2


def test_regenerated_training_data_start_afresh(data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run(make_params(epochs=1), data_dir, tmp_path)
    capsys.readouterr()
    later = (tmp_path / "models/vae/last.ckpt").stat().st_mtime + 10
    shard = sorted((data_dir / "train").glob("shard-*.h5"))[0]
    before = shard.stat().st_mtime
    os.utime(shard, (later, later))  # as if the set was regenerated after the checkpoint
    try:
        result = run(make_params(epochs=2), data_dir, tmp_path)
    finally:
        os.utime(shard, (before, before))
    assert "training data are newer than the checkpoint; starting afresh" in capsys.readouterr().err
    assert result["steps"] == 16 and result["epochs"] == 2
    ckpt = torch.load(tmp_path / "models/vae/last.ckpt", weights_only=True)
    assert (ckpt["epoch"], ckpt["global_step"]) == (1, 16)


def test_last_checkpoint_of_another_architecture_starts_afresh(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run(make_params(epochs=1), data_dir, tmp_path)
    capsys.readouterr()
    result = run(make_params(epochs=1, latent_dim=6), data_dir, tmp_path)
    err = capsys.readouterr().err
    assert "models/vae/last.ckpt: trained with latent_dim=8, params.yaml has 6; starting afresh" in err
    assert result["steps"] == 8
    assert load_vae(tmp_path / "models/vae/best.ckpt").cfg.latent_dim == 6
    # resume: false also starts afresh
    result = run(make_params(epochs=1, latent_dim=6, resume=False), data_dir, tmp_path)
    assert result["steps"] == 8


def test_last_checkpoint_of_other_training_code_starts_afresh(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    run(make_params(epochs=1), data_dir, tmp_path)
    capsys.readouterr()
    monkeypatch.setattr(train_module, "training_code_digest", lambda: "0" * 16)  # as after an edit of model.py
    result = run(make_params(epochs=2), data_dir, tmp_path)
    assert "models/vae/last.ckpt: trained by other microfp code" in capsys.readouterr().err
    ckpt = torch.load(tmp_path / "models/vae/last.ckpt", weights_only=True)
    assert result["steps"] == 16 and (ckpt["epoch"], ckpt["global_step"]) == (1, 16)
    assert ckpt["hyper_parameters"]["training_code"] == "0" * 16


def _md5(path: Path) -> str:
    import hashlib

    return hashlib.md5(path.read_bytes()).hexdigest()


def test_two_trainings_are_bit_identical(data_dir: Path, tmp_path: Path) -> None:
    # same params, same machine, two directories -> the same bytes in every tracked output
    params = make_params(epochs=2, limit_train_batches=3, lr_schedule="cosine")
    a, b = tmp_path / "a", tmp_path / "b"
    run(params, data_dir, a)
    run(params, data_dir, b)
    for rel in ("models/vae/best.ckpt", "models/vae/last.ckpt", "metrics/train.json", "plots/train/loss.csv"):
        assert _md5(a / rel) == _md5(b / rel), rel
    wa = torch.load(a / "models/vae/best.ckpt", weights_only=True)["state_dict"]
    wb = torch.load(b / "models/vae/best.ckpt", weights_only=True)["state_dict"]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def textured_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """VEs whose grains share a VE-specific orientation (+- 0.03 of the range): a model that reads its
    input can reconstruct them, the set's mean field cannot."""
    root = tmp_path_factory.mktemp("textured")
    for name, count, seed in (("train", 32, 10), ("val", 8, 11)):
        ves = make_ves(np.random.default_rng(seed), count)
        rng = np.random.default_rng(seed + 100)
        base = rng.uniform(0.1, 0.9, (count, 1, 3))
        ves.euler[:] = ((base + rng.uniform(-0.03, 0.03, ves.euler.shape)) * EULER_SCALE).astype(np.float32)
        write_shard(root / name / "shard-00000.h5", ves)
    return root


@pytest.mark.parametrize("recipe", [
    dict(epochs=2, representation="quaternion", linear_grid=4, lr=1e-3),
    dict(epochs=2, representation="harmonics", linear_grid=4, lr=1e-3),  # the default profile's recipe
], ids=["quaternion-linear-path", "harmonics-linear-path"])
def test_a_tiny_model_beats_the_mean_field_of_its_set(textured_dir: Path, tmp_path: Path, recipe: dict) -> None:
    # learning happens: after a short training, reconstructions of the training VEs are closer to their
    # inputs (the project's own disorientation) than the set's mean field: the decoder uses the latent
    from microfp.evaluate import mean_field, reconstruction_metrics

    run(make_params(threads=2, lr_schedule="cosine", hidden_dim=64, base_channels=8, bottleneck_channels=8, beta=0.0,
                    **recipe), textured_dir, tmp_path)
    vae = load_vae(tmp_path / "models/vae/best.ckpt")
    ds = ShardDataset(textured_dir / "train", N)
    x = torch.stack([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        x_hat = vae.decode(vae.encode(x)[0])
    model = reconstruction_metrics(x, x_hat, "cubic")["disorientation_deg"].mean().item()
    baseline = reconstruction_metrics(x, mean_field(x, "cubic").expand_as(x).contiguous(), "cubic")
    baseline = baseline["disorientation_deg"].mean().item()
    print(f"tiny model {model:.2f} deg, mean field {baseline:.2f} deg")
    assert model < baseline - 2.0, (model, baseline)


def test_lazy_reading_with_a_worker_process(data_dir: Path, tmp_path: Path) -> None:
    result = run(make_params(epochs=1, cache_mb=0, num_workers=1), data_dir, tmp_path)
    assert result["steps"] == 8 and math.isfinite(result["val_loss"])


def test_warmup_and_curves(data_dir: Path, tmp_path: Path) -> None:
    result = run(make_params(epochs=2, beta=0.5, beta_warmup_epochs=2, limit_train_batches=3), data_dir, tmp_path)
    assert result["steps"] == 2 * 3
    rows = read_curve(tmp_path)
    assert [float(r["beta"]) for r in rows] == [0.0, 0.25]
    for r in rows:  # val_loss uses the full beta, so epochs stay comparable
        assert float(r["val_loss"]) == pytest.approx(float(r["val_recon"]) + 0.5 * float(r["val_kl"]), rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Checkpoints for downstream stages


def test_load_vae_errors(data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"no such checkpoint") as err:
        load_vae(tmp_path / "nope.ckpt")
    assert "\n" not in str(err.value)

    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match=r"bad.ckpt: not a readable checkpoint") as err:
        load_vae(bad)
    assert "\n" not in str(err.value)

    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(CheckpointError, match="not a microfp VAE checkpoint"):
        load_vae(other)

    run(make_params(epochs=1), data_dir, tmp_path)
    best = tmp_path / "models/vae/best.ckpt"
    with pytest.raises(CheckpointError) as err:
        load_vae(best, expect=make_params(latent_dim=64))
    assert str(err.value) == f"{best}: trained with latent_dim=8, params.yaml has 64"
    with pytest.raises(CheckpointError, match="encoder=resnet12, params.yaml has resnet18"):
        load_vae(best, expect=make_params(encoder="resnet18"))
    assert isinstance(err.value, MicrofpError)


def test_truncated_last_checkpoint_starts_afresh(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run(make_params(epochs=1), data_dir, tmp_path)
    last = tmp_path / "models/vae/last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])
    capsys.readouterr()
    result = run(make_params(epochs=1), data_dir, tmp_path)
    assert "last.ckpt: not a readable checkpoint" in capsys.readouterr().err
    assert result["steps"] == 8


# ---------------------------------------------------------------------------------------------
# Bad input: one line, a MicrofpError


def _one_line_error(params: Params, data: Path, tmp: Path, match: str) -> None:
    with pytest.raises(MicrofpError, match=match) as err:
        run(params, data, tmp)
    assert "\n" not in str(err.value)


def test_missing_set_directory(tmp_path: Path) -> None:
    _one_line_error(make_params(), tmp_path / "nothing", tmp_path, r"nothing/train: no such set directory")


def test_empty_set_directory(tmp_path: Path) -> None:
    (tmp_path / "d/train").mkdir(parents=True)
    _one_line_error(make_params(), tmp_path / "d", tmp_path, r"d/train: no shards found")


def test_corrupt_shard(data_dir: Path, tmp_path: Path) -> None:
    write_set(tmp_path / "d/train", 8, seed=3)
    write_set(tmp_path / "d/val", 8, seed=4)
    shard = tmp_path / "d/val/shard-00000.h5"
    shard.write_bytes(shard.read_bytes()[:2000])
    _one_line_error(make_params(), tmp_path / "d", tmp_path, r"d/val/shard-00000.h5: corrupt or truncated shard")


def test_ve_size_mismatch(tmp_path: Path) -> None:
    write_set(tmp_path / "d/train", 4, seed=3, n=32)
    _one_line_error(make_params(), tmp_path / "d", tmp_path,
                    r"shard-00000.h5: VEs are 32\^3 voxels but params.yaml has ve_size=16")


def test_invalid_ve_found_by_a_lazy_worker_is_one_line(tmp_path: Path) -> None:
    write_set(tmp_path / "d/train", 8, seed=3)
    write_set(tmp_path / "d/val", 8, seed=4)
    with h5py.File(tmp_path / "d/train/shard-00000.h5", "r+") as f:  # bypasses write_shard's checks
        f["grain_ids"][5] = 60000
    _one_line_error(make_params(cache_mb=0, num_workers=1, epochs=1), tmp_path / "d", tmp_path,
                    r"shard-00000.h5: VE 5 is invalid")


def test_train_command_and_help(data_dir: Path, tmp_path: Path) -> None:
    import typer
    from typer.testing import CliRunner

    app = typer.Typer()
    app.command("train")(train_command)
    app.command("other")(lambda: None)
    runner = CliRunner()
    result = runner.invoke(app, ["train", "--help"])
    assert result.exit_code == 0
    for option in ("--params", "--data", "--out", "--metrics", "--plots", "Train the 3D ResNet VAE"):
        assert option in result.output

    result = runner.invoke(app, ["train", "--params", str(tmp_path / "missing.yaml")])
    assert isinstance(result.exception, MicrofpError)  # the CLI turns it into one line + exit 2

    import yaml

    raw = make_params(epochs=1).model_dump(mode="json")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    result = runner.invoke(app, ["train", "--data", str(data_dir)])  # defaults relative to the cwd
    assert result.exit_code == 0, result.output
    assert (tmp_path / "models/vae/last.ckpt").is_file() and (tmp_path / "metrics/train.json").is_file()
    assert (tmp_path / "plots/train/loss.csv").is_file()


# ---------------------------------------------------------------------------------------------
# MLflow against a real tracking server on 127.0.0.1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen(
        [str(mlflow_bin), "server", "--backend-store-uri", f"sqlite:///{root / 'store.db'}",
         "--default-artifact-root", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server's own process group (start_new_session)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_mlflow_run_arrives_at_a_tracking_server(
    mlflow_server: str, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("DVC_EXP_NAME", "exp-tiny")
    result = run(make_params(epochs=2, mlflow=True), data_dir, tmp_path)

    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name("microfp-train")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    r = runs[0]
    assert r.info.status == "FINISHED" and r.info.run_name == "exp-tiny"
    assert r.data.tags["dvc_exp_name"] == "exp-tiny"
    assert r.data.tags["checkpoint"].endswith("models/vae/best.ckpt")
    assert r.data.params["latent_dim"] == "8" and r.data.params["train.lr"] == "0.01"
    assert r.data.params["param_count.total"] == str(int(result["param_count"]))
    assert r.data.metrics["param_count_total"] == result["param_count"]
    history = client.get_metric_history(r.info.run_id, "val_recon")
    assert [m.step for m in history] == [1, 2]
    assert history[-1].value == pytest.approx(result["val_recon"], rel=1e-6)
    for key in ("train_loss", "train_bce", "train_fft", "train_kl", "val_loss", "val_bce", "val_fft", "val_kl"):
        assert key in r.data.metrics

    # resuming continues the same run
    run(make_params(epochs=3, mlflow=True), data_dir, tmp_path)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "val_recon")] == [1, 2, 3]


def test_mlflow_defaults_to_sqlite_in_the_working_directory(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    # the working directory is a git checkout: the run records its revision
    git = ["git", "-c", "user.email=t@example.com", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "x"], cwd=tmp_path, check=True)
    revision = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True,
                              check=True).stdout.strip()
    run(make_params(epochs=1, mlflow=True), data_dir, tmp_path)
    assert (tmp_path / "mlflow.db").is_file()
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("microfp-train")
    (r,) = client.search_runs([exp.experiment_id])
    assert r.data.tags["git_revision"] == r.data.tags["mlflow.source.git.commit"] == revision
