"""Fingerprint tables (VAE mu and the 2-point baseline): schema, values, symmetry, errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from microfp.errors import MicrofpError
from microfp.setdata import iter_set_batches
from microfp.fingerprints import (
    autocorrelations,
    fingerprint,
    latent_columns,
    read_fingerprints,
    twopoint_features,
)
from microfp.shards import ShardError, read_set
from microfp.model import CheckpointError, load_vae
from microfp.volumes import grain_esd
from test_evaluate import make_checkpoint, no_temp_files, tiny, tiny_params  # noqa: F401 - fixture

SCHEMA = ["ve_id", "set"] + latent_columns(8) + ["esd_mean", "n_grains", "texture", "esd_target", "crystal"]


def test_autocorrelation_matches_a_direct_periodic_sum() -> None:
    rng = np.random.default_rng(0)
    f = rng.normal(size=(2, 2, 6, 6, 6))
    corr = autocorrelations(torch.from_numpy(f), window=2).numpy()
    assert corr.shape == (2, 2, 5, 5, 5)
    for r in [(0, 0, 0), (1, 0, -2), (-2, 2, 1)]:
        direct = (f * np.roll(f, shift=tuple(-s for s in r), axis=(2, 3, 4))).mean(axis=(2, 3, 4))
        np.testing.assert_allclose(corr[:, :, r[0] + 2, r[1] + 2, r[2] + 2], direct, atol=1e-12)
    np.testing.assert_allclose(corr[:, :, 2, 2, 2], (f**2).mean(axis=(2, 3, 4)))  # r = 0: mean of f^2


def test_twopoint_features_are_translation_invariant(tiny: dict[str, Any]) -> None:
    params = tiny["params"]
    batch = next(iter_set_batches(tiny["data"] / "brass", 2, 2))
    a = twopoint_features(batch, params, torch.device("cpu"))
    batch.grain_ids = [np.roll(g, (3, -5, 7), axis=(0, 1, 2)) for g in batch.grain_ids]
    b = twopoint_features(batch, params, torch.device("cpu"))
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert a.shape == (2, 9 * 9**3)  # 9 cubic channels, window +-4 voxels (cutoff 4 / resolution 1)


def test_fingerprint_tables(tiny: dict[str, Any], tmp_path: Path) -> None:
    params = tiny_params(evaluate={"batch_size": 3})
    counts = fingerprint(params, tiny["ckpt"], tiny["data"], tmp_path / "fp", tmp_path / "fp2")
    assert counts == {"train": 10, "val": 4, "brass": 5, "cube": 5, "hcp": 3, "large": 3}
    vae = load_vae(tiny["ckpt"])
    for name, n in counts.items():
        ves = read_set(tiny["data"] / name)
        for directory in ("fp", "fp2"):
            df = read_fingerprints(tmp_path / directory, name)
            assert list(df.columns) == SCHEMA
            assert len(df) == n and (df["set"] == name).all()
            np.testing.assert_array_equal(df["ve_id"], np.arange(n))
            assert str(df["z_0"].dtype) == "float32" and str(df["ve_id"].dtype) == "int64"
            assert str(df["texture"].dtype) == "string" and str(df["n_grains"].dtype) == "int64"
            np.testing.assert_array_equal(df["n_grains"], ves.n_grains)
            np.testing.assert_allclose(df["esd_target"], ves.esd_target)
            esd0 = grain_esd(ves.grain_ids[0], ves.resolution)
            assert df["esd_mean"].iloc[0] == pytest.approx(esd0[esd0 > 0].mean())
            assert (df["crystal"] == ves.crystal).all()
            assert (df["texture"] == ("random" if name in ("train", "val", "large", "hcp") else name)).all()
            assert np.isfinite(df[latent_columns(8)].to_numpy()).all()
        # the VAE table is mu of the encoder
        with torch.no_grad():
            mu = vae.encode(torch.from_numpy(np.stack([ves.orientation_field(i) for i in range(n)])))[0].numpy()
        vae_df = read_fingerprints(tmp_path / "fp", name)
        np.testing.assert_allclose(vae_df[latent_columns(8)].to_numpy(), mu, atol=1e-5)
    # the 2-point PCA is fitted on train: train scores are centred; textured sets lie elsewhere
    two = {s: read_fingerprints(tmp_path / "fp2", s)[latent_columns(8)].to_numpy() for s in counts}
    np.testing.assert_allclose(two["train"].mean(0), 0, atol=1e-4)
    assert np.linalg.norm(two["cube"].mean(0)) > 3 * np.linalg.norm(two["val"].mean(0))
    # hcp has its own PCA (3 VEs: 3 components, the rest 0)
    assert np.all(two["hcp"][:, 3:] == 0)
    assert no_temp_files(tmp_path)


def test_fingerprint_errors(tiny: dict[str, Any], tmp_path: Path) -> None:
    params = tiny["params"]
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        fingerprint(params, tmp_path / "none.ckpt", tiny["data"], tmp_path / "fp", tmp_path / "fp2")
    other = make_checkpoint(tiny_params(latent_dim=4), tmp_path / "o.ckpt")
    with pytest.raises(CheckpointError, match="latent_dim=4, params.yaml has 8"):
        fingerprint(params, other, tiny["data"], tmp_path / "fp", tmp_path / "fp2")
    with pytest.raises(ShardError, match="no such data directory"):
        fingerprint(params, tiny["ckpt"], tmp_path / "none", tmp_path / "fp", tmp_path / "fp2")
    only = tiny_params(evaluate={"sets": ["cube"], "train_set": "nothere"})
    with pytest.raises(ShardError, match="nothere: no shards found") as err:
        fingerprint(only, tiny["ckpt"], tiny["data"], tmp_path / "fp", tmp_path / "fp2")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "fp").exists()
    with pytest.raises(MicrofpError, match="no fingerprints"):
        read_fingerprints(tmp_path, "train")
    (tmp_path / "bad.parquet").write_text("nope")
    with pytest.raises(MicrofpError, match="not a readable parquet") as err:
        read_fingerprints(tmp_path, "bad")
    assert "\n" not in str(err.value)
    pd.DataFrame({"a": [1]}).to_parquet(tmp_path / "other.parquet")
    with pytest.raises(MicrofpError, match="not a microfp fingerprint table"):
        read_fingerprints(tmp_path, "other")
