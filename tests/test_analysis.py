"""Latent-space analysis: Hungarian-matched accuracy, spectral clustering, PCA plots, eq. 6 paths."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from microfp.analysis import (
    analyse,
    chance_accuracy,
    cluster_problem,
    interpolate,
    interpolation_path,
    matched_accuracy,
    spectral_labels,
)
from microfp.errors import MicrofpError
from microfp.fingerprints import latent_columns, make_table, write_table
from microfp.model import CheckpointError
from test_evaluate import make_checkpoint, no_temp_files, tiny, tiny_params  # noqa: F401 - fixture

# ---------------------------------------------------------------------------------------------
# Matching clusters to classes


def brute_force_accuracy(true: np.ndarray, pred: np.ndarray) -> float:
    classes, clusters = np.unique(true), np.unique(pred)
    best = 0
    # every injective map clusters -> classes (or classes -> clusters when there are fewer clusters)
    if len(clusters) <= len(classes):
        for perm in itertools.permutations(classes, len(clusters)):
            mapping = dict(zip(clusters, perm))
            best = max(best, sum(mapping[p] == t for t, p in zip(true, pred)))
    else:
        for perm in itertools.permutations(clusters, len(classes)):
            mapping = dict(zip(perm, classes))
            best = max(best, sum(mapping.get(p) == t for t, p in zip(true, pred)))
    return best / len(true)


def test_matched_accuracy_permuted_labels_and_names() -> None:
    true = np.array(["cube", "cube", "goss", "goss", "brass", "brass"])
    pred = np.array([2, 2, 0, 0, 1, 1])
    acc, recall = matched_accuracy(true, pred)
    assert acc == 1.0 and recall == {"brass": 1.0, "cube": 1.0, "goss": 1.0}
    acc, recall = matched_accuracy(true, np.array([2, 2, 0, 2, 1, 1]))
    assert acc == pytest.approx(5 / 6) and recall["goss"] == 0.5
    # one cluster for everything: only one class can be matched
    assert matched_accuracy(true, np.zeros(6, int))[0] == pytest.approx(1 / 3)


def test_hungarian_matching_equals_brute_force() -> None:
    rng = np.random.default_rng(0)
    for trial in range(60):
        k_true, k_pred = rng.integers(2, 5), rng.integers(1, 6)
        n = int(rng.integers(5, 40))
        true, pred = rng.integers(0, k_true, n), rng.integers(0, k_pred, n)
        assert matched_accuracy(true, pred)[0] == pytest.approx(brute_force_accuracy(true, pred)), trial


def test_matched_accuracy_rejects_bad_labels() -> None:
    with pytest.raises(MicrofpError, match="equal length"):
        matched_accuracy(np.zeros(3), np.zeros(4))
    with pytest.raises(MicrofpError, match="non-empty"):
        matched_accuracy(np.zeros(0), np.zeros(0))


def test_chance_accuracy() -> None:
    labels = np.repeat(np.arange(4), 100)
    assert 0.25 < chance_accuracy(labels, 4) < 0.33  # a bit above 1/k with optimal matching
    assert 0.5 <= chance_accuracy(np.repeat([0, 1], 16), 2) < 0.66


# ---------------------------------------------------------------------------------------------
# Spectral clustering


def blobs(centres: np.ndarray, n: int, spread: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = np.concatenate([c + spread * rng.normal(size=(n, centres.shape[1])) for c in centres])
    return x, np.repeat(np.arange(len(centres)), n)


def test_spectral_clustering_separable_case() -> None:
    centres = np.array([[0, 0, 0], [5, 0, 0], [0, 5, 0], [0, 0, 5]], float)
    x, y = blobs(centres, 25, 0.4, seed=1)
    perm = np.random.default_rng(2).permutation(len(y))
    result = cluster_problem(x[perm], y[perm], seed=0)
    assert result["accuracy"] == 1.0
    assert all(result[f"recall_{c}"] == 1.0 for c in range(4))
    assert result["chance"] < 0.4


def test_spectral_clustering_without_structure_is_about_chance() -> None:
    rng = np.random.default_rng(3)
    accs = []
    for seed in range(5):
        x = rng.normal(size=(64, 3))  # one cloud, labels independent of position
        y = rng.permutation(np.repeat([0, 1], 32))
        accs.append(cluster_problem(x, y, seed=seed)["accuracy"])
    chance = chance_accuracy(np.repeat([0, 1], 32), 2)
    assert abs(np.mean(accs) - chance) < 0.1 and max(accs) < 0.75


def test_spectral_labels_needs_enough_samples() -> None:
    with pytest.raises(MicrofpError, match="more samples"):
        spectral_labels(np.zeros((3, 3)), 3, seed=0)


# ---------------------------------------------------------------------------------------------
# Eq. 6


def test_linear_path_eq6() -> None:
    z1, z2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([4.0, 1.0, -2.0])
    path = interpolate(z1, z2, 5)
    assert path.shape == (5, 3)
    assert torch.equal(path[0], z1) and torch.allclose(path[-1], z2)
    for n in range(1, 6):  # z_n = z_1 + (n - 1)/(N - 1) (z_2 - z_1)
        assert torch.allclose(path[n - 1], z1 + (n - 1) / 4 * (z2 - z1))


# ---------------------------------------------------------------------------------------------
# The stage, on synthetic fingerprint tables


def write_synthetic(root: Path, k: int, textures_separable: bool, seed: int = 0) -> None:
    """Fingerprints where the four textures sit in separate places (or all in one cloud) and the
    morphologies are indistinguishable except small grains, like the paper's findings."""
    rng = np.random.default_rng(seed)

    def table(name: str, z: np.ndarray, texture: str = "random") -> None:
        n = len(z)
        desc = {"esd_mean": np.full(n, 5.0), "n_grains": np.full(n, 40), "texture": np.full(n, texture, dtype=object),
                "esd_target": np.full(n, 5.78), "crystal": np.full(n, "cubic", dtype=object)}
        for method in ("fp", "fp2"):
            write_table(make_table(name, np.arange(n), z.astype(np.float32), desc), root / method / f"{name}.parquet")

    table("train", rng.normal(size=(200, k)))
    for i, name in enumerate(["brass", "copper", "cube", "goss"]):
        centre = np.zeros(k)
        if textures_separable:
            centre[i % 3] = 4.0 * (1 if i < 3 else -1)
        table(name, centre + 0.2 * rng.normal(size=(20, k)), name)
    small = np.zeros(k)
    small[0] = 8.0
    table("small", small + 0.1 * rng.normal(size=(20, k)))
    table("large", rng.normal(size=(20, k)))
    table("elongated", rng.normal(size=(20, k)))


def test_analyse_synthetic_fingerprints(tmp_path: Path) -> None:
    params = tiny_params()
    write_synthetic(tmp_path, 8, textures_separable=True)
    out = analyse(params, tmp_path / "fp", tmp_path / "fp2", checkpoint=None, metrics=tmp_path / "latent.json",
                  plots=tmp_path / "plots")
    assert json.loads((tmp_path / "latent.json").read_text()) == json.loads(json.dumps(out))
    vae = out["vae"]
    assert vae["texture_accuracy"] == 1.0
    assert vae["morphology_recall_small"] == 1.0
    assert vae["morphology_large_elongated_accuracy"] < 0.8  # no structure: about chance
    assert "texture_tight_accuracy" not in vae  # the tight sets are missing: skipped
    assert out["twopoint"]["texture_accuracy"] == 1.0
    assert vae["pca_fit_ves"] == 200 and 0 < vae["pc2_explained"] < vae["pc3_explained"] <= 1
    for name in ("pca_vae.png", "pca_twopoint.png", "explained_variance.png"):
        assert (tmp_path / "plots" / name).stat().st_size > 1000
    pcs = pd.read_csv(tmp_path / "plots/pca_vae.csv")
    assert list(pcs.columns) == ["set", "ve_id", "pc1", "pc2", "pc3", "group"]
    assert set(pcs.group) == {"train", "texture", "morphology", "morphology_large_elongated"}
    assert len(pcs[pcs.group == "train"]) == 200
    ev = pd.read_csv(tmp_path / "plots/explained_variance.csv")
    assert list(ev.columns) == ["component", "vae", "twopoint"] and ev.vae.iloc[-1] == pytest.approx(1.0)
    assert no_temp_files(tmp_path)


def test_analyse_texture_clustering_at_chance_without_structure(tmp_path: Path) -> None:
    write_synthetic(tmp_path, 8, textures_separable=False, seed=1)
    out = analyse(tiny_params(), tmp_path / "fp", None, checkpoint=None, metrics=tmp_path / "l.json",
                  plots=tmp_path / "plots")
    assert set(out) == {"vae"}
    assert out["vae"]["texture_accuracy"] < 0.6  # chance for 4 x 20 is ~0.35


def test_analyse_with_interpolation(tiny: dict[str, Any], tmp_path: Path) -> None:
    params = tiny_params(evaluate={"interpolation_steps": 5, "interpolation_pair": [3, 0]})
    write_synthetic(tmp_path, 8, textures_separable=True)
    out = analyse(params, tmp_path / "fp", tmp_path / "fp2", checkpoint=tiny["ckpt"], data=tiny["data"],
                  metrics=tmp_path / "l.json", plots=tmp_path / "plots")
    path = out["interpolation"]
    assert path["steps"] == 5 and 0 < path["step_phi4_mean"] <= path["step_phi4_max"] <= 1
    # the steps measure the decoded path itself: walked backwards, the same steps in reverse order
    back = interpolation_path(tiny_params(evaluate={"interpolation_steps": 5, "interpolation_pair": [0, 3]}),
                              tiny["ckpt"], tiny["data"])
    forward = interpolation_path(params, tiny["ckpt"], tiny["data"])
    assert np.allclose(back["step_phi4"][::-1], forward["step_phi4"], rtol=1e-4, atol=1e-7)
    assert forward["step_phi4"].mean() == pytest.approx(path["step_phi4_mean"], rel=1e-6)
    assert (tmp_path / "plots/interpolation.png").stat().st_size > 1000


def test_analyse_errors(tiny: dict[str, Any], tmp_path: Path) -> None:
    params = tiny_params()
    with pytest.raises(MicrofpError, match="train.parquet: no fingerprints") as err:
        analyse(params, tmp_path / "none", None, checkpoint=None, metrics=tmp_path / "l.json", plots=tmp_path / "p")
    assert "\n" not in str(err.value)
    write_synthetic(tmp_path, 6, textures_separable=True)
    with pytest.raises(MicrofpError, match="fingerprints have 6 dimensions but params.yaml has latent_dim=8"):
        analyse(params, tmp_path / "fp", None, checkpoint=None, metrics=tmp_path / "l.json", plots=tmp_path / "p")
    write_synthetic(tmp_path, 8, textures_separable=True)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        analyse(params, tmp_path / "fp", None, checkpoint=tmp_path / "x.ckpt", data=tiny["data"],
                metrics=tmp_path / "l.json", plots=tmp_path / "p")
    far = tiny_params(evaluate={"interpolation_pair": [0, 99]})
    with pytest.raises(MicrofpError, match="has only 4 VEs"):
        analyse(far, tmp_path / "fp", None, checkpoint=tiny["ckpt"], data=tiny["data"],
                metrics=tmp_path / "l.json", plots=tmp_path / "p")
    assert not (tmp_path / "l.json").exists()


def test_latent_columns() -> None:
    assert latent_columns(3) == ["z_0", "z_1", "z_2"]
