"""Out-of-distribution score (microfp.ood): the distance, calibration, file, and flag rates on real fingerprints."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from microfp import ood
from microfp.config import parse_params
from microfp.datasets import generate_set
from microfp.fingerprints import fingerprint, latent_columns, read_fingerprints

from conftest import tiny_raw
from test_evaluate import TINY_TRAIN, make_checkpoint


def test_distance_is_the_mahalanobis_distance_of_the_shrunk_covariance() -> None:
    from scipy.spatial.distance import mahalanobis
    from sklearn.covariance import LedoitWolf

    rng = np.random.default_rng(0)
    train = rng.normal(size=(300, 5)) * [1, 2, 3, 0.5, 0.1] + 4
    val = rng.normal(size=(100, 5)) * [1, 2, 3, 0.5, 0.1] + 4
    cal = ood.fit(train, val, {"crystal": "cubic"})
    lw = LedoitWolf().fit(train)
    z = rng.normal(size=(7, 5))
    expected = [mahalanobis(v, lw.location_, lw.precision_) for v in z]
    np.testing.assert_allclose(cal.distance(z), expected, rtol=1e-10)
    # calibrated on val: 1 of 100 validation VEs lies above the 99th percentile, none of the same
    # distribution far out, all of a shifted one
    assert cal.score(val)["ood_flag"].sum() == 1
    assert cal.percentile(cal.distance(val)).max() == 100.0
    assert cal.score(train[:50] + [0, 0, 0, 0, 5])["ood_flag"].all()  # 50 std along the tight axis
    pct = cal.percentile(np.array([0.0, np.median(cal.val_distances), 1e9]))
    assert pct[0] == 0 and 49 <= pct[1] <= 51 and pct[2] == 100
    assert cal.meta["crystal"] == "cubic" and cal.meta["n_train"] == 300 and cal.meta["n_val"] == 100


def test_file_round_trip_and_bad_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    cal = ood.fit(rng.normal(size=(40, 3)), rng.normal(size=(20, 3)), {"resolution": 0.5})
    ood.save(tmp_path / "m_ood.json", cal)
    again = ood.load(tmp_path / "m_ood.json")
    z = rng.normal(size=(5, 3))
    np.testing.assert_array_equal(again.distance(z), cal.distance(z))
    assert again.threshold == cal.threshold and again.meta == cal.meta
    assert ood.default_path("models/vae/best.ckpt") == Path("models/vae_ood.json")
    with pytest.raises(ood.OODError, match="no OOD calibration"):
        ood.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "other.json").write_text(json.dumps({"format": "x"}))
    for name in ("bad.json", "other.json"):
        with pytest.raises(ood.OODError) as err:
            ood.load(tmp_path / name)
        assert "\n" not in str(err.value)
    with pytest.raises(ood.OODError, match="3 values, the OOD calibration 4"):
        ood.fit(rng.normal(size=(9, 4)), rng.normal(size=(3, 4))).distance(z)
    with pytest.raises(ood.OODError, match=">= 2 training"):
        ood.fit(z[:1], z)


@pytest.fixture(scope="module")
def sets(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Fingerprints of a random-texture model: training, validation and held-out random VEs, textured
    (brass, cube) and small-grain VEs (16^3 at resolution 1, ESD 5.78 except small 2.73)."""
    root = tmp_path_factory.mktemp("ood")
    raw = tiny_raw(train={"n": 256}, val={"n": 128}, heldout={"n": 128}, brass={"n": 32, "texture": "brass"},
                   cube={"n": 32, "texture": "cube"}, small={"n": 32, "esd_mean": 2.73})
    raw["train"] = dict(TINY_TRAIN)
    raw["evaluate"] = {"mlflow": False, "sets": list(raw["generate"]["sets"]), "twopoint_max_fit": 256}
    params = parse_params(raw)
    for name in params.generate.sets:
        generate_set(params, name, root / "ves" / name, workers=1, progress=False)
    ckpt = make_checkpoint(params, root / "vae" / "best.ckpt")
    fingerprint(params, ckpt, root / "ves", root / "fp", root / "fp2", ood_out=ood.default_path(ckpt), val_set="val")
    return {"root": root, "params": params, "ckpt": ckpt, "names": list(params.generate.sets)}


def flag_rates(directory: Path, names: list[str], k: int, cal: ood.OODCalibration | None = None) -> dict[str, float]:
    z = {name: read_fingerprints(directory, name)[latent_columns(k)].to_numpy() for name in names}
    cal = cal or ood.fit(z["train"], z["val"])
    return {name: float(cal.score(v)["ood_flag"].mean()) for name, v in z.items()}


def test_textured_and_small_grain_ves_are_flagged_random_ones_are_not(sets: dict) -> None:
    """The 2-point fingerprints of the random-texture training set (PCA fitted on it, microfp's
    baseline fingerprint) know texture: the score flags textured and small-grain VEs, not held-out
    random ones. (The untrained tiny VAE of the test suite does not encode texture, so its flag rates
    say nothing about the score; the stage's own log reports them for the real model.)"""
    rates = flag_rates(sets["root"] / "fp2", sets["names"], 8)
    print("flag rates, 2-point fingerprints:", rates)
    print("flag rates, tiny untrained VAE:", flag_rates(sets["root"] / "fp", sets["names"], 8))
    assert rates["brass"] >= 0.9 and rates["cube"] >= 0.9, rates
    assert rates["val"] <= 0.02 and rates["heldout"] <= 0.02, rates


def test_fingerprint_stage_writes_the_vae_calibration(sets: dict) -> None:
    cal = ood.load(ood.default_path(sets["ckpt"]))
    p = sets["params"]
    assert cal.meta["crystal"] == "cubic" and cal.meta["resolution"] == p.resolution and cal.meta["ve_size"] == p.ve_size
    assert cal.meta["n_train"] == 256 and cal.meta["n_val"] == 128 and cal.latent_dim == p.latent_dim
    z = {n: read_fingerprints(sets["root"] / "fp", n)[latent_columns(8)].to_numpy() for n in ("train", "val")}
    again = ood.fit(z["train"], z["val"])
    np.testing.assert_allclose(cal.distance(z["val"]), again.distance(z["val"]), rtol=1e-9)
    assert cal.score(z["val"])["ood_flag"].mean() <= 0.02  # above the interpolated 99th percentile: 2 of 128
