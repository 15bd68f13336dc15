"""Reconstruction metrics (phi4, disorientation) against damask, and the ``evaluate`` stage on tiny data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import damask
import numpy as np
import pytest
import torch

from conftest import tiny_raw
from microfp.config import Params, parse_params
from microfp.datasets import generate_set
from microfp.errors import MicrofpError
from microfp.evaluate import disorientation_angle, disorientation_angle_damask, evaluate, reconstruction_metrics
from microfp.rotations import euler_to_quaternion as euler_to_quaternion_t
from microfp.rotations import phi4, quaternion_multiply
from microfp.setdata import find_sets
from microfp.shards import EULER_SCALE, ShardError
from microfp.model import CheckpointError
from microfp.train import VAEModule

FAMILIES = ("cubic", "hexagonal")

# ---------------------------------------------------------------------------------------------
# Tiny data and checkpoints, shared with test_fingerprints.py and test_analysis.py

TINY_TRAIN = {"hidden_dim": 32, "base_channels": 4, "bottleneck_channels": 4, "mlflow": False}


def tiny_params(**overrides: Any) -> Params:
    raw = tiny_raw(
        train={"n": 10},
        val={"n": 4},
        brass={"n": 5, "texture": "brass"},
        cube={"n": 5, "texture": "cube"},
        large={"n": 3, "esd_mean": 12.0},
        hcp={"n": 3, "crystal": "hexagonal"},
    )
    raw["train"] = dict(TINY_TRAIN)
    raw["evaluate"] = {"mlflow": False}
    for key, value in overrides.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return parse_params(raw)


def make_data(params: Params, root: Path) -> Path:
    for name in params.generate.sets:
        generate_set(params, name, root / name, workers=1, progress=False)
    return root


def make_checkpoint(params: Params, path: Path, seed: int = 0) -> Path:
    """A checkpoint as Lightning writes it (state_dict + hyper_parameters) of an untrained tiny VAE."""
    torch.manual_seed(seed)
    module = VAEModule.from_params(params)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), "epoch": 0}, path)
    return path


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("tiny")
    params = tiny_params()
    return {"params": params, "data": make_data(params, root / "ves"), "ckpt": make_checkpoint(params, root / "best.ckpt")}


def no_temp_files(root: Path) -> bool:
    return not [p for p in root.rglob("*") if ".tmp" in p.name]


# ---------------------------------------------------------------------------------------------
# Metrics against damask


def random_euler(n: int, seed: int) -> np.ndarray:
    return np.asarray(damask.Rotation.from_random(n, rng_seed=seed).as_Euler_angles()).reshape(n, 3)


def test_quaternions_and_products_match_damask() -> None:
    e1, e2 = random_euler(2000, 1), random_euler(2000, 2)
    q1 = euler_to_quaternion_t(torch.from_numpy(e1))
    q2 = euler_to_quaternion_t(torch.from_numpy(e2))
    r1, r2 = damask.Rotation.from_Euler_angles(e1), damask.Rotation.from_Euler_angles(e2)
    np.testing.assert_allclose(q1.numpy(), r1.quaternion, atol=1e-12)
    prod = quaternion_multiply(q1, q2).numpy()
    prod *= np.where(prod[:, :1] < 0, -1.0, 1.0)
    np.testing.assert_allclose(prod, (r1 * r2).quaternion, atol=1e-12)


def test_phi4_against_damask_misorientation() -> None:
    e1, e2 = random_euler(3000, 3), random_euler(3000, 4)
    q1, q2 = (euler_to_quaternion_t(torch.from_numpy(e)) for e in (e1, e2))
    p = phi4(q1, q2).numpy()
    r1, r2 = damask.Rotation.from_Euler_angles(e1), damask.Rotation.from_Euler_angles(e2)
    np.testing.assert_allclose(p, 1 - np.abs(np.sum(r1.quaternion * r2.quaternion, axis=-1)), atol=1e-12)
    # phi4 = 1 - cos(omega / 2) with omega the plain (symmetry-blind) misorientation angle
    omega = np.asarray(r1.misorientation_angle(r2))
    np.testing.assert_allclose(p, 1 - np.cos(omega / 2), atol=1e-9)
    assert p.min() >= 0 and p.max() <= 1
    # identical rotations, and q vs -q, give 0
    assert phi4(q1, q1).abs().max() < 1e-12
    assert phi4(q1, -q1).abs().max() < 1e-12


@pytest.mark.parametrize("family", FAMILIES)
def test_disorientation_matches_damask_on_random_pairs(family: str) -> None:
    e1, e2 = random_euler(5000, 5), random_euler(5000, 6)
    q1, q2 = (euler_to_quaternion_t(torch.from_numpy(e)) for e in (e1, e2))
    ours = disorientation_angle(q1, q2, family).numpy()
    o1 = damask.Orientation.from_Euler_angles(phi=e1, family=family)
    o2 = damask.Orientation.from_Euler_angles(phi=e2, family=family)
    ref = np.asarray(o1.disorientation_angle(o2))
    np.testing.assert_allclose(ours, ref, atol=1e-9)
    # the full (not closed-form) disorientation agrees too, on a subset
    full = np.asarray(o1[:300].disorientation(o2[:300]).as_axis_angle(pair=True)[1])
    np.testing.assert_allclose(ours[:300], full, atol=1e-6)
    # the chunked damask reference gives the same in small chunks
    np.testing.assert_allclose(disorientation_angle_damask(e1, e2, family, chunk=777), ref, atol=1e-12)
    # bounded by the largest disorientation of the family (62.8 deg cubic, 93.8 deg hexagonal)
    assert np.degrees(ours.max()) < (62.81 if family == "cubic" else 93.9)


@pytest.mark.parametrize("family", FAMILIES)
def test_symmetry_equivalent_pairs(family: str) -> None:
    e = random_euler(200, 7)
    ori = damask.Orientation.from_Euler_angles(phi=e, family=family)
    q = euler_to_quaternion_t(torch.from_numpy(e))
    equivalents = ori.equivalent  # (n_ops, 200)
    for k in range(equivalents.shape[0]):
        qe = torch.from_numpy(np.asarray(equivalents[k].quaternion))
        angle = disorientation_angle(q, qe, family)
        assert angle.max() < 1e-6, (family, k)
        if k > 0:  # phi4 is not symmetry-aware: a symmetry operation of angle w gives 1 - cos(w / 2)
            assert phi4(q, qe).min() > 0.01
    # via Euler angles of the equivalents, as the reduced angles of a VE would be
    eq_euler = np.asarray(equivalents[3].as_Euler_angles())
    q3 = euler_to_quaternion_t(torch.from_numpy(eq_euler))
    assert disorientation_angle(q, q3, family).max() < 1e-6


def test_unknown_family_is_an_error() -> None:
    q = euler_to_quaternion_t(torch.zeros(2, 3, dtype=torch.float64))
    with pytest.raises(MicrofpError, match="cubic or hexagonal"):
        disorientation_angle(q, q, "tetragonal")


def _field(euler_per_grain: np.ndarray, grain_ids: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.moveaxis(euler_per_grain[grain_ids] / EULER_SCALE, -1, 0)[None].astype(np.float32))


def test_reconstruction_metrics_identity_and_known_rotation() -> None:
    rng = np.random.default_rng(0)
    gids = rng.integers(0, 5, size=(8, 8, 8))
    euler = random_euler(5, 8)
    x = _field(euler, gids)
    m = reconstruction_metrics(x, x.clone(), "cubic")
    assert m["phi4"].item() < 1e-12 and m["disorientation_deg"].item() < 1e-3
    assert m["within_5deg"].item() == 1.0
    # every grain rotated by 3 degrees about the sample z axis: disorientation 3 deg everywhere
    rotated = damask.Rotation.from_axis_angle([0, 0, 1, 3], degrees=True) * damask.Rotation.from_Euler_angles(euler)
    e2 = np.asarray(rotated.as_Euler_angles())
    e2[:, [0, 2]] %= 2 * np.pi
    m = reconstruction_metrics(x, _field(e2, gids), "cubic")
    assert m["disorientation_deg"].item() == pytest.approx(3.0, abs=2e-3)  # float32 storage of the field
    assert m["phi4"].item() == pytest.approx(1 - np.cos(np.radians(3) / 2), rel=1e-2)
    assert m["phi4_map"].shape == (1, 8, 8, 8)
    with pytest.raises(MicrofpError, match="equal shape"):
        reconstruction_metrics(x, x[:, :, :4], "cubic")


def test_metrics_per_ve_are_means_over_voxels() -> None:
    x = torch.rand(3, 3, 6, 6, 6, generator=torch.Generator().manual_seed(0))
    y = torch.rand(3, 3, 6, 6, 6, generator=torch.Generator().manual_seed(1))
    m = reconstruction_metrics(x, y, "hexagonal")
    e1 = (x.double().numpy() * EULER_SCALE[None, :, None, None, None]).transpose(0, 2, 3, 4, 1).reshape(3, -1, 3)
    e2 = (y.double().numpy() * EULER_SCALE[None, :, None, None, None]).transpose(0, 2, 3, 4, 1).reshape(3, -1, 3)
    for b in range(3):
        ref = np.degrees(disorientation_angle_damask(e1[b], e2[b], "hexagonal")).mean()
        assert m["disorientation_deg"][b].item() == pytest.approx(ref, abs=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_metrics_on_gpu_equal_cpu() -> None:
    x = torch.rand(2, 3, 16, 16, 16)
    y = torch.rand(2, 3, 16, 16, 16)
    cpu = reconstruction_metrics(x, y, "cubic")
    gpu = reconstruction_metrics(x.cuda(), y.cuda(), "cubic")
    for key in ("phi4", "disorientation_deg"):
        np.testing.assert_allclose(gpu[key].cpu().numpy(), cpu[key].numpy(), atol=1e-9)


# ---------------------------------------------------------------------------------------------
# The stage


def test_evaluate_writes_metrics_per_set_and_plots(tiny: dict[str, Any], tmp_path: Path) -> None:
    params = tiny_params(evaluate={"max_ves_per_set": 4, "batch_size": 3})
    out = evaluate(params, tiny["ckpt"], tiny["data"], tmp_path / "metrics/reconstruction.json", tmp_path / "plots")
    written = json.loads((tmp_path / "metrics/reconstruction.json").read_text())
    assert written == json.loads(json.dumps(out))
    assert set(written) == {"train", "val", "brass", "cube", "large", "hcp"}
    for name, m in written.items():
        assert all(isinstance(v, (int, float)) for v in m.values()), name  # flat numbers for dvc metrics
        assert {"phi4_mean", "phi4_std", "disorientation_deg_mean", "n_ves"} <= set(m)
        assert 0 <= m["phi4_mean"] <= 1 and m["disorientation_deg_mean"] >= 0
        assert (tmp_path / "plots" / f"{name}.png").stat().st_size > 1000
    assert written["train"]["n_ves"] == 4 and written["large"]["n_ves"] == 3  # limit and smaller sets
    # the yardstick (previous VE of the set as "reconstruction"): random cubic texture ~40.7 deg
    assert 30 < written["train"]["reference_disorientation_deg_mean"] < 50
    assert written["cube"]["reference_disorientation_deg_mean"] < 10
    assert written["hcp"]["disorientation_deg_mean"] <= 93.9
    assert no_temp_files(tmp_path)


def test_evaluate_selected_sets_and_an_ideal_model(tiny: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model that returns its input scores phi4 = 0 and disorientation 0 (through the whole stage)."""
    import microfp.evaluate as ev

    class Identity(torch.nn.Module):
        def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x, x

        def decode(self, z: torch.Tensor) -> torch.Tensor:
            return z

    monkeypatch.setattr(ev, "load_vae", lambda *a, **k: Identity())
    params = tiny_params(evaluate={"sets": ["cube", "hcp"]})
    out = evaluate(params, tiny["ckpt"], tiny["data"], tmp_path / "r.json", None)
    assert set(out) == {"cube", "hcp"}
    for m in out.values():
        assert m["phi4_mean"] < 1e-7 and m["disorientation_deg_mean"] < 0.05 and m["within_5deg"] == 1.0


def test_bad_inputs_are_one_line_errors(tiny: dict[str, Any], tmp_path: Path) -> None:
    params = tiny["params"]
    with pytest.raises(CheckpointError, match="no such checkpoint") as err:
        evaluate(params, tmp_path / "missing.ckpt", tiny["data"], tmp_path / "r.json", None)
    assert "\n" not in str(err.value)
    other = make_checkpoint(tiny_params(latent_dim=6), tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match="trained with latent_dim=6, params.yaml has 8") as err:
        evaluate(params, other, tiny["data"], tmp_path / "r.json", None)
    assert "\n" not in str(err.value)
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        evaluate(params, bad, tiny["data"], tmp_path / "r.json", None)
    with pytest.raises(ShardError, match="no such data directory"):
        evaluate(params, tiny["ckpt"], tmp_path / "nodata", tmp_path / "r.json", None)
    (tmp_path / "empty/train").mkdir(parents=True)
    with pytest.raises(ShardError, match="no sets with shards"):
        evaluate(params, tiny["ckpt"], tmp_path / "empty", tmp_path / "r.json", None)
    with pytest.raises(ShardError, match="nope: no shards found") as err:
        evaluate(tiny_params(evaluate={"sets": ["train", "nope"]}), tiny["ckpt"], tiny["data"], tmp_path / "r.json", None)
    assert "\n" not in str(err.value)
    with pytest.raises(ShardError, match="VEs are 16\\^3 voxels but params.yaml has ve_size=32"):
        big = tiny_params(ve_size=32)
        evaluate(big, make_checkpoint(big, tmp_path / "big.ckpt"), tiny["data"], tmp_path / "r.json", None)
    assert not (tmp_path / "r.json").exists()


def test_find_sets_order(tiny: dict[str, Any]) -> None:
    assert find_sets(tiny["data"]) == ["train", "val", "brass", "cube", "hcp", "large"]
    assert find_sets(tiny["data"], ["cube"]) == ["cube"]


def test_evaluate_logs_to_mlflow(tiny: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    params = tiny_params(evaluate={"mlflow": True, "sets": ["cube"], "max_ves_per_set": 2})
    out = evaluate(params, tiny["ckpt"], tiny["data"], tmp_path / "r.json", None)
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("microfp-evaluate")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.data.metrics["cube.phi4_mean"] == pytest.approx(out["cube"]["phi4_mean"])
    assert run.data.params["latent_dim"] == "8" and run.data.tags["microfp.stage"] == "evaluate"
    assert run.data.tags["checkpoint"] == str(tiny["ckpt"].resolve())
