"""The surrogate stage: normalisation, split, metrics, the stage on tiny data, and `microfp predict`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from microfp import shards, surrogate
from microfp.config import parse_params
from microfp.datasets import generate_set
from microfp.fingerprints import fingerprint
from microfp.surrogate import MinMax, SurrogateError, curve_metrics, join, split_by_ve

from conftest import run_cli, tiny_raw
from test_evaluate import TINY_TRAIN, make_checkpoint


def surrogate_keys(d, prefix=""):
    for k, v in d.items():
        yield from surrogate_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]


def test_paired_bootstrap_interval():
    rng = np.random.default_rng(1)
    a = rng.normal(2.0, 0.3, 60)
    c = surrogate.paired_bootstrap(a, a + 1.0, seed=0)  # a is better by exactly 1 MPa on every VE
    assert c["mae_diff_mpa"] == pytest.approx(-1.0) and c["mae_diff_ci95_lo"] == pytest.approx(-1.0)
    c = surrogate.paired_bootstrap(a, rng.permutation(a), seed=0)  # no difference on average
    assert c["mae_diff_ci95_lo"] < 0 < c["mae_diff_ci95_hi"] and abs(c["mae_diff_mpa"]) < 1e-12


def test_the_surrogate_beats_the_constant_predictor_on_a_learnable_toy_case():
    """Curves that are a smooth function of a 4-d fingerprint: the trained network must predict the
    test VEs far better than their mean training curve (and the constant baseline is computed right)."""
    from microfp.config import SurrogateParams

    rng = np.random.default_rng(0)
    x = rng.normal(size=(160, 4)).astype(np.float32)
    eps = np.linspace(0, 0.01, 21)
    yield_mpa = 60 + 15 * np.tanh(x[:, 0]) + 8 * x[:, 1] ** 2 / (1 + x[:, 1] ** 2)
    y = 1e6 * yield_mpa[:, None] * (1 - np.exp(-eps[None] / 0.002))
    train, test = np.arange(120), np.arange(120, 160)
    norm = MinMax.fit(y[train])
    net, _ = surrogate.fit(x[train], norm.transform(y[train]), SurrogateParams(epochs=300, lr=3e-3, batch_size=32), seed=0)
    pred = norm.inverse(surrogate.predict01(net, x[test]))
    const = surrogate.constant_prediction(y[train], len(test))
    np.testing.assert_allclose(const[3], y[train].mean(axis=0))
    mae_net = surrogate.per_ve_mae_mpa(y[test], pred)
    mae_const = surrogate.per_ve_mae_mpa(y[test], const)
    assert mae_net.mean() < 0.3 * mae_const.mean(), (mae_net.mean(), mae_const.mean())
    c = surrogate.paired_bootstrap(mae_net, mae_const, seed=0)
    assert c["mae_diff_ci95_hi"] < 0


def test_minmax_round_trip_and_constant_points():
    rng = np.random.default_rng(0)
    y = rng.normal(50e6, 10e6, (30, 21))
    y[:, 0] = 0.0  # zero strain: every stress is 0
    norm = MinMax.fit(y)
    y01 = norm.transform(y)
    assert y01[:, 1:].min() == pytest.approx(0) and y01[:, 1:].max() == pytest.approx(1)
    assert np.all(y01[:, 0] == 0)
    np.testing.assert_allclose(norm.inverse(y01), y, rtol=1e-12, atol=1e-6)


def test_split_is_by_ve_and_deterministic():
    ids = np.repeat(np.arange(20), 2)  # two rows per VE
    train, test = split_by_ve(ids, 0.25, seed=3)
    assert set(ids[train]).isdisjoint(ids[test])
    assert len(set(ids[test])) == 5 and len(train) + len(test) == len(ids)
    again = split_by_ve(ids[::-1].copy(), 0.25, seed=3)
    assert set(ids[::-1][again[1]]) == set(ids[test])  # same VEs whatever the row order
    assert set(ids[split_by_ve(ids, 0.25, seed=4)[1]]) != set(ids[test])
    with pytest.raises(SurrogateError, match="at least 2 VEs"):
        split_by_ve(np.array([7, 7]), 0.2, 0)


def test_metrics_against_a_hand_computed_example():
    y_true = np.zeros((2, 21))
    y_true[:, 1:] = np.linspace(10e6, 100e6, 20)
    y_pred = y_true.copy()
    y_pred[0] += 2e6  # VE 0 off by 2 MPa everywhere
    y_pred[1, 5] -= 21e6  # VE 1 off by 21 MPa at increment 5 only
    norm = MinMax(np.zeros(21), np.r_[0.0, np.full(20, 100e6)])
    m = curve_metrics(y_true, y_pred, norm)
    assert m["mae_mpa"] == pytest.approx((2.0 + 1.0) / 2)  # per VE: 2 and 21/21
    assert m["mae_mpa_std"] == pytest.approx(0.5)
    assert m["mae_mpa_inc_05"] == pytest.approx((2 + 21) / 2)
    assert m["mae_mpa_inc_00"] == pytest.approx(1.0)
    # normalised MSE: point 0 has no span (scale 1 Pa): (2e6)^2 there
    expected = ((2e6) ** 2 + 20 * 0.02**2 + 0.21**2) / 42
    assert m["mse_norm"] == pytest.approx(expected)
    assert m["max_abs_error_mpa"] == pytest.approx(21)
    assert 0.9 < m["r2"] < 1.0


def curve_table(ids: np.ndarray, y: np.ndarray, converged: np.ndarray) -> pd.DataFrame:
    frame = pd.DataFrame({"ve_index": ids, "converged": converged, "wall_s": 12.0})
    for k in range(y.shape[1]):
        frame[f"sigma_xx_pa_{k:02d}"] = y[:, k]
    return frame


def test_join_drops_unconverged_and_names_missing_fingerprints():
    fp = pd.DataFrame({"ve_id": [0, 1, 2], "z_0": [0.1, 0.2, 0.3], "z_1": [1.0, 2.0, 3.0]})
    y = np.ones((3, 21))
    ids, x, yy = join(fp, curve_table(np.array([2, 0, 1]), y, np.array([True, True, False])), "t")
    assert ids.tolist() == [2, 0] and x[:, 0].tolist() == pytest.approx([0.3, 0.1])
    with pytest.raises(SurrogateError, match="1 simulated VEs have no fingerprint .*ve_id 5"):
        join(fp, curve_table(np.array([0, 5]), y[:2], np.array([True, True])), "t")


@pytest.fixture(scope="module")
def tiny_hcp(tmp_path_factory):
    """Shards, a tiny VAE, fingerprints and (synthetic, texture-driven) curves of a small hcp set."""
    root = tmp_path_factory.mktemp("surrogate")
    raw = tiny_raw(train={"n": 2}, val={"n": 2}, hcp={"n": 24, "crystal": "hexagonal"})
    raw["train"] = dict(TINY_TRAIN)
    raw["evaluate"] = {"mlflow": False, "sets": ["hcp"], "train_set": "hcp", "twopoint_max_fit": 24}
    raw["surrogate"] = {"epochs": 60, "lr": 1e-2, "batch_size": 8, "hidden": 64, "test_fraction": 0.25}
    params = parse_params(raw)
    generate_set(params, "hcp", root / "ves" / "hcp", workers=1, progress=False)
    ckpt = make_checkpoint(params, root / "vae" / "best.ckpt")
    fingerprint(params, checkpoint=ckpt, data=root / "ves", out=root / "fp", out_2pt=root / "fp2")
    ves = shards.read_set(root / "ves" / "hcp")
    tex = np.stack([surrogate.texture_descriptor(ves.grain_ids[i], ves.grain_euler(i), "hexagonal") for i in range(len(ves))])
    strain = np.linspace(0, 0.01, 21)
    # yield stress driven by the basal Schmid factor: a curve family the texture baseline can learn
    y = np.minimum(45e9 * strain[None, :], (40e6 + 80e6 * (0.5 - tex[:, 6:7])) + 2e9 * strain[None, :])
    converged = np.ones(len(ves), bool)
    converged[3] = False
    (root / "curves").mkdir()
    curve_table(ves.ve_index, y, converged).to_parquet(root / "curves" / "hcp.parquet")
    return {"params": params, "root": root, "ckpt": ckpt}


def test_stage_writes_metrics_checkpoint_plots_and_predicts(tiny_hcp, tmp_path):
    root, params = tiny_hcp["root"], tiny_hcp["params"]
    out = tmp_path / "surrogate.ckpt"
    report = surrogate.run(params, "hcp", root / "fp", root / "fp2", root / "ves", root / "curves",
                           tiny_hcp["ckpt"], out, tmp_path / "m.json", tmp_path / "plots")
    assert report["data"]["n_converged"] == 23 and report["data"]["n_test"] == 6
    for kind in ("vae", "twopoint", "texture", "constant"):
        r = report["detail"][kind]
        assert r["test_mae_mpa"] > 0 and np.isfinite(r["test_mse_norm"]) and "test_mae_mpa_inc_20" in r
    assert report["detail"]["texture"]["train_r2"] > 0.5  # it learned the texture-driven curves
    lat = report["latency"]
    assert 0 < lat["surrogate_batched_s_per_ve"] < 0.01 and 0 < lat["surrogate_single_s"] < 0.01 and lat["end_to_end_s"] < 5
    # the DVC metrics file: headline numbers only, no wall-clock facts (bit-reproducible `dvc repro`)
    m = json.loads((tmp_path / "m.json").read_text())
    assert set(m) == {"vae", "twopoint", "texture", "constant", "data"}
    assert not [k for k in surrogate_keys(m) if "seconds" in k or k.endswith("_s") or "speedup" in k or "latency" in k]
    for kind in ("vae", "twopoint"):
        c = m[kind]["vs_texture"]
        assert c["mae_diff_ci95_lo"] <= c["mae_diff_mpa"] <= c["mae_diff_ci95_hi"]
        assert c["mae_diff_mpa"] == pytest.approx(m[kind]["test_mae_mpa"] - m["texture"]["test_mae_mpa"])
    per_inc = pd.read_csv(tmp_path / "plots" / "per_increment.csv")
    assert list(per_inc.columns) == ["strain", "vae", "twopoint", "texture", "constant"] and len(per_inc) == 21
    for name in ("curves.png", "parity.png", "parity.csv"):
        assert (tmp_path / "plots" / name).stat().st_size > 500
    net, norm, meta = surrogate.load_checkpoint(out)
    assert meta["set"] == "hcp" and set(meta["train_ve_ids"]).isdisjoint(meta["test_ve_ids"])
    curves = pd.read_parquet(root / "curves" / "hcp.parquet").set_index("ve_index")
    train_y = curves.loc[meta["train_ve_ids"], [f"sigma_xx_pa_{k:02d}" for k in range(21)]].to_numpy()
    np.testing.assert_allclose(norm.lo, train_y.min(axis=0))  # constants of the training split only
    np.testing.assert_allclose(norm.hi, train_y.max(axis=0))

    # microfp predict on a Dream3D file of one VE
    d3d = tmp_path / "ve.dream3d"
    assert run_cli("export", "dream3d", str(root / "ves" / "hcp" / "shard-00000.h5"), "--index", "2", "--out", str(d3d)).returncode == 0
    result = run_cli("predict", str(d3d), "--checkpoint", str(out), "--out", str(tmp_path / "curve.csv"), "--plot", str(tmp_path / "c.png"))
    assert result.returncode == 0, result.stderr
    curve = pd.read_csv(tmp_path / "curve.csv")
    assert list(curve.columns) == ["strain", "ve_0_sigma_xx_mpa"] and len(curve) == 21
    direct = surrogate.Predictor.load(out).predict_file(root / "ves" / "hcp" / "shard-00000.h5")[2] / 1e6
    np.testing.assert_allclose(curve["ve_0_sigma_xx_mpa"], direct, rtol=1e-4, atol=1e-3)


def test_bad_inputs_are_one_line_errors(tiny_hcp, tmp_path):
    root, params = tiny_hcp["root"], tiny_hcp["params"]
    out = tmp_path / "s.ckpt"
    surrogate.run(params.model_copy(update={"surrogate": params.surrogate.model_copy(update={"epochs": 2})}),
                  "hcp", root / "fp", root / "fp2", root / "ves", root / "curves", tiny_hcp["ckpt"], out,
                  tmp_path / "m.json", tmp_path / "p")
    # a VAE with another latent size than the surrogate's input
    other = parse_params({**tiny_raw(hcp={"n": 2, "crystal": "hexagonal"}, train={"n": 1}, val={"n": 1}),
                          "latent_dim": 5, "train": dict(TINY_TRAIN)})
    wrong = make_checkpoint(other, tmp_path / "wrong.ckpt")
    result = run_cli("predict", str(root / "ves" / "hcp" / "shard-00000.h5"), "--checkpoint", str(out), "--vae", str(wrong))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "latent_dim 5" in result.stderr
    # curves for VEs that have no fingerprint
    fp = pd.read_parquet(root / "fp" / "hcp.parquet")
    (tmp_path / "fp").mkdir()
    fp.iloc[:-3].to_parquet(tmp_path / "fp" / "hcp.parquet")
    with pytest.raises(SurrogateError, match="have no fingerprint"):
        surrogate.run(params, "hcp", tmp_path / "fp", root / "fp2", root / "ves", root / "curves",
                      tiny_hcp["ckpt"], tmp_path / "x.ckpt", tmp_path / "x.json", tmp_path / "xp")
    assert not (tmp_path / "x.ckpt").exists() and not (tmp_path / "x.json").exists()
    result = run_cli("predict", str(tmp_path / "missing.h5"), "--checkpoint", str(out))
    assert result.returncode == 2 and "microfp: error:" in result.stderr
    # a cubic VE given to the Mg surrogate
    cubic = tmp_path / "cubic"
    generate_set(params, "train", cubic, workers=1, progress=False)
    result = run_cli("predict", str(cubic / "shard-00000.h5"), "--checkpoint", str(out))
    assert result.returncode == 2 and "cubic VE, but the surrogate was trained on hexagonal" in result.stderr
