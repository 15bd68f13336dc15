"""Out-of-distribution check (microfp.ood): the two checks (fingerprint, microstructure descriptor), the
joint calibration, the file, and flag rates on VEs microfp generates."""

from __future__ import annotations

import json
from pathlib import Path

import damask
import numpy as np
import pytest

from microfp import ood
from microfp.config import parse_params
from microfp.datasets import generate_set
from microfp.fingerprints import fingerprint, latent_columns, read_fingerprints
from microfp.shards import euler_field, read_set

from conftest import tiny_raw
from test_evaluate import TINY_TRAIN, make_checkpoint


def gaussian(rng: np.random.Generator, n: int, shift: float = 0.0) -> dict[str, np.ndarray]:
    """Two checks' descriptors of n VEs: a 5-value "fingerprint" and a 3-value "microstructure"."""
    return {"fingerprint": rng.normal(size=(n, 5)) * [1, 2, 3, 0.5, 0.1] + 4,
            "microstructure": rng.normal(size=(n, 3)) * [0.1, 1, 1] + [shift, 0, 0]}


def test_distance_is_the_mahalanobis_distance_of_the_shrunk_covariance() -> None:
    from scipy.spatial.distance import mahalanobis
    from sklearn.covariance import LedoitWolf

    rng = np.random.default_rng(0)
    train, val = gaussian(rng, 300), gaussian(rng, 100)
    cal = ood.fit(train, val, {"crystal": "cubic"})
    for name in ood.CHECKS:
        lw = LedoitWolf().fit(train[name])
        x = rng.normal(size=(7, train[name].shape[1]))
        expected = [mahalanobis(v, lw.location_, lw.precision_) for v in x]
        np.testing.assert_allclose(cal.checks[name].distance(x), expected, rtol=1e-10)
    pct = cal.checks["fingerprint"].percentile(np.array([0.0, np.median(cal.checks["fingerprint"].val_distances), 1e9]))
    assert pct[0] == 0 and 49 <= pct[1] <= 51 and pct[2] == 100
    assert cal.meta["crystal"] == "cubic" and cal.meta["n_train"] == 300 and cal.meta["n_val"] == 100
    assert cal.meta["checks"] == ["fingerprint", "microstructure"]


def test_the_checks_are_calibrated_jointly_and_either_one_flags() -> None:
    """1 of 100 validation VEs is flagged (not up to 2, as with each check at its own 99th
    percentile); a VE off in one check only is flagged by that check; the combined flag is the OR."""
    val = gaussian(np.random.default_rng(2), 100)
    cal = ood.fit(gaussian(np.random.default_rng(3), 300), val)
    s = cal.score_descriptors(val)
    assert s["ood_flag"].sum() == 1 and s["ood_percentile"].max() == 100.0
    assert np.array_equal(s["ood_flag"], s["ood_fingerprint_flag"] | s["ood_microstructure_flag"])
    fresh = cal.score_descriptors(gaussian(np.random.default_rng(5), 400))  # new VEs of the training distribution
    assert fresh["ood_flag"].mean() <= 0.03
    off = cal.score_descriptors(gaussian(np.random.default_rng(4), 50, shift=5.0))  # 50 std along the tight axis
    assert off["ood_microstructure_flag"].all() and off["ood_flag"].all() and off["ood_fingerprint_flag"].mean() <= 0.1
    with pytest.raises(ood.OODError, match="no microstructure descriptors"):
        cal.score_descriptors({"fingerprint": val["fingerprint"]})
    with pytest.raises(ood.OODError, match="needs the VEs' orientation fields"):
        cal.score(val["fingerprint"])


def test_file_round_trip_old_format_and_bad_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    cal = ood.fit(gaussian(rng, 40), gaussian(rng, 20), {"resolution": 0.5})
    ood.save(tmp_path / "m_ood.json", cal)
    again = ood.load(tmp_path / "m_ood.json")
    x = gaussian(rng, 5)
    for key, value in cal.score_descriptors(x).items():
        np.testing.assert_array_equal(again.score_descriptors(x)[key], value)
    assert again.threshold == cal.threshold and again.meta == cal.meta
    assert json.dumps(ood.to_dict(again), sort_keys=True) == json.dumps(ood.to_dict(cal), sort_keys=True)  # exact via JSON
    assert ood.default_path("models/vae/best.ckpt") == Path("models/vae_ood.json")
    # the previous format (fingerprint check only, flagged above its own threshold) still reads
    c = cal.checks["fingerprint"]
    v1 = {"format": "microfp-ood-1", "mean": c.mean.tolist(), "precision": c.precision.tolist(),
          "val_distances": c.val_distances.tolist(), "threshold": c.scale, "meta": {"crystal": "cubic"}}
    (tmp_path / "v1.json").write_text(json.dumps(v1))
    old = ood.load(tmp_path / "v1.json")
    s = old.score_descriptors({"fingerprint": x["fingerprint"]})
    assert list(old.checks) == ["fingerprint"] and "ood_microstructure_flag" not in s
    np.testing.assert_array_equal(s["ood_flag"], c.distance(x["fingerprint"]) > c.scale)
    with pytest.raises(ood.OODError, match="no OOD calibration"):
        ood.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "other.json").write_text(json.dumps({"format": "x"}))
    (tmp_path / "nocheck.json").write_text(json.dumps({**ood.to_dict(cal), "checks": {}}))
    for name in ("bad.json", "other.json", "nocheck.json"):
        with pytest.raises(ood.OODError) as err:
            ood.load(tmp_path / name)
        assert "\n" not in str(err.value)
    with pytest.raises(ood.OODError, match="3 values, the OOD calibration 5"):
        cal.checks["fingerprint"].distance(rng.normal(size=(2, 3)), "fingerprint")
    with pytest.raises(ood.OODError, match=">= 2 training"):
        ood.fit({k: v[:1] for k, v in x.items()}, x)
    with pytest.raises(ood.OODError, match="fingerprint required"):
        ood.fit({"microstructure": x["microstructure"]}, {"microstructure": x["microstructure"]})
    with pytest.raises(ood.OODError, match="must be .* normalised Euler"):
        ood.microstructure_descriptor(np.zeros((2, 4, 4, 4)), "cubic")


# ---------------------------------------------------------------------------------------------
# The microstructure descriptor


def two_grain_field(euler_a: np.ndarray, euler_b: np.ndarray, n: int = 8, axis: int = 0) -> np.ndarray:
    """A normalised Euler field (3, n, n, n): grain a below n/2 along ``axis``, grain b above."""
    ids = np.zeros((n, n, n), dtype=np.int64)
    index = [slice(None)] * 3
    index[axis] = slice(n // 2, None)
    ids[tuple(index)] = 1
    return euler_field(ids, np.stack([euler_a, euler_b]))


def test_descriptor_texture_part_is_symmetry_invariant_and_zero_on_average_for_random_texture() -> None:
    euler = np.asarray(damask.Rotation.from_random(200, rng_seed=1).as_Euler_angles()).reshape(-1, 3)
    counts = np.ones(200, dtype=np.int64)
    assert np.abs(ood.texture_coefficients(euler, counts, "cubic")).max() < 0.1  # 200 random grains
    cube = np.zeros((1, 3))
    assert np.abs(ood.texture_coefficients(cube, np.ones(1, np.int64), "cubic")).max() > 0.3
    # a symmetry-equivalent orientation gives the same coefficients
    for family in ("cubic", "hexagonal"):
        o = damask.Orientation.from_Euler_angles(phi=euler[:5], family=family)
        equivalent = np.asarray(o.equivalent[3].as_Euler_angles()).reshape(-1, 3)
        np.testing.assert_allclose(ood.texture_coefficients(equivalent, counts[:5], family),
                                   ood.texture_coefficients(euler[:5], counts[:5], family), atol=1e-9)


def test_descriptor_boundary_part_counts_pairs_across_high_angle_boundaries_per_axis() -> None:
    a = np.array([0.3, 0.5, 0.7])
    big = np.array([0.3 + np.radians(20), 0.5, 0.7])
    small = np.array([0.3 + np.radians(2), 0.5, 0.7])
    n = 8
    for axis in range(3):
        d = ood.microstructure_descriptor(two_grain_field(a, big, n, axis), "cubic")[0]
        expected = np.zeros(3)
        expected[axis] = n * n / ((n - 1) * n * n)  # one boundary plane, no wrap-around pair
        np.testing.assert_allclose(d[-3:], expected)
    d = ood.microstructure_descriptor(two_grain_field(a, small, n, 0), "cubic")[0]
    assert (d[-3:] == 0).all()  # 2 degrees: below BOUNDARY_DEG, not a grain boundary
    # symmetry-equivalent neighbours (90 degrees about a cube axis) are the same grain
    d = ood.microstructure_descriptor(two_grain_field(np.zeros(3), np.array([np.pi / 2, 0, 0]), n, 1), "cubic")[0]
    assert (d[-3:] == 0).all()


def test_descriptor_is_deterministic_and_per_ve(tmp_path: Path) -> None:
    raw = tiny_raw(train={"n": 4}, val={"n": 2})
    params = parse_params(raw)
    generate_set(params, "train", tmp_path / "train", workers=1, progress=False)
    ves = read_set(tmp_path / "train")
    fields = np.stack([ves.orientation_field(i) for i in range(len(ves))])
    once = ood.microstructure_descriptor(fields, "cubic")
    assert once.shape == (4, 12) and once.dtype == np.float64
    assert np.array_equal(once, ood.microstructure_descriptor(fields, "cubic"))
    assert np.array_equal(once[2:3], ood.microstructure_descriptor(fields[2], "cubic"))
    assert ((once[:, -3:] > 0.05) & (once[:, -3:] < 0.5)).all()


@pytest.fixture(scope="module")
def sets(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A random-texture model and its OOD calibration (written by the fingerprint stage): training,
    validation and held-out random VEs, textured (brass, cube) and small-grain VEs (16^3 at
    resolution 1, ESD 5.78 except small 2.73)."""
    root = tmp_path_factory.mktemp("ood")
    raw = tiny_raw(train={"n": 192}, val={"n": 128}, heldout={"n": 128}, brass={"n": 32, "texture": "brass"},
                   cube={"n": 32, "texture": "cube"}, small={"n": 32, "esd_mean": 2.73})
    raw["train"] = dict(TINY_TRAIN)
    raw["evaluate"] = {"mlflow": False, "sets": list(raw["generate"]["sets"]), "twopoint_max_fit": 192}
    params = parse_params(raw)
    for name in params.generate.sets:
        generate_set(params, name, root / "ves" / name, workers=1, progress=False)
    ckpt = make_checkpoint(params, root / "vae" / "best.ckpt")
    fingerprint(params, ckpt, root / "ves", root / "fp", root / "fp2", ood_out=ood.default_path(ckpt), val_set="val")
    return {"root": root, "params": params, "ckpt": ckpt, "names": list(params.generate.sets)}


def stage_rates(sets: dict) -> dict[str, dict[str, float]]:
    """Share of every set flagged by the calibration the stage wrote: per check and combined."""
    cal = ood.load(ood.default_path(sets["ckpt"]))
    rates = {}
    for name in sets["names"]:
        z = read_fingerprints(sets["root"] / "fp", name)[latent_columns(8)].to_numpy()
        ves = read_set(sets["root"] / "ves" / name)
        s = cal.score(z, np.stack([ves.orientation_field(i) for i in range(len(ves))]))
        rates[name] = {key[4:-5] or "combined": float(s[key].mean()) for key in s if key.endswith("_flag")}
    return rates


def test_textured_and_small_grain_ves_are_flagged_random_ones_are_not(sets: dict) -> None:
    """Issue 14's bar, with the random-texture model: >= 90 % of textured and small-grain VEs flagged,
    <= 2 % of validation (and held-out random) VEs. The tiny VAE of the test suite is untrained, its
    fingerprints do not see texture (nor, on the default profile's data, does the real VAE yet): the
    microstructure check, computed from the orientation field, flags them anyway."""
    rates = stage_rates(sets)
    print("flag rates (fingerprint / microstructure / combined):", rates)
    for name in ("brass", "cube", "small"):
        assert rates[name]["combined"] >= 0.9 and rates[name]["microstructure"] >= 0.9, rates
    for name in ("val", "heldout"):
        assert rates[name]["combined"] <= 0.02, rates


def test_fingerprint_stage_writes_the_calibration_of_both_checks(sets: dict) -> None:
    cal = ood.load(ood.default_path(sets["ckpt"]))
    p = sets["params"]
    assert cal.meta["crystal"] == "cubic" and cal.meta["resolution"] == p.resolution and cal.meta["ve_size"] == p.ve_size
    assert cal.meta["n_train"] == 192 and cal.meta["n_val"] == 128 and cal.latent_dim == p.latent_dim
    assert list(cal.checks) == ["fingerprint", "microstructure"] and cal.checks["microstructure"].dim == 12
    z = {n: read_fingerprints(sets["root"] / "fp", n)[latent_columns(8)].to_numpy() for n in ("train", "val")}
    x = {}
    for n in ("train", "val"):
        ves = read_set(sets["root"] / "ves" / n)
        x[n] = ood.microstructure_descriptor(np.stack([ves.orientation_field(i) for i in range(len(ves))]), "cubic")
    again = ood.fit({"fingerprint": z["train"], "microstructure": x["train"]},
                    {"fingerprint": z["val"], "microstructure": x["val"]}, cal.meta)
    assert ood.to_dict(again) == ood.to_dict(cal)  # the stage's descriptors, bit for bit
    # above the interpolated 99th percentile of 128 scores: 2 validation VEs (1.6 %)
    assert again.score_descriptors({"fingerprint": z["val"], "microstructure": x["val"]})["ood_flag"].sum() == 2
