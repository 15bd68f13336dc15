"""Import/export of DREAM3D and DAMASK VE files (microfp.formats)."""

from __future__ import annotations

import math
from pathlib import Path

import damask
import h5py
import numpy as np
import pytest
import yaml

from microfp import formats
from microfp.errors import MicrofpError
from microfp.formats import FormatError, read_damask, read_dream3d, read_ve_file, write_damask, write_dream3d
from microfp.shards import ShardError, VESet, pack, read_shard, write_shard

N = 16


# ------------------------------------------------------------------------------------------------
# helpers


def voronoi_ve(n: int = N, grains: int = 25, crystal: str = "cubic", seed: int = 0, resolution: float = 0.5) -> VESet:
    """A one-VE set with *unreduced* random orientations (valid angles, mostly outside the FZ)."""
    size = np.full(3, n * resolution)
    seeds = damask.seeds.from_random(size, grains, rng_seed=seed)
    ids = damask.GeomGrid.from_Voronoi_tessellation(np.array([n, n, n]), size, seeds).material
    ids = np.unique(ids, return_inverse=True)[1].reshape(ids.shape)  # every seed may not own a cell
    g = int(ids.max()) + 1
    euler = damask.Rotation.from_random(shape=g, rng_seed=seed + 1).as_Euler_angles().astype(np.float32)
    grain_ids, e, n_grains = pack([(ids, euler)])
    return VESet(grain_ids, e, n_grains, np.array([7]), np.array([2.0], np.float32), crystal, resolution)


def disorientation_deg(e1: np.ndarray, e2: np.ndarray, crystal: str) -> np.ndarray:
    o1 = damask.Orientation.from_Euler_angles(phi=np.asarray(e1, np.float64), family=crystal)
    o2 = damask.Orientation.from_Euler_angles(phi=np.asarray(e2, np.float64), family=crystal)
    return np.degrees(o1.disorientation_angle(o2))


def grain_map(a: np.ndarray, b: np.ndarray) -> dict[int, int]:
    """The bijection a-id -> b-id if ``a`` and ``b`` are the same partition (else AssertionError)."""
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]).astype(np.int64), axis=1)
    assert len(np.unique(pairs[0])) == pairs.shape[1] == len(np.unique(pairs[1])), "partitions differ"
    return dict(zip(pairs[0].tolist(), pairs[1].tolist()))


def assert_same_ve(original: VESet, read: VESet, i: int = 0) -> None:
    assert read.grain_ids.dtype == np.uint16 and read.euler.dtype == np.float32
    assert read.grain_ids.shape == (1,) + original.grain_ids.shape[1:]
    assert read.crystal == original.crystal
    assert read.resolution == pytest.approx(original.resolution, rel=1e-6)
    mapping = grain_map(original.grain_ids[i], read.grain_ids[0])
    assert read.n_grains[0] == original.n_grains[i] == len(mapping)
    src = np.array([original.grain_euler(i)[k] for k in sorted(mapping)])
    dst = np.array([read.grain_euler(0)[mapping[k]] for k in sorted(mapping)])
    assert disorientation_deg(src, dst, original.crystal).max() < 1e-3
    # imported orientations are reduced to the fundamental zone
    assert damask.Orientation.from_Euler_angles(phi=dst.astype(np.float64), family=read.crystal).in_FZ.all()


def make_dream3d(
    path: Path,
    fids: np.ndarray,
    *,
    feature_euler: np.ndarray | None = None,
    cell_euler: np.ndarray | None = None,
    spacing: tuple[float, float, float] | None = (0.5, 0.5, 0.5),
    structures: list[int] | None = [999, 1],
    nx: bool = False,
    dims: tuple[int, int, int] | None = None,
    feature_name: str = "AvgEulerAngles",
) -> Path:
    """A DREAM3D file written with plain h5py; ``fids`` (z, y, x) as DREAM3D stores them.

    ``nx``: DREAM3D-NX layout (DataStructure/<geometry> with _DIMENSIONS/_SPACING attributes and
    'Cell Data' / 'Cell Feature Data'); otherwise DREAM3D 6.x SIMPL layout.
    """
    z, y, x = fids.shape
    dims = dims if dims is not None else (x, y, z)
    with h5py.File(path, "w") as f:
        if nx:
            f.attrs["FileVersion"] = np.bytes_("8.0")
            dc = f.create_group("DataStructure").create_group("Image Geometry")
            dc.attrs["ObjectType"] = np.bytes_("ImageGeom")
            dc.attrs["_DIMENSIONS"] = np.array(dims, np.uint64)
            dc.attrs["_ORIGIN"] = np.zeros(3, np.float32)
            if spacing is not None:
                dc.attrs["_SPACING"] = np.array(spacing, np.float32)
            cell, feature, ensemble = (dc.create_group(k) for k in ("Cell Data", "Cell Feature Data", "Cell Ensemble Data"))
        else:
            f.attrs["FileVersion"] = np.bytes_("7.0")
            f.attrs["DREAM3D Version"] = np.bytes_("6.5.171")
            dc = f.create_group("DataContainers/SyntheticVolumeDataContainer")
            geom = dc.create_group("_SIMPL_GEOMETRY")
            geom.attrs["GeometryType"] = np.uint32(0)
            geom["DIMENSIONS"] = np.array(dims, np.int64)
            geom["ORIGIN"] = np.zeros(3, np.float32)
            if spacing is not None:
                geom["SPACING"] = np.array(spacing, np.float32)
            cell, feature, ensemble = (dc.create_group(k) for k in ("CellData", "CellFeatureData", "CellEnsembleData"))
            for am, kind in ((cell, 3), (feature, 7), (ensemble, 11)):
                am.attrs["AttributeMatrixType"] = np.uint32(kind)
        cell["FeatureIds"] = fids.astype(np.int32)[..., None]
        if cell_euler is not None:
            cell["EulerAngles"] = cell_euler.astype(np.float32)
        if feature_euler is not None:
            feature[feature_name] = feature_euler.astype(np.float32)
        if structures is not None:
            ensemble["CrystalStructures"] = np.array(structures, np.uint32)[:, None]
    return path


def simple_fids(n: int = N) -> tuple[np.ndarray, np.ndarray]:
    """(z, y, x) feature ids 1..8 (octants) and a (9, 3) feature Euler array (row 0 unused)."""
    z, y, x = np.indices((n, n, n)) >= n // 2
    fids = 1 + x.astype(int) + 2 * y + 4 * z
    euler = damask.Rotation.from_random(shape=9, rng_seed=5).as_Euler_angles()
    euler[0] = 0
    return fids, euler


def assert_one_line_error(excinfo: pytest.ExceptionInfo, *words: str) -> None:
    assert isinstance(excinfo.value, (FormatError, ShardError))
    message = str(excinfo.value)
    assert message and "\n" not in message and "Traceback" not in message
    for word in words:
        assert word.lower() in message.lower(), message


# ------------------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("crystal", ["cubic", "hexagonal"])
def test_shard_dream3d_roundtrip(tmp_path, crystal):
    ves = voronoi_ve(crystal=crystal)
    write_shard(tmp_path / "shard-000.h5", ves)
    shard = read_shard(tmp_path / "shard-000.h5")
    out = write_dream3d(tmp_path / "ve.dream3d", shard)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-000.h5", "ve.dream3d"]
    read = read_dream3d(out)
    assert_same_ve(ves, read)
    assert read.attrs["source_format"] == "dream3d"
    # the raw (unreduced) input differs from what was read: reduction really happened
    assert not np.allclose(read.grain_euler(0), ves.grain_euler(0), atol=1e-3)
    # written layout: SIMPL names DREAM3D itself uses
    with h5py.File(out, "r") as f:
        dc = f["DataContainers/SyntheticVolumeDataContainer"]
        assert dc["CellData/FeatureIds"].shape == (N, N, N, 1) and dc["CellData/FeatureIds"].dtype == np.int32
        assert dc["CellData/FeatureIds"][()].min() == 1
        assert dc["CellFeatureData/AvgEulerAngles"].shape == (ves.n_grains[0] + 1, 3)
        assert list(dc["_SIMPL_GEOMETRY/DIMENSIONS"][()]) == [N, N, N]
        assert dc["CellEnsembleData/CrystalStructures"][1, 0] == (1 if crystal == "cubic" else 0)


@pytest.mark.parametrize("crystal", ["cubic", "hexagonal"])
def test_shard_damask_roundtrip(tmp_path, crystal):
    ves = voronoi_ve(crystal=crystal, resolution=0.25)
    write_shard(tmp_path / "shard.h5", ves)
    vti, material = write_damask(tmp_path / "grid", read_shard(tmp_path / "shard.h5"), phase_name="Mg")
    assert sorted(p.name for p in (tmp_path / "grid").iterdir()) == ["material.yaml", "ve7.vti"]
    read = read_damask(vti)
    assert_same_ve(ves, read)
    # the files are what DAMASK itself reads
    grid = damask.GeomGrid.load(vti)
    assert np.array_equal(grid.material, ves.grain_ids[0])
    assert np.allclose(grid.size, N * 0.25)
    config = damask.ConfigMaterial.load(material)
    assert config["phase"]["Mg"]["lattice"] == ("cF" if crystal == "cubic" else "hP")
    assert len(config["material"]) == ves.n_grains[0]
    assert config.is_complete


def test_read_ve_file_dispatch(tmp_path):
    ves = voronoi_ve(grains=10)
    write_shard(tmp_path / "a.h5", ves)
    write_dream3d(tmp_path / "a.dream3d", ves)
    write_damask(tmp_path, ves, name="a")
    for name in ("a.h5", "a.dream3d", "a.vti"):
        read = read_ve_file(tmp_path / name)
        grain_map(ves.grain_ids[0], read.grain_ids[0])
    with pytest.raises(MicrofpError) as excinfo:
        read_ve_file(tmp_path / "a.h5", crystal="hexagonal")
    assert_one_line_error(excinfo, "cubic")
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(MicrofpError) as excinfo:
        read_ve_file(tmp_path / "a.txt")
    assert_one_line_error(excinfo, ".txt")
    # crystal override reaches the DAMASK reader
    assert read_ve_file(tmp_path / "a.vti", crystal="hexagonal").crystal == "hexagonal"


# ------------------------------------------------------------------------------------------------
# DREAM3D layouts


def test_dream3d_axis_order_and_relabel(tmp_path):
    """FeatureIds are (z, y, x): ids that depend on x only must vary along our first axis."""
    n = 8
    x = np.indices((n, n, n))[2]  # (z, y, x) index grid: the x coordinate
    fids = 10 + 3 * (x // 2)  # features 10, 13, 16, 19 along x: non-contiguous
    euler = np.zeros((20, 3))
    euler[[10, 13, 16, 19]] = damask.Rotation.from_random(4, rng_seed=1).as_Euler_angles()
    euler[[0, 1, 2, 11]] = np.nan  # unused feature rows may hold anything
    ves = read_dream3d(make_dream3d(tmp_path / "a.dream3d", fids, feature_euler=euler))
    g = ves.grain_ids[0]
    assert g.shape == (n, n, n) and ves.n_grains[0] == 4
    assert np.array_equal(g[:, 0, 0], np.repeat(np.arange(4), 2))  # varies along x, relabelled in id order
    assert np.all(g == g[:, :1, :1])  # constant along y and z
    d = disorientation_deg(euler[[10, 13, 16, 19]], ves.grain_euler(0), "cubic")
    assert d.max() < 1e-3
    assert ves.resolution == 0.5 and ves.crystal == "cubic"


def test_dream3d_per_cell_euler_only(tmp_path):
    fids, euler = simple_fids()
    fids = fids * 7 + 100  # non-contiguous ids 107..156
    grain_euler = damask.Rotation.from_random(8, rng_seed=3).as_Euler_angles()
    cells = grain_euler[(fids - 107) // 7]
    path = make_dream3d(tmp_path / "c.dream3d", fids, cell_euler=cells, structures=[999, 0])
    ves = read_dream3d(path)
    assert ves.crystal == "hexagonal" and ves.n_grains[0] == 8
    # grain k is the k-th smallest feature id; voxel (x, y, z) = fids[z, y, x]
    expected = ((fids - 107) // 7).transpose(2, 1, 0)
    assert np.array_equal(ves.grain_ids[0], expected)
    assert disorientation_deg(grain_euler, ves.grain_euler(0), "hexagonal").max() < 1e-3
    # per-cell angles that vary inside a feature are not one orientation per grain
    cells[0, 0, 0] += [0.2, 0.0, 0.0]
    with pytest.raises(MicrofpError) as excinfo:
        read_dream3d(make_dream3d(tmp_path / "v.dream3d", fids, cell_euler=cells, structures=[999, 0]))
    assert_one_line_error(excinfo, "feature 107")


def test_dream3d_per_cell_tolerates_equivalent_wraparound(tmp_path):
    """phi1 = 0 and phi1 = 2pi are the same orientation: not 'non-constant'."""
    fids, _ = simple_fids(4)
    cells = np.full(fids.shape + (3,), 0.5)
    cells[..., 0] = 0.0
    cells[0, 0, 0, 0] = 2 * math.pi - 1e-6
    ves = read_dream3d(make_dream3d(tmp_path / "w.dream3d", fids, cell_euler=cells))
    assert ves.n_grains[0] == 8


def test_dream3d_nx_layout_and_overrides(tmp_path):
    fids, euler = simple_fids()
    path = make_dream3d(
        tmp_path / "nx.dream3d", fids, feature_euler=euler, nx=True, spacing=None, structures=None,
        feature_name="EulerAngles",
    )
    with pytest.raises(MicrofpError) as excinfo:
        read_dream3d(path, crystal="cubic")
    assert_one_line_error(excinfo, "resolution")
    with pytest.raises(MicrofpError) as excinfo:
        read_dream3d(path, resolution=0.3)
    assert_one_line_error(excinfo, "CrystalStructures")
    ves = read_dream3d(path, crystal="hexagonal", resolution=0.3)
    assert ves.crystal == "hexagonal" and ves.resolution == pytest.approx(0.3) and ves.n_grains[0] == 8
    assert disorientation_deg(euler[1:], ves.grain_euler(0), "hexagonal").max() < 1e-3


def test_dream3d_crystal_structures(tmp_path):
    fids, euler = simple_fids(4)
    hexa = make_dream3d(tmp_path / "h.dream3d", fids, feature_euler=euler, structures=[999, 0])
    assert read_dream3d(hexa).crystal == "hexagonal"
    assert read_dream3d(hexa, crystal="cubic").crystal == "cubic"
    tri = make_dream3d(tmp_path / "t.dream3d", fids, feature_euler=euler, structures=[999, 4])
    with pytest.raises(MicrofpError) as excinfo:
        read_dream3d(tri)
    assert_one_line_error(excinfo, "triclinic")
    assert read_dream3d(tri, crystal="cubic").crystal == "cubic"


# ------------------------------------------------------------------------------------------------
# DAMASK layouts


def test_damask_multi_material_shared_orientation(tmp_path):
    n = 8
    material = np.zeros((n, n, n), int)
    material[n // 2 :] = 2
    material[:, n // 2 :] = 5  # materials 0, 2, 5 used; 1, 3, 4 unused
    damask.GeomGrid(material, size=[2.0, 2.0, 2.0]).save(tmp_path / "m.vti")
    q = damask.Rotation.from_random(2, rng_seed=4)
    orientations = [q[0], q[1], q[1], q[1], q[1], q[0]]  # materials 0 and 5 share an orientation
    config = damask.ConfigMaterial().material_add(O=orientations, phase="Ti", homogenization="SX")
    config["phase"]["Ti"] = {"lattice": "hP", "c/a": 1.587}
    config.save(tmp_path / "material.yaml")
    ves = read_damask(tmp_path / "m.vti")
    assert ves.crystal == "hexagonal" and ves.n_grains[0] == 3 and ves.resolution == pytest.approx(0.25)
    mapping = grain_map(material, ves.grain_ids[0])
    assert mapping == {0: 0, 2: 1, 5: 2}
    e = ves.grain_euler(0)
    assert disorientation_deg(e[[0]], e[[2]], "hexagonal")[0] < 1e-3
    assert disorientation_deg(e[[0]], e[[1]], "hexagonal")[0] > 1.0
    expected = np.stack([q[0].as_Euler_angles(), q[1].as_Euler_angles(), q[0].as_Euler_angles()])
    assert disorientation_deg(expected, e, "hexagonal").max() < 1e-3


def test_damask_lattice_and_override(tmp_path):
    n = 4
    damask.GeomGrid(np.arange(n**3).reshape(n, n, n) % 2, size=[1, 1, 1]).save(tmp_path / "g.vti")
    config = damask.ConfigMaterial().material_add(O=damask.Rotation.from_random(2, rng_seed=0), phase="Fe", homogenization="SX")
    config.save(tmp_path / "material.yaml")  # phase without a lattice
    with pytest.raises(MicrofpError) as excinfo:
        read_damask(tmp_path / "g.vti")
    assert_one_line_error(excinfo, "lattice")
    assert read_damask(tmp_path / "g.vti", crystal="cubic").crystal == "cubic"
    config["phase"]["Fe"] = {"lattice": "cI"}
    config.save(tmp_path / "other.yaml")
    assert read_damask(tmp_path / "g.vti", material_path=tmp_path / "other.yaml").crystal == "cubic"


# ------------------------------------------------------------------------------------------------
# bad input: one-line errors


def _dream3d_cases(tmp_path: Path) -> dict[str, tuple[Path, dict, tuple[str, ...]]]:
    fids, euler = simple_fids()
    cases: dict[str, tuple[Path, dict, tuple[str, ...]]] = {}

    good = make_dream3d(tmp_path / "good.dream3d", fids, feature_euler=euler)
    data = good.read_bytes()
    trunc = tmp_path / "truncated.dream3d"
    trunc.write_bytes(data[: len(data) // 2])
    cases["truncated"] = (trunc, {}, ("truncated.dream3d",))
    garbage = tmp_path / "garbage.dream3d"
    garbage.write_bytes(b"not an hdf5 file at all" * 10)
    cases["garbage"] = (garbage, {}, ("garbage.dream3d",))
    cases["missing file"] = (tmp_path / "nope.dream3d", {}, ("no such file",))

    p = make_dream3d(tmp_path / "noids.dream3d", fids, feature_euler=euler)
    with h5py.File(p, "a") as f:
        del f["DataContainers/SyntheticVolumeDataContainer/CellData/FeatureIds"]
    cases["missing FeatureIds"] = (p, {}, ("FeatureIds",))
    cases["missing Euler"] = (make_dream3d(tmp_path / "noeuler.dream3d", fids), {}, ("Euler",))

    z, y, x = np.indices((16, 32, 32))
    cases["32x32x16"] = (
        make_dream3d(tmp_path / "flat.dream3d", 1 + (x >= 16), feature_euler=euler[:3]), {}, ("cubic", "32 x 32 x 16"),
    )
    p = make_dream3d(tmp_path / "wrongdims.dream3d", fids, feature_euler=euler)
    with h5py.File(p, "a") as f:
        del f["DataContainers/SyntheticVolumeDataContainer/CellData/FeatureIds"]
        f["DataContainers/SyntheticVolumeDataContainer/CellData/FeatureIds"] = np.ones((N, N), np.int32)
    cases["2D FeatureIds"] = (p, {}, ("shape",))
    cases["DIMENSIONS mismatch"] = (
        make_dream3d(tmp_path / "dims.dream3d", fids, feature_euler=euler, dims=(N, N, N + 1)), {}, ("DIMENSIONS",),
    )
    cases["float FeatureIds"] = (tmp_path / "floatids.dream3d", {}, ("dtype",))
    with h5py.File(cases["float FeatureIds"][0], "w") as f:
        f["DataContainers/D/CellData/FeatureIds"] = fids.astype(np.float32)[..., None]
        f["DataContainers/D/CellFeatureData/AvgEulerAngles"] = euler

    nan = euler.copy()
    nan[3, 1] = np.nan
    cases["NaN angles"] = (make_dream3d(tmp_path / "nan.dream3d", fids, feature_euler=nan), {}, ("NaN",))
    cases["degrees as radians"] = (
        make_dream3d(tmp_path / "deg.dream3d", fids, feature_euler=np.degrees(euler)), {}, ("degrees",),
    )
    cells = np.degrees(euler)[fids]
    cases["per-cell degrees"] = (
        make_dream3d(tmp_path / "celldeg.dream3d", fids, cell_euler=cells), {}, ("degrees",),
    )
    cases["bad feature Euler shape"] = (
        make_dream3d(tmp_path / "fshape.dream3d", fids, feature_euler=euler[:, :2]), {}, ("shape",),
    )
    cases["too few feature rows"] = (
        make_dream3d(tmp_path / "rows.dream3d", fids, feature_euler=euler[:5]), {}, ("rows",),
    )
    cases["feature id 0"] = (
        make_dream3d(tmp_path / "zero.dream3d", fids - 1, feature_euler=euler), {}, ("feature id 0",),
    )
    cases["anisotropic spacing"] = (
        make_dream3d(tmp_path / "aniso.dream3d", fids, feature_euler=euler, spacing=(1.0, 1.0, 2.0)), {}, ("SPACING",),
    )
    cases["bad crystal argument"] = (good, {"crystal": "fcc"}, ("cubic or hexagonal",))
    cases["bad resolution argument"] = (good, {"resolution": -1.0}, ("resolution",))

    p = make_dream3d(tmp_path / "two.dream3d", fids, feature_euler=euler)
    with h5py.File(p, "a") as f:
        f.copy("DataContainers/SyntheticVolumeDataContainer", "DataContainers/Second")
    cases["two containers"] = (p, {}, ("container=",))
    return cases


DREAM3D_CASES = [
    "truncated", "garbage", "missing file", "missing FeatureIds", "missing Euler", "32x32x16", "2D FeatureIds",
    "DIMENSIONS mismatch", "float FeatureIds", "NaN angles", "degrees as radians", "per-cell degrees",
    "bad feature Euler shape", "too few feature rows", "feature id 0", "anisotropic spacing",
    "bad crystal argument", "bad resolution argument", "two containers",
]


@pytest.mark.parametrize("case", DREAM3D_CASES)
def test_dream3d_bad_input(tmp_path, case):
    cases = _dream3d_cases(tmp_path)
    assert sorted(cases) == sorted(DREAM3D_CASES)
    path, kwargs, words = cases[case]
    before = sorted(tmp_path.iterdir())
    with pytest.raises(MicrofpError) as excinfo:
        read_dream3d(path, **kwargs)
    assert_one_line_error(excinfo, *words)
    assert sorted(tmp_path.iterdir()) == before  # a failed read writes nothing


def test_dream3d_two_containers_choose_one(tmp_path):
    fids, euler = simple_fids()
    p = make_dream3d(tmp_path / "two.dream3d", fids, feature_euler=euler)
    with h5py.File(p, "a") as f:
        f.copy("DataContainers/SyntheticVolumeDataContainer", "DataContainers/Second")
        del f["DataContainers/Second/CellData/FeatureIds"]
        f["DataContainers/Second/CellData/FeatureIds"] = np.ones((N, N, N, 1), np.int32)
    assert read_dream3d(p, container="DataContainers/Second").n_grains[0] == 1
    assert read_dream3d(p, container="DataContainers/SyntheticVolumeDataContainer").n_grains[0] == 8


def test_too_many_grains(tmp_path):
    n = 41  # 68921 one-voxel features
    fids = 1 + np.arange(n**3).reshape(n, n, n)
    euler = np.full((n**3 + 1, 3), 0.5)
    with pytest.raises(MicrofpError) as excinfo:
        read_dream3d(make_dream3d(tmp_path / "many.dream3d", fids, feature_euler=euler))
    assert_one_line_error(excinfo, "68921 grains", "65535")
    damask.GeomGrid(fids - 1, size=[1, 1, 1]).save(tmp_path / "many.vti")
    (tmp_path / "material.yaml").write_text(yaml.safe_dump({"material": [{"constituents": [{"O": [1, 0, 0, 0], "phase": "A"}]}]}))
    with pytest.raises(MicrofpError) as excinfo:
        read_damask(tmp_path / "many.vti", crystal="cubic")
    assert_one_line_error(excinfo, "68921 grains")


def _damask_cases(tmp_path: Path) -> dict[str, tuple[Path, dict, tuple[str, ...]]]:
    n = 4
    material = np.arange(n**3).reshape(n, n, n) % 3
    rot = damask.Rotation.from_random(3, rng_seed=2)
    cases: dict[str, tuple[Path, dict, tuple[str, ...]]] = {}

    def grid_dir(name: str, mat: np.ndarray = material, size=(1.0, 1.0, 1.0), config=None) -> Path:
        d = tmp_path / name
        d.mkdir()
        damask.GeomGrid(mat, size=list(size)).save(d / "g.vti")
        if config is None:
            config = damask.ConfigMaterial().material_add(O=rot, phase="Cu", homogenization="SX")
            config["phase"]["Cu"] = {"lattice": "cF"}
        if config is not False:
            if isinstance(config, str):
                (d / "material.yaml").write_text(config)
            else:
                config.save(d / "material.yaml")
        return d / "g.vti"

    good = grid_dir("good")
    cases["missing material.yaml"] = (grid_dir("nomat", config=False), {}, ("material.yaml",))
    cases["missing vti"] = (tmp_path / "good" / "absent.vti", {}, ("no such file",))
    data = good.read_bytes()
    d = tmp_path / "trunc"
    d.mkdir()
    (d / "g.vti").write_bytes(data[: len(data) - 40])
    (d / "material.yaml").write_bytes((tmp_path / "good" / "material.yaml").read_bytes())
    cases["truncated vti"] = (d / "g.vti", {}, ("truncated",))
    d = tmp_path / "garbage"
    d.mkdir()
    (d / "g.vti").write_bytes(b"\x00\x01garbage")
    (d / "material.yaml").write_bytes((tmp_path / "good" / "material.yaml").read_bytes())
    cases["garbage vti"] = (d / "g.vti", {}, ("g.vti",))
    d = tmp_path / "nomaterialarray"
    d.mkdir()
    damask.VTK.from_image_data([n, n, n], [1, 1, 1]).set("phase", np.zeros(n**3)).save(d / "g.vti", parallel=False)
    (d / "material.yaml").write_bytes((tmp_path / "good" / "material.yaml").read_bytes())
    cases["no material array"] = (d / "g.vti", {}, ("material",))

    cases["non-cubic grid"] = (grid_dir("flat", np.zeros((4, 4, 2), int), size=(1.0, 1.0, 0.5)), {}, ("cubic", "4 x 4 x 2"))
    cases["anisotropic size"] = (grid_dir("aniso", size=(1.0, 1.0, 2.0)), {}, ("cubes",))
    cases["material ids without orientation"] = (grid_dir("ids", material + 2), {}, ("3, 4", "no entry"))
    cases["malformed yaml"] = (grid_dir("badyaml", config="material: [constituents: {O: [1, 0\n  - :"), {}, ("YAML",))
    cases["yaml without material"] = (grid_dir("nolist", config="phase: {Cu: {lattice: cF}}\n"), {}, ("'material'",))
    two = damask.ConfigMaterial().material_add(
        O=damask.Rotation.from_random((3, 2), rng_seed=1), phase=np.array([["Cu", "Cu"]]), v=np.array([[0.5, 0.5]]),
        homogenization="Taylor",
    )
    two["phase"]["Cu"] = {"lattice": "cF"}
    cases["two constituents"] = (grid_dir("two", config=two), {}, ("2 constituents",))
    bad_q = "material:\n" + "".join(
        f"- constituents:\n  - phase: Cu\n    O: {o}\n    v: 1.0\n  homogenization: SX\n"
        for o in ("[1, 0, 0, 0]", "[1, 1, 0, 0]", "[1, 0, 0, 0]")
    ) + "phase: {Cu: {lattice: cF}}\n"
    cases["non-unit quaternion"] = (grid_dir("unit", config=bad_q), {}, ("unit quaternion", "material 1"))
    cases["NaN quaternion"] = (grid_dir("nanq", config=bad_q.replace("[1, 1, 0, 0]", "[.nan, 0, 0, 1]")), {}, ("NaN",))
    cases["no orientation"] = (grid_dir("noO", config=bad_q.replace("    O: [1, 1, 0, 0]\n", "")), {}, ("no orientation",))
    cases["unsupported lattice"] = (grid_dir("tP", config=bad_q.replace("[1, 1, 0, 0]", "[1, 0, 0, 0]").replace("cF", "tI")), {}, ("tI",))
    cases["bad crystal argument"] = (good, {"crystal": "bcc"}, ("cubic or hexagonal",))
    return cases


DAMASK_CASES = [
    "missing material.yaml", "missing vti", "truncated vti", "garbage vti", "no material array", "non-cubic grid",
    "anisotropic size", "material ids without orientation", "malformed yaml", "yaml without material",
    "two constituents", "non-unit quaternion", "NaN quaternion", "no orientation", "unsupported lattice",
    "bad crystal argument",
]


@pytest.mark.parametrize("case", DAMASK_CASES)
def test_damask_bad_input(tmp_path, case, capfd):
    cases = _damask_cases(tmp_path)
    assert sorted(cases) == sorted(DAMASK_CASES)
    assert read_damask(tmp_path / "good" / "g.vti").n_grains[0] == 3  # the baseline is readable
    path, kwargs, words = cases[case]
    capfd.readouterr()
    with pytest.raises(MicrofpError) as excinfo:
        read_damask(path, **kwargs)
    assert_one_line_error(excinfo, *words)
    assert "ERR|" not in capfd.readouterr().err  # VTK's own error printing is silenced


# ------------------------------------------------------------------------------------------------
# exports: validation and no partial output


def test_export_rejects_bad_sets_and_leaves_nothing(tmp_path):
    ves = voronoi_ve(grains=6)
    with pytest.raises(MicrofpError) as excinfo:  # a VESet checks itself when made ...
        VESet(**{**ves.__dict__, "euler": np.degrees(ves.euler)})
    assert_one_line_error(excinfo, "degrees")
    nan = VESet(**{**ves.__dict__, "euler": ves.euler.copy()})  # ... and the writers check it again
    nan.euler[0, 2, 1] = np.nan
    degrees = VESet(**{**ves.__dict__, "euler": ves.euler.copy()})
    degrees.euler[:] = np.degrees(degrees.euler)
    for bad, words in ((nan, ("NaN",)), (degrees, ("degrees",))):
        with pytest.raises(MicrofpError) as excinfo:
            write_dream3d(tmp_path / "x.dream3d", bad)
        assert_one_line_error(excinfo, *words)
        with pytest.raises(MicrofpError) as excinfo:
            write_damask(tmp_path / "grid", bad)
        assert_one_line_error(excinfo, *words)
    with pytest.raises(MicrofpError) as excinfo:
        write_dream3d(tmp_path / "x.dream3d", ves, index=1)
    assert_one_line_error(excinfo, "index")
    assert list(tmp_path.iterdir()) == []


def test_failed_exports_leave_nothing(tmp_path, monkeypatch):
    ves = voronoi_ve(grains=6)

    def broken_save(self, fname, **kwargs):
        Path(fname).write_text("half a file")
        raise OSError("disk full")

    monkeypatch.setattr(damask.ConfigMaterial, "save", broken_save)
    with pytest.raises(MicrofpError) as excinfo:
        write_damask(tmp_path / "grid", ves)
    assert_one_line_error(excinfo, "disk full")
    assert list((tmp_path / "grid").iterdir()) == []  # neither the .vti nor temp files

    real_create = h5py.Group.create_dataset

    def failing_create(self, name, *args, **kwargs):
        if name == "AvgEulerAngles":
            raise OSError("disk full")
        return real_create(self, name, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", failing_create)
    with pytest.raises(MicrofpError) as excinfo:
        write_dream3d(tmp_path / "out" / "x.dream3d", ves)
    assert_one_line_error(excinfo, "disk full")
    assert list((tmp_path / "out").iterdir()) == []

    # an unwritable destination (parent is a file) is a one-line error too
    (tmp_path / "file").write_text("x")
    monkeypatch.undo()
    with pytest.raises(MicrofpError) as excinfo:
        write_dream3d(tmp_path / "file" / "x.dream3d", ves)
    assert_one_line_error(excinfo, "cannot write")


def test_damask_export_refuses_foreign_material_yaml(tmp_path):
    a, b = voronoi_ve(grains=5, seed=1), voronoi_ve(grains=7, seed=2)
    write_damask(tmp_path, a, name="a")
    write_damask(tmp_path, a, name="a")  # the same VE again is fine
    before = (tmp_path / "material.yaml").read_text()
    with pytest.raises(MicrofpError) as excinfo:
        write_damask(tmp_path, b, name="b")
    assert_one_line_error(excinfo, "another VE")
    assert (tmp_path / "material.yaml").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.vti", "material.yaml"]
    write_damask(tmp_path, b, name="b", overwrite=True)
    assert read_damask(tmp_path / "b.vti").n_grains[0] == b.n_grains[0]


def test_formats_module_exposes_format_error():
    assert issubclass(formats.FormatError, MicrofpError)
