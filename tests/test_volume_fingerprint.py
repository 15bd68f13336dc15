"""`microfp fingerprint-volume`: real volumes of any shape, spacing and phases (files the tests write)."""

from __future__ import annotations

from pathlib import Path

import damask
import numpy as np
import pandas as pd
import pytest
import torch

from microfp import ood
from microfp.cli import main
from microfp.config import parse_params
from microfp.datasets import generate_set
from microfp.fingerprints import fingerprint, latent_columns
from microfp.formats import Phase, Volume, read_damask, read_dream3d_volume, read_volume, reduced_euler, write_dream3d_volume
from microfp.shards import euler_field
from microfp.model import load_vae
from microfp.volume_fingerprints import cut_window, resample, window_origins

from conftest import run_cli, tiny_raw
from test_evaluate import TINY_TRAIN, make_checkpoint


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny cubic VAE (16^3, resolution 1, latent 8) with its OOD calibration beside it."""
    root = tmp_path_factory.mktemp("volmodel")
    raw = tiny_raw(train={"n": 12}, val={"n": 8})
    raw["train"] = dict(TINY_TRAIN)
    raw["evaluate"] = {"mlflow": False, "sets": ["train", "val"], "twopoint_max_fit": 4}
    params = parse_params(raw)
    for name in ("train", "val"):
        generate_set(params, name, root / "ves" / name, workers=1, progress=False)
    ckpt = make_checkpoint(params, root / "vae" / "best.ckpt")
    fingerprint(params, ckpt, root / "ves", root / "fp", root / "fp2", ood_out=root / "vae_ood.json")
    return {"ckpt": ckpt, "root": root}


def voronoi(cells: tuple[int, int, int], size: tuple[float, float, float], grains: int, seed: int) -> np.ndarray:
    """Grain ids (x, y, z) 0..G-1 of a periodic Voronoi tessellation (damask)."""
    seeds = damask.seeds.from_random(np.array(size), grains, rng_seed=seed)
    ids = damask.GeomGrid.from_Voronoi_tessellation(np.array(cells), np.array(size), seeds).material
    return np.unique(ids, return_inverse=True)[1].reshape(ids.shape)


def random_euler(n: int, seed: int) -> np.ndarray:
    return np.asarray(damask.Rotation.from_random(n, rng_seed=seed).as_Euler_angles()).reshape(n, 3)


def dream3d_volume(path: Path, cells, spacing, grains: int = 60, phases=None, grain_phase=None, seed: int = 0) -> Path:
    """Write a Dream3D file (microfp's exporter) of a Voronoi volume with the given cells and spacing."""
    ids = voronoi(cells, tuple(c * s for c, s in zip(cells, spacing)), grains, seed)
    g = int(ids.max()) + 1
    phases = phases or {1: Phase("ferrite", "cubic", 1, "cubic m-3m")}
    grain_phase = np.ones(g, np.int64) if grain_phase is None else grain_phase(ids, g)
    volume = Volume(ids, random_euler(g, seed + 1), grain_phase, phases, np.array(spacing, float), False, str(path), "dream3d")
    return write_dream3d_volume(path, volume)


def damask_grid(folder: Path, cells, size, grains: int, lattice: str = "cF", seed: int = 3, cube_texture: bool = False) -> Path:
    """Write a DAMASK grid + material.yaml with damask's own writers (random texture, or cube
    texture with a 3 degree spread)."""
    folder.mkdir(parents=True, exist_ok=True)
    ids = voronoi(cells, size, grains, seed)
    g = int(ids.max()) + 1
    damask.GeomGrid(ids, np.array(size, float)).save(folder / "grid.vti")
    rotations = (damask.Rotation.from_spherical_component(damask.Rotation(), 3.0, g, degrees=True, rng_seed=seed)
                 if cube_texture else damask.Rotation.from_random(g, rng_seed=seed))
    config = damask.ConfigMaterial().material_add(O=rotations, phase="Cu", homogenization="SX")
    config["phase"]["Cu"] = {"lattice": lattice}
    config.save(folder / "material.yaml")
    return folder / "grid.vti"


def run(*args: str, capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_refused(code: int, err: str, out: Path, *words: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("microfp: error:"), err
    for word in words:
        assert word in lines[0], lines[0]
    assert not out.exists() and not list(out.parent.glob(".*tmp*"))


# ---------------------------------------------------------------------------------------------
# pure steps


def test_resample_anisotropic_spacing_matches_direct_sampling() -> None:
    def block(x, y, z):  # a grain map defined in length units: 4 x 4 x 4 blocks
        return (x // 4).astype(int) + 10 * (y // 4).astype(int) + 100 * (z // 4).astype(int)

    fine = np.array([0.5, 0.5, 2.0])
    centres = [(np.arange(n) + 0.5) * s for n, s in zip((48, 32, 6), fine)]  # box 24 x 16 x 12
    src = block(*np.meshgrid(*centres, indexing="ij"))
    out = resample(src, fine, 1.0)
    assert out.shape == (24, 16, 12)
    direct = block(*np.meshgrid(*[np.arange(n) + 0.5 for n in (24, 16, 12)], indexing="ij"))
    np.testing.assert_array_equal(out, direct)


def test_window_origins_inside_or_wrapping() -> None:
    inside = window_origins((40, 24, 16), 16, 8, periodic=False)
    assert sorted(set(inside[:, 0])) == [0, 8, 16, 24] and sorted(set(inside[:, 1])) == [0, 8]
    assert set(inside[:, 2]) == {0} and len(inside) == 8
    assert (inside + 16 <= np.array([40, 24, 16])).all()
    assert len(window_origins((40, 10, 16), 16, 16, periodic=False)) == 0
    wrap = window_origins((40, 10, 16), 16, 16, periodic=True)
    assert len(wrap) == 3 * 1 * 1
    grid = np.arange(10 * 12 * 8).reshape(10, 12, 8)
    w = cut_window(grid, np.array([0, 0, 0]), 16)
    np.testing.assert_array_equal(w[10:], w[:6])  # a volume smaller than the window repeats
    np.testing.assert_array_equal(w[:10, :12, :8], grid)


# ---------------------------------------------------------------------------------------------
# the command on files the tests write


def test_non_cubic_dream3d_with_anisotropic_spacing(model: dict, tmp_path: Path, capsys) -> None:
    path = dream3d_volume(tmp_path / "aniso.dream3d", (80, 48, 10), (0.5, 0.5, 2.0))
    volume = read_volume(path)
    assert volume.shape == (80, 48, 10) and volume.spacing.tolist() == [0.5, 0.5, 2.0] and not volume.periodic
    # the cubic-VE importer still refuses it, naming the new command
    assert run("import", "dream3d", path, "--out", tmp_path / "x.h5", capsys=capsys)[0] == 2
    out = tmp_path / "fp.parquet"
    code, stdout, err = run("fingerprint-volume", path, "--checkpoint", model["ckpt"], "--out", out, "--stride", 8, capsys=capsys)
    assert code == 0, err
    assert "factor 0.5 x 0.5 x 2" in stdout and "40 x 24 x 20 voxels of 1" in stdout
    table = pd.read_parquet(out)
    assert len(table) == 4 * 2 * 1  # 16^3 windows every 8 voxels inside 40 x 24 x 20
    ood_columns = {f"ood_{check}_{what}" for check in ood.CHECKS for what in ("distance", "percentile", "flag")}
    assert {"window", "x0", "y0", "z0", "n_grains", "phase", "ood_percentile", "ood_flag"} | ood_columns <= set(table.columns)
    assert (table["x0"] + 16 <= 40).all() and (table["phase"] == "ferrite").all()
    assert (table["n_grains"] > 1).all() and np.isfinite(table[latent_columns(8)].to_numpy()).all()
    assert str(table["z_0"].dtype) == "float32" and ((table["ood_percentile"] >= 0) & (table["ood_percentile"] <= 100)).all()
    assert f"{int(table['ood_flag'].sum())} of 8 windows" in stdout
    assert (table["ood_flag"] == (table["ood_fingerprint_flag"] | table["ood_microstructure_flag"])).all()
    assert f"microstructure check: {int(table['ood_microstructure_flag'].sum())} flagged" in stdout


def test_two_phase_file_with_phase_choice(model: dict, tmp_path: Path, capsys) -> None:
    phases = {1: Phase("ferrite", "cubic", 1, "cubic m-3m"), 2: Phase("Mg", "hexagonal", 0, "hexagonal 6/mmm")}

    def split(ids: np.ndarray, g: int) -> np.ndarray:  # grains whose voxels lie mostly at x >= 32 are Mg
        x = np.indices(ids.shape)[0]
        mean_x = np.bincount(ids.ravel(), weights=x.ravel(), minlength=g) / np.bincount(ids.ravel(), minlength=g)
        return np.where(mean_x >= 32, 2, 1)

    path = dream3d_volume(tmp_path / "two.dream3d", (64, 16, 16), (1.0, 1.0, 1.0), grains=40, phases=phases, grain_phase=split)
    volume = read_dream3d_volume(path)
    assert {p.name for p in volume.phases.values()} == {"ferrite", "Mg"}
    out = tmp_path / "ferrite.parquet"
    code, stdout, err = run("fingerprint-volume", path, "--checkpoint", model["ckpt"], "--out", out, "--phase", "ferrite", capsys=capsys)
    assert code == 0, err
    table = pd.read_parquet(out)
    # windows at x = 0, 16 are ferrite; 32, 48 are Mg: skipped and counted
    assert sorted(table["x0"]) == [0, 16] and (table["phase_fraction"] >= 0.9).all()
    assert "2 fingerprinted of 4 (2 skipped" in stdout
    code, _, err = run("fingerprint-volume", path, "--checkpoint", model["ckpt"], "--out", tmp_path / "one.parquet", "--phase", "1", capsys=capsys)
    assert code == 0 and len(pd.read_parquet(tmp_path / "one.parquet")) == 2
    # the same windows by number; no phase given: several phases, a one-line error
    bad = tmp_path / "bad.parquet"
    assert_refused(*run("fingerprint-volume", path, "--checkpoint", model["ckpt"], "--out", bad, capsys=capsys)[::2], bad, "2 phases", "--phase")
    # the hexagonal phase given to a cubic model
    assert_refused(*run("fingerprint-volume", path, "--checkpoint", model["ckpt"], "--out", bad, "--phase", "Mg", capsys=capsys)[::2],
                   bad, "'Mg' is hexagonal", "trained on cubic")
    # a phase the file does not have
    assert_refused(*run("fingerprint-volume", path, "--checkpoint", model["ckpt"], "--out", bad, "--phase", "austenite", capsys=capsys)[::2],
                   bad, "no phase 'austenite'", "ferrite")


def test_periodic_damask_grid_smaller_than_one_window(model: dict, tmp_path: Path, capsys) -> None:
    vti = damask_grid(tmp_path / "small", (10, 12, 8), (10.0, 12.0, 8.0), grains=6)
    out = tmp_path / "small.parquet"
    code, stdout, err = run("fingerprint-volume", vti, "--checkpoint", model["ckpt"], "--out", out, capsys=capsys)
    assert code == 0, err
    table = pd.read_parquet(out)
    assert len(table) == 1 and table[["x0", "y0", "z0"]].to_numpy().tolist() == [[0, 0, 0]]
    assert "periodic" in stdout and "not periodic" not in stdout
    # the fingerprint is that of the periodically repeated grid
    volume = read_volume(vti)
    window = cut_window(volume.grain_ids, np.zeros(3, int), 16)
    grains, local = np.unique(window, return_inverse=True)
    field = euler_field(local.reshape(window.shape), reduced_euler(volume.euler, "cubic")[grains])
    with torch.no_grad():
        mu = load_vae(model["ckpt"]).encode(torch.from_numpy(field[None]))[0].numpy()
    np.testing.assert_allclose(table[latent_columns(8)].to_numpy(), mu, atol=1e-5)
    # told it is not periodic: too small, one line, nothing written
    bad = tmp_path / "np.parquet"
    assert_refused(*run("fingerprint-volume", vti, "--checkpoint", model["ckpt"], "--out", bad, "--not-periodic", capsys=capsys)[::2],
                   bad, "smaller than one 16^3 window")


def test_cubic_grid_at_the_model_resolution_gives_the_plain_fingerprint(model: dict, tmp_path: Path, capsys) -> None:
    vti = damask_grid(tmp_path / "cube", (16, 16, 16), (16.0, 16.0, 16.0), grains=30)
    out = tmp_path / "c.parquet"
    assert run("fingerprint-volume", vti, "--checkpoint", model["ckpt"], "--out", out, capsys=capsys)[0] == 0
    ves = read_damask(vti)
    with torch.no_grad():
        mu = load_vae(model["ckpt"]).encode(torch.from_numpy(ves.orientation_field(0)[None]))[0].numpy()
    table = pd.read_parquet(out)
    assert len(table) == 1 and table["n_grains"].iloc[0] == ves.n_grains[0]
    np.testing.assert_allclose(table[latent_columns(8)].to_numpy(), mu, atol=1e-5)
    # the OOD columns are those of the plain VE, the microstructure check from its orientation field
    scores = ood.load(ood.default_path(model["ckpt"])).score(table[latent_columns(8)].to_numpy(), ves.orientation_field(0)[None])
    for key, value in scores.items():
        np.testing.assert_array_equal(table[key].to_numpy(), value, err_msg=key)


def test_cube_textured_volume_is_flagged_by_the_microstructure_check(model: dict, tmp_path: Path, capsys) -> None:
    """The model was trained on random textures; its (untrained) VAE does not see texture, the
    microstructure check does: every window of a cube-textured grid is flagged."""
    vti = damask_grid(tmp_path / "tex", (32, 32, 16), (32.0, 32.0, 16.0), grains=50, cube_texture=True)
    out = tmp_path / "t.parquet"
    code, stdout, err = run("fingerprint-volume", vti, "--checkpoint", model["ckpt"], "--out", out, capsys=capsys)
    assert code == 0, err
    table = pd.read_parquet(out)
    assert len(table) == 4 and table["ood_microstructure_flag"].all() and table["ood_flag"].all()
    assert (table["ood_microstructure_percentile"] == 100).all() and "4 of 4 windows (100%) flagged" in stdout


def test_bad_volumes_are_one_line_errors_and_leave_nothing(model: dict, tmp_path: Path, capsys) -> None:
    ckpt = model["ckpt"]
    bad = tmp_path / "out.parquet"
    flat = dream3d_volume(tmp_path / "scan.dream3d", (40, 30, 1), (1.0, 1.0, 1.0), grains=20)
    assert_refused(*run("fingerprint-volume", flat, "--checkpoint", ckpt, "--out", bad, capsys=capsys)[::2], bad, "2D scan", "40 x 30 x 1")
    coarse = dream3d_volume(tmp_path / "coarse.dream3d", (20, 20, 20), (3.0, 3.0, 3.0), grains=2000)
    assert_refused(*run("fingerprint-volume", coarse, "--checkpoint", ckpt, "--out", bad, capsys=capsys)[::2], bad, "too coarse")
    small = dream3d_volume(tmp_path / "small.dream3d", (12, 20, 20), (1.0, 1.0, 1.0), grains=20)
    assert_refused(*run("fingerprint-volume", small, "--checkpoint", ckpt, "--out", bad, capsys=capsys)[::2], bad, "smaller than one 16^3 window")
    hcp = damask_grid(tmp_path / "hcp", (16, 16, 16), (16.0, 16.0, 16.0), grains=20, lattice="hP")
    assert_refused(*run("fingerprint-volume", hcp, "--checkpoint", ckpt, "--out", bad, capsys=capsys)[::2], bad, "hexagonal", "cubic")
    assert_refused(*run("fingerprint-volume", tmp_path / "none.dream3d", "--checkpoint", ckpt, "--out", bad, capsys=capsys)[::2], bad, "no such file")
    good = damask_grid(tmp_path / "good", (16, 16, 16), (16.0, 16.0, 16.0), grains=20)
    assert_refused(*run("fingerprint-volume", good, "--checkpoint", ckpt, "--out", bad, "--ood", tmp_path / "x.json", capsys=capsys)[::2],
                   bad, "no OOD calibration")


def test_command_runs_as_installed(model: dict, tmp_path: Path) -> None:
    vti = damask_grid(tmp_path / "g", (20, 24, 18), (20.0, 24.0, 18.0), grains=15)
    result = run_cli("fingerprint-volume", str(vti), "--checkpoint", str(model["ckpt"]), "--out", str(tmp_path / "o.parquet"))
    assert result.returncode == 0, result.stderr
    assert len(pd.read_parquet(tmp_path / "o.parquet")) == 2 * 2 * 2  # periodic: origins 0 and 16 per axis
    assert ood.default_path(model["ckpt"]).is_file()
