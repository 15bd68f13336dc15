"""Import and export of the VE formats users hold: DREAM3D ``.dream3d`` files and DAMASK grids.

Every reader returns a one-VE :class:`~microfp.shards.VESet`: grain ids relabelled to 0..G-1 in
our (x, y, z) axis order, one orientation per grain reduced to the fundamental zone of the crystal
family with ``damask.Orientation(...).reduced`` and stored as float32 Bunge Euler angles in radians.
Bad input raises :class:`FormatError` (or :class:`~microfp.shards.ShardError`) with a one-line
message; library exceptions (h5py, VTK, YAML) never reach the user. Exports write temporary files
and rename them, so a failed export leaves nothing behind.

DREAM3D (HDF5)
--------------
Supported layouts (the file is searched by array name, not by one hard-coded container):

* SIMPL / DREAM3D 6.x (``FileVersion`` 7.0)::

    DataContainers/<container>/_SIMPL_GEOMETRY/{DIMENSIONS (x,y,z), SPACING (x,y,z), ORIGIN}
    DataContainers/<container>/<cell matrix, e.g. CellData>/FeatureIds        (z, y, x, 1) int
    DataContainers/<container>/<cell matrix>/EulerAngles                       (z, y, x, 3) float, optional
    DataContainers/<container>/<feature matrix, e.g. CellFeatureData>/EulerAngles or AvgEulerAngles
                                                                                (F+1, 3), row 0 unused
    DataContainers/<container>/<ensemble matrix, e.g. CellEnsembleData>/CrystalStructures  (P+1, 1)

* DREAM3D-NX (``FileVersion`` 8.0): the same arrays under ``DataStructure/<geometry>/`` (for
  example ``Cell Data``, ``Cell Feature Data``/``Grain Data``), with the geometry's ``_DIMENSIONS``
  and ``_SPACING`` stored as attributes of the geometry group.

* Legacy names ``GrainIds`` (cell ids) and ``CellEulerAngles`` (per-cell angles) are accepted too.

Orientations come from the per-feature array when there is one (only the rows of features that
occur are read, so unused rows may hold anything), else from the per-cell array, which must then
be constant within each feature (1e-3 rad). Feature id 0 is DREAM3D's "unassigned" feature: it is
refused when orientations come from the per-feature array. The crystal family comes from
``CrystalStructures`` (Laue class 1 = cubic m-3m, 0 = hexagonal 6/mmm; others are refused) unless
``crystal`` is given, and the resolution from an isotropic ``SPACING`` unless ``resolution`` is
given.

DAMASK grid
-----------
A ``.vti`` image (``damask.GeomGrid``) whose cell array ``material`` indexes the ``material`` list of
``material.yaml`` (``damask.ConfigMaterial``). Each material used by the grid becomes one grain
(materials that share an orientation stay separate grains); each must have exactly one constituent
with a unit quaternion ``O`` (DAMASK convention, P = -1) and a ``phase`` whose ``lattice`` gives the
family (cF, cI, cP -> cubic; hP -> hexagonal) unless ``crystal`` is given. The resolution is
``size / cells`` and must be the same along x, y and z.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import h5py
import numpy as np

from microfp.atomic import atomic_outputs
from microfp.errors import MicrofpError
from microfp.shards import (
    CRYSTAL_FAMILIES,
    EULER_SCALE,
    ShardError,
    VESet,
    read_shard,
    validate,
)
from microfp.volumes import MAX_GRAINS

__all__ = [
    "FormatError",
    "MAX_GRAINS",
    "Phase",
    "Volume",
    "read_damask_volume",
    "read_dream3d_volume",
    "read_volume",
    "reduced_euler",
    "read_damask",
    "read_dream3d",
    "read_ve_file",
    "write_damask",
    "write_dream3d",
    "write_dream3d_volume",
]

ANGLE_TOLERANCE = 1e-4
"""Radians an Euler angle may lie outside [0, 2pi] x [0, pi] x [0, 2pi] (float32 rounding)."""

CELL_EULER_TOLERANCE = 1e-3
"""Radians by which per-cell orientations of one feature may differ from each other."""

FEATURE_ID_NAMES = ("FeatureIds", "GrainIds")
CELL_EULER_NAMES = ("EulerAngles", "CellEulerAngles")
FEATURE_EULER_NAMES = ("EulerAngles", "AvgEulerAngles", "FeatureEulerAngles")
LAUE_CLASSES = {1: "cubic", 0: "hexagonal"}
"""DREAM3D/EbsdLib Laue class ids we support (Cubic_High m-3m, Hexagonal_High 6/mmm)."""
LAUE_NAMES = {
    0: "hexagonal 6/mmm", 1: "cubic m-3m", 2: "hexagonal 6/m", 3: "cubic m-3", 4: "triclinic",
    5: "monoclinic", 6: "orthorhombic", 7: "tetragonal 4/m", 8: "tetragonal 4/mmm", 9: "trigonal -3",
    10: "trigonal -3m", 999: "unknown",
}
LATTICE_FAMILIES = {"cF": "cubic", "cI": "cubic", "cP": "cubic", "hP": "hexagonal"}
EXPORT_LATTICE = {"cubic": "cF", "hexagonal": "hP"}
DREAM3D_VERSION = "6.5.171"
SUFFIXES = (".h5", ".dream3d", ".vti")


class FormatError(MicrofpError):
    """A VE file in a foreign format (DREAM3D, DAMASK) that cannot be read or written; one line."""


@dataclass(frozen=True)
class Phase:
    """One phase of a volume: ``name``, crystal ``family`` (cubic|hexagonal, None when unsupported or
    not given), the file's own ``code`` (DREAM3D Laue class id, DAMASK lattice) and a ``label``."""

    name: str
    family: str | None
    code: Any
    label: str


@dataclass
class Volume:
    """A volume of any shape as a file holds it, before resampling or windowing.

    ``grain_ids`` (nx, ny, nz) int64 grain index 0..G-1 per voxel (axes x, y, z); ``euler`` (G, 3)
    float64 Bunge angles in radians as stored (not reduced); ``grain_phase`` (G,) int64 phase number
    of each grain (0: no phase, e.g. DREAM3D's unassigned feature 0); ``phases`` number -> Phase;
    ``spacing`` (3,) length units per voxel along x, y, z (None when the file gives none);
    ``periodic``: whether the volume repeats (DAMASK grids do).
    """

    grain_ids: np.ndarray
    euler: np.ndarray
    grain_phase: np.ndarray
    phases: dict[int, Phase]
    spacing: np.ndarray | None
    periodic: bool
    source: str
    fmt: str
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.grain_ids.shape)  # type: ignore[return-value]

    def family(self, number: int) -> str:
        """Crystal family of phase ``number``; FormatError when the file does not give a supported one."""
        phase = self.phases.get(number)
        if phase is None:
            raise FormatError(f"{self.source}: phase {number} is not described in the file; pass crystal=")
        if phase.family is None:
            raise FormatError(
                f"{self.attrs.get('material', self.source)}: phase {phase.name!r} has {phase.label}, "
                "not a supported crystal family (cubic: cF, cI, cP or Laue class 1; hexagonal: hP or Laue class 0); pass crystal="
            )
        return phase.family


# --------------------------------------------------------------------------------------------------
# dispatch


def read_ve_file(path: str | Path, crystal: str | None = None) -> VESet:
    """Read one VE file, chosen by extension: ``.h5`` (our shard), ``.dream3d``, ``.vti`` (DAMASK).

    ``crystal`` overrides the family stored in DREAM3D/DAMASK files; for a shard it must agree with
    the shard (whose orientations are already reduced for its family).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".h5":
        ves = read_shard(path)
        if crystal is not None and _check_crystal(crystal, str(path)) != ves.crystal:
            raise FormatError(f"{path}: shard holds {ves.crystal} VEs, not {crystal}")
        return ves
    if suffix == ".dream3d":
        return read_dream3d(path, crystal=crystal)
    if suffix == ".vti":
        return read_damask(path, crystal=crystal)
    raise FormatError(f"{path}: unknown VE file type {suffix or '(no extension)'!r}; expected one of {', '.join(SUFFIXES)}")


def read_volume(path: str | Path, material_path: str | Path | None = None) -> Volume:
    """Read a volume of any shape: ``.dream3d`` (non-periodic) or DAMASK ``.vti`` (periodic)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".dream3d":
        return read_dream3d_volume(path)
    if suffix == ".vti":
        return read_damask_volume(path, material_path)
    raise FormatError(f"{path}: unknown volume file type {suffix or '(no extension)'!r}; expected .dream3d or .vti")


# --------------------------------------------------------------------------------------------------
# DREAM3D


def read_dream3d(
    path: str | Path,
    crystal: str | None = None,
    resolution: float | None = None,
    *,
    container: str | None = None,
) -> VESet:
    """Read the VE of a DREAM3D file (see the module docstring for the supported layouts).

    ``crystal`` (cubic|hexagonal) overrides ``CrystalStructures``; ``resolution`` (length units per
    voxel) overrides ``SPACING``; ``container`` (an HDF5 group path, e.g.
    ``DataContainers/SyntheticVolumeDataContainer``) picks one when the file holds several VEs.
    The VE must be cubic (n x n x n voxels); volumes of any shape: :func:`read_dream3d_volume`.
    """
    source = str(path)
    if crystal is not None:
        crystal = _check_crystal(crystal, source)
    if resolution is not None:
        resolution = _check_resolution(resolution, source)
    volume = read_dream3d_volume(path, container=container, allow_unassigned=False)
    _check_cubic(volume.grain_ids.shape, source)
    if resolution is None:
        if volume.spacing is None:
            raise FormatError(f"{path}: no SPACING in the geometry; pass the resolution (length units per voxel)")
        resolution = _isotropic(volume.spacing, source, "SPACING")
    if crystal is None:
        used = [volume.phases.get(int(k)) for k in np.unique(volume.grain_phase) if k > 0]
        codes = [p.code for p in used if p is not None and p.code is not None]
        if not codes:  # no phase in use is described: any described phase (as DREAM3D 6 files have it)
            codes = [p.code for p in volume.phases.values() if p.code is not None]
        crystal = _dream3d_crystal(np.asarray(codes) if codes else None, source)
    return _one_ve(volume.grain_ids, volume.euler, crystal, resolution, source, "dream3d")


def read_dream3d_volume(
    path: str | Path, *, container: str | None = None, allow_unassigned: bool = True
) -> Volume:
    """Read a DREAM3D image volume of any shape, spacing and number of phases.

    Feature id 0 (DREAM3D's "unassigned" feature) becomes a grain of phase 0 (no phase) when
    ``allow_unassigned`` and orientations come per feature; otherwise it is an error. Phases come from
    ``Phases`` (per feature, else per cell; all phase 1 when absent), their Laue class from
    ``CrystalStructures`` and their names from ``PhaseName`` when the file has them.
    """
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise FormatError(f"{path}: no such file")
    try:
        with h5py.File(path, "r") as f:
            arrays = _read_dream3d_arrays(f, source, container)
    except MicrofpError:
        raise
    except (OSError, KeyError, ValueError, TypeError, RuntimeError, IndexError) as err:
        raise FormatError(f"{path}: not a readable DREAM3D file ({_reason(err)})") from None
    fids, euler, per_cell = arrays["fids"], arrays["euler"], arrays["per_cell"]

    # fids (z, y, x) integer feature ids; euler (F+1, 3) per feature or (z, y, x, 3) per cell.
    uniq, first, inverse = np.unique(fids.reshape(-1), return_index=True, return_inverse=True)
    _check_grain_count(len(uniq), source)
    unassigned = bool(uniq[0] == 0) and not per_cell
    if per_cell:
        cells = euler.reshape(-1, 3)
        _check_angles(cells, source, "per-cell EulerAngles")
        grain_euler = cells[first]
        _check_constant(cells, grain_euler, inverse, uniq, source)
    else:
        if unassigned and not allow_unassigned:
            count = int(np.count_nonzero(fids == 0))
            raise FormatError(
                f"{path}: {count} voxels have feature id 0 (DREAM3D's unassigned feature, no orientation); "
                "fill them first (e.g. DREAM3D 'Fill Bad Data')"
            )
        if uniq[-1] >= euler.shape[0]:
            raise FormatError(
                f"{path}: FeatureIds go up to {int(uniq[-1])} but the feature Euler angles have only "
                f"{euler.shape[0]} rows (features 0..{euler.shape[0] - 1})"
            )
        grain_euler = euler[uniq].copy()
        if unassigned:
            grain_euler[0] = 0.0  # row 0 of DREAM3D feature arrays holds nothing
        _check_angles(grain_euler, source, "feature EulerAngles")

    feature_phases, cell_phases = arrays["feature_phases"], arrays["cell_phases"]
    if feature_phases is not None and uniq[-1] < feature_phases.size:
        grain_phase = feature_phases[uniq]
    elif cell_phases is not None:
        grain_phase = cell_phases.reshape(-1)[first]
    else:
        grain_phase = np.ones(len(uniq), dtype=np.int64)
    grain_phase = np.asarray(grain_phase, dtype=np.int64)
    if unassigned:
        grain_phase[0] = 0
    structures, names = arrays["structures"], arrays["phase_names"]
    numbers = sorted({int(k) for k in grain_phase if k > 0} | set(range(1, 0 if structures is None else structures.size)))
    phases = {}
    for k in numbers:
        code = int(structures[k]) if structures is not None and k < structures.size else None
        if code == 999:
            code = None
        name = names[k] if names is not None and k < len(names) and names[k] else f"phase {k}"
        phases[k] = Phase(name, LAUE_CLASSES.get(code) if code is not None else None, code,
                          LAUE_NAMES.get(code, f"Laue class {code}") if code is not None else "no CrystalStructures")
    grain_ids = inverse.reshape(fids.shape).transpose(2, 1, 0)  # (z, y, x) -> (x, y, z)
    spacing = arrays["spacing"]
    return Volume(np.ascontiguousarray(grain_ids), grain_euler.astype(np.float64), grain_phase, phases,
                  None if spacing is None else np.asarray(spacing, dtype=np.float64).reshape(-1), False, source, "dream3d")


def write_dream3d(path: str | Path, ves: VESet, index: int = 0, *, cell_euler: bool = True) -> Path:
    """Export VE ``index`` of ``ves`` as a DREAM3D 6.x (SIMPL) file; returns the path written.

    Writes ``DataContainers/SyntheticVolumeDataContainer`` with ``_SIMPL_GEOMETRY`` (DIMENSIONS,
    ORIGIN, SPACING), ``CellData`` (FeatureIds = grain + 1, Phases and, if ``cell_euler``, per-cell
    EulerAngles), ``CellFeatureData`` (AvgEulerAngles with the unused feature 0, Phases) and
    ``CellEnsembleData`` (CrystalStructures, PhaseTypes). Atomic: temp file, then rename.
    """
    g, e = _export_ve(ves, index, str(path))
    laue = {v: k for k, v in LAUE_CLASSES.items()}[ves.crystal]
    volume = Volume(g.astype(np.int64), e.astype(np.float64), np.ones(len(e), np.int64),
                    {1: Phase(ves.crystal, ves.crystal, laue, LAUE_NAMES[laue])},
                    np.full(3, float(ves.resolution)), True, str(path), "dream3d")
    return write_dream3d_volume(path, volume, cell_euler=cell_euler)


def write_dream3d_volume(path: str | Path, volume: Volume, *, cell_euler: bool = True) -> Path:
    """Export a :class:`Volume` of any shape, spacing and phases as a DREAM3D 6.x (SIMPL) file.

    Grain ``g`` becomes feature ``g + 1`` of phase ``volume.grain_phase[g]``; phase ``k`` gets
    ``CrystalStructures[k]`` (Laue class 1 cubic, 0 hexagonal) and ``PhaseName[k]``. Atomic.
    """
    path = Path(path)
    g, e = volume.grain_ids, np.asarray(volume.euler, dtype=np.float32)
    if volume.spacing is None:
        raise FormatError(f"{path}: the volume has no spacing to write")
    n_phases = max(volume.phases) if volume.phases else 1
    laue = {v: k for k, v in LAUE_CLASSES.items()}
    structures = np.full((n_phases + 1, 1), 999, np.uint32)
    names = ["Unknown Phase Type"] + [f"phase {k}" for k in range(1, n_phases + 1)]
    for k, phase in volume.phases.items():
        if phase.family is None:
            raise FormatError(f"{path}: phase {phase.name!r} has no crystal family to write")
        structures[k, 0], names[k] = laue[phase.family], phase.name
    dims_xyz = np.array(g.shape, dtype=np.int64)
    tuple_dims = np.array(g.shape, dtype=np.uint64)
    fids = np.ascontiguousarray((g.astype(np.int32) + 1).transpose(2, 1, 0)[..., None])  # (z, y, x, 1)
    feature_euler = np.vstack([np.zeros((1, 3), np.float32), e]).astype(np.float32)
    feature_phase = np.concatenate([[0], volume.grain_phase]).astype(np.int32)[:, None]

    def array(group: h5py.Group, name: str, data: np.ndarray, type_name: str, tdims: np.ndarray) -> None:
        opts: dict[str, Any] = dict(track_times=False)
        if data.size >= 4096:
            opts.update(compression="gzip", compression_opts=4, shuffle=True)
        ds = group.create_dataset(name, data=data, **opts)
        ds.attrs["ComponentDimensions"] = np.array(data.shape[len(data.shape) - 1 :], dtype=np.uint64)
        ds.attrs["DataArrayVersion"] = np.int32(2)
        ds.attrs["ObjectType"] = np.bytes_(f"DataArray<{type_name}>")
        ds.attrs["TupleDimensions"] = tdims

    def matrix(group: h5py.Group, name: str, am_type: int, tdims: np.ndarray) -> h5py.Group:
        am = group.create_group(name)
        am.attrs["AttributeMatrixType"] = np.uint32(am_type)
        am.attrs["TupleDimensions"] = tdims
        return am

    def write(tmp: Path) -> None:
        with h5py.File(tmp, "w", libver=("earliest", "v110"), track_order=False) as f:
            f.attrs["DREAM3D Version"] = np.bytes_(DREAM3D_VERSION)
            f.attrs["FileVersion"] = np.bytes_("7.0")
            f.create_group("DataContainerBundles")
            pipeline = f.create_group("Pipeline")
            pipeline.attrs["Pipeline Version"] = np.int32(2)
            pipeline.create_dataset(
                "Pipeline",
                data=np.bytes_('{"PipelineBuilder": {"Name": "microfp export", "Number_Filters": 0, "Version": 6}}'),
                track_times=False,
            )
            dc = f.create_group("DataContainers").create_group("SyntheticVolumeDataContainer")
            geom = dc.create_group("_SIMPL_GEOMETRY")
            for key, value in (
                ("GeometryName", np.bytes_("ImageGeometry")),
                ("GeometryType", np.uint32(0)),
                ("GeometryTypeName", np.bytes_("ImageGeometry")),
                ("SpatialDimensionality", np.uint32(3)),
                ("UnitDimensionality", np.uint32(3)),
            ):
                geom.attrs[key] = value
            geom.create_dataset("DIMENSIONS", data=dims_xyz, track_times=False)
            geom.create_dataset("ORIGIN", data=np.zeros(3, np.float32), track_times=False)
            geom.create_dataset("SPACING", data=np.asarray(volume.spacing, np.float32), track_times=False)

            cell = matrix(dc, "CellData", 3, tuple_dims)
            array(cell, "FeatureIds", fids, "int32_t", tuple_dims)
            array(cell, "Phases", np.ascontiguousarray(feature_phase[fids[..., 0]]), "int32_t", tuple_dims)
            if cell_euler:
                array(cell, "EulerAngles", np.ascontiguousarray(feature_euler[fids[..., 0]]), "float", tuple_dims)
            ftd = np.array([feature_euler.shape[0]], dtype=np.uint64)
            feature = matrix(dc, "CellFeatureData", 7, ftd)
            array(feature, "AvgEulerAngles", feature_euler, "float", ftd)
            array(feature, "Phases", feature_phase, "int32_t", ftd)
            etd = np.array([n_phases + 1], dtype=np.uint64)
            ensemble = matrix(dc, "CellEnsembleData", 11, etd)
            array(ensemble, "CrystalStructures", structures, "uint32_t", etd)
            array(ensemble, "PhaseTypes", np.vstack([[[999]], np.zeros((n_phases, 1), np.uint32)]).astype(np.uint32), "uint32_t", etd)
            ensemble.create_dataset("PhaseName", data=np.array([n.encode() for n in names], dtype=object),
                                    dtype=h5py.string_dtype("utf-8"), track_times=False)

    _atomic_write({path: write}, str(path))
    return path


def _read_dream3d_arrays(f: h5py.File, source: str, container: str | None) -> dict[str, Any]:
    """The arrays of one DREAM3D image volume: ``fids`` (z, y, x) feature ids, ``euler`` (F+1, 3) per
    feature or (z, y, x, 3) per cell, ``per_cell``, ``structures`` (P+1,) CrystalStructures or None,
    ``phase_names`` (P+1 names) or None, ``feature_phases`` (F+1,) or None, ``cell_phases`` (z, y, x)
    or None, ``spacing`` (3,) SPACING (x, y, z) or None."""
    root: h5py.Group = f
    if container is not None:
        if container not in f or not isinstance(f[container], h5py.Group):
            raise FormatError(f"{source}: no group {container!r} in the file")
        root = f[container]
    found: list[h5py.Dataset] = []

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset) and name.rsplit("/", 1)[-1] in FEATURE_ID_NAMES:
            found.append(obj)

    root.visititems(visit)
    if not found:
        raise FormatError(
            f"{source}: no FeatureIds array found (expected e.g. DataContainers/<name>/CellData/FeatureIds)"
        )
    if len(found) > 1:
        names = ", ".join(ds.name for ds in found[:4])
        raise FormatError(f"{source}: several FeatureIds arrays ({names}); choose one with container=")
    ids_ds = found[0]
    cell_am, dc = ids_ds.parent, ids_ds.parent.parent
    shape = ids_ds.shape
    if not (len(shape) == 3 or (len(shape) == 4 and shape[3] == 1)):
        raise FormatError(f"{source}: {ids_ds.name} has shape {shape}, expected (z, y, x, 1)")
    if ids_ds.dtype.kind not in "iu":
        raise FormatError(f"{source}: {ids_ds.name} has dtype {ids_ds.dtype}, expected integers")
    zyx = tuple(int(s) for s in shape[:3])

    dims, spacing = _dream3d_geometry(dc)
    if dims is not None and tuple(int(d) for d in dims[::-1]) != zyx:
        raise FormatError(
            f"{source}: {ids_ds.name} has {zyx[2]} x {zyx[1]} x {zyx[0]} (x, y, z) cells but the geometry "
            f"DIMENSIONS are {' x '.join(str(int(d)) for d in dims)}"
        )
    if min(zyx) < 1:
        raise FormatError(f"{source}: {ids_ds.name} is empty ({zyx[2]} x {zyx[1]} x {zyx[0]} cells)")

    feature_ds = None
    for group in _subgroups(dc, exclude=cell_am.name):
        for name in FEATURE_EULER_NAMES:
            if name in group and isinstance(group[name], h5py.Dataset):
                feature_ds = group[name]
                break
        if feature_ds is not None:
            break
    cell_ds = next(
        (cell_am[n] for n in CELL_EULER_NAMES if n in cell_am and isinstance(cell_am[n], h5py.Dataset)), None
    )
    if feature_ds is None and cell_ds is None:
        raise FormatError(
            f"{source}: no Euler angles found next to {ids_ds.name} (expected per-feature EulerAngles or "
            "AvgEulerAngles (F+1, 3), or per-cell EulerAngles (z, y, x, 3))"
        )
    fids = np.asarray(ids_ds[()]).reshape(zyx)
    if fids.size and fids.min() < 0:
        raise FormatError(f"{source}: {ids_ds.name} has negative feature ids (min {int(fids.min())})")
    if feature_ds is not None:
        if feature_ds.ndim != 2 or feature_ds.shape[1] != 3:
            raise FormatError(f"{source}: {feature_ds.name} has shape {feature_ds.shape}, expected (features + 1, 3)")
        euler, per_cell = np.asarray(feature_ds[()], dtype=np.float64), False
    else:
        assert cell_ds is not None
        if cell_ds.shape not in (zyx + (3,),):
            raise FormatError(f"{source}: {cell_ds.name} has shape {cell_ds.shape}, expected {zyx + (3,)}")
        euler, per_cell = np.asarray(cell_ds[()], dtype=np.float64), True

    structures = names = feature_phases = None
    for group in _subgroups(dc, exclude=cell_am.name):
        if "CrystalStructures" in group and isinstance(group["CrystalStructures"], h5py.Dataset):
            structures = np.asarray(group["CrystalStructures"][()]).reshape(-1).astype(np.int64)
            names = _phase_names(group, structures.size)
            break
    for group in _subgroups(dc, exclude=cell_am.name):
        ds = group.get("Phases")
        if isinstance(ds, h5py.Dataset) and ds.dtype.kind in "iu" and ds.ndim <= 2 and ds.size == ds.shape[0]:
            if feature_ds is None or ds.shape[0] == feature_ds.shape[0]:
                feature_phases = np.asarray(ds[()]).reshape(-1).astype(np.int64)
                break
    ds = cell_am.get("Phases")
    cell_phases = None
    if isinstance(ds, h5py.Dataset) and ds.size == math.prod(zyx) and ds.dtype.kind in "iu":
        cell_phases = np.asarray(ds[()]).reshape(zyx).astype(np.int64)
    return {"fids": fids, "euler": euler, "per_cell": per_cell, "structures": structures, "phase_names": names,
            "feature_phases": feature_phases, "cell_phases": cell_phases, "spacing": spacing}


def _phase_names(group: h5py.Group, count: int) -> list[str] | None:
    """Phase names (PhaseName/PhaseNames/MaterialName string arrays), one per CrystalStructures row."""
    for key in ("PhaseName", "PhaseNames", "MaterialName"):
        ds = group.get(key)
        if isinstance(ds, h5py.Dataset) and ds.size == count:
            try:
                values = np.asarray(ds[()]).reshape(-1)
                return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in values]
            except (TypeError, ValueError, OSError):
                return None
    return None


def _dream3d_geometry(dc: h5py.Group) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(DIMENSIONS, SPACING) of an image geometry: SIMPL datasets or DREAM3D-NX attributes."""
    dims = spacing = None
    geom = dc.get("_SIMPL_GEOMETRY")
    if isinstance(geom, h5py.Group):
        if isinstance(geom.get("DIMENSIONS"), h5py.Dataset):
            dims = np.asarray(geom["DIMENSIONS"][()]).reshape(-1)
        if isinstance(geom.get("SPACING"), h5py.Dataset):
            spacing = np.asarray(geom["SPACING"][()], dtype=np.float64).reshape(-1)
    if dims is None and "_DIMENSIONS" in dc.attrs:
        dims = np.asarray(dc.attrs["_DIMENSIONS"]).reshape(-1)
    if spacing is None and "_SPACING" in dc.attrs:
        spacing = np.asarray(dc.attrs["_SPACING"], dtype=np.float64).reshape(-1)
    if dims is not None and dims.size != 3:
        raise FormatError(f"{dc.file.filename}: geometry DIMENSIONS {dims.tolist()} are not 3D")
    return dims, spacing


def _subgroups(group: h5py.Group, exclude: str) -> list[h5py.Group]:
    """Child groups of ``group`` except ``exclude``, feature matrices (AttributeMatrixType 7) first."""
    children = [group[k] for k in sorted(group.keys()) if isinstance(group.get(k), h5py.Group)]
    children = [c for c in children if c.name != exclude and not c.name.endswith("_SIMPL_GEOMETRY")]
    return sorted(children, key=lambda c: 0 if int(np.asarray(c.attrs.get("AttributeMatrixType", 0)).reshape(-1)[0]) == 7 else 1)


def _dream3d_crystal(structures: np.ndarray | None, source: str) -> str:
    if structures is None:
        raise FormatError(f"{source}: no CrystalStructures in the file; pass crystal='cubic' or 'hexagonal'")
    values = sorted({int(v) for v in structures} - {999})
    if not values:
        raise FormatError(f"{source}: CrystalStructures names no phase; pass crystal='cubic' or 'hexagonal'")
    unsupported = [v for v in values if v not in LAUE_CLASSES]
    if unsupported:
        names = ", ".join(f"{v} ({LAUE_NAMES.get(v, 'unknown')})" for v in unsupported)
        raise FormatError(
            f"{source}: unsupported crystal structure {names}; only 1 (cubic m-3m) and 0 (hexagonal 6/mmm), "
            "or pass crystal= to override"
        )
    families = sorted({LAUE_CLASSES[v] for v in values})
    if len(families) > 1:
        raise FormatError(f"{source}: phases of several crystal families ({', '.join(families)}); pass crystal=")
    return families[0]


def _check_constant(cells: np.ndarray, ref: np.ndarray, inverse: np.ndarray, uniq: np.ndarray, source: str) -> None:
    """Per-cell orientations must be one orientation per feature (up to CELL_EULER_TOLERANCE)."""
    expected = ref[inverse]
    if np.array_equal(cells, expected):
        return
    import damask

    differs = np.any(cells != expected, axis=1)
    q = damask.Rotation.from_Euler_angles(cells[differs]).quaternion
    q_ref = damask.Rotation.from_Euler_angles(expected[differs]).quaternion
    dot = np.clip(np.abs(np.sum(q * q_ref, axis=-1)), 0.0, 1.0)
    angle = 2.0 * np.arccos(dot)
    worst = int(np.argmax(angle))
    if angle[worst] > CELL_EULER_TOLERANCE:
        fid = int(uniq[inverse[np.flatnonzero(differs)[worst]]])
        raise FormatError(
            f"{source}: per-cell EulerAngles of feature {fid} differ by up to {math.degrees(angle[worst]):.3g} deg; "
            "expected one orientation per feature (add per-feature AvgEulerAngles)"
        )


# --------------------------------------------------------------------------------------------------
# DAMASK


def read_damask(vti_path: str | Path, material_path: str | Path | None = None, crystal: str | None = None) -> VESet:
    """Read a DAMASK grid (``.vti``) and its ``material.yaml`` (default: next to the grid).

    ``crystal`` (cubic|hexagonal) overrides the family given by the phases' ``lattice``. The grid must
    be cubic (n x n x n cells of cubes); grids of any shape: :func:`read_damask_volume`.
    """
    source = str(vti_path)
    if crystal is not None:
        crystal = _check_crystal(crystal, source)
    volume = read_damask_volume(vti_path, material_path)
    _check_cubic(volume.grain_ids.shape, source)
    assert volume.spacing is not None
    resolution = _isotropic(volume.spacing, source, "grid size / cells")
    if crystal is None:
        families = {volume.family(int(k)) for k in np.unique(volume.grain_phase)}
        if len(families) > 1:
            raise FormatError(f"{volume.attrs['material']}: materials of several crystal families ({', '.join(sorted(families))}); pass crystal=")
        crystal = families.pop()
    return _one_ve(volume.grain_ids, volume.euler, crystal, resolution, source, "damask")


def read_damask_volume(vti_path: str | Path, material_path: str | Path | None = None) -> Volume:
    """Read a DAMASK grid (``.vti`` + ``material.yaml``) of any shape and cell size; periodic.

    Phases are the entries of the ``phase`` mapping of ``material.yaml``, numbered 1, 2, ... in file
    order; each material used by the grid is one grain of its single constituent's phase.
    """
    vti_path = Path(vti_path)
    source = str(vti_path)
    if not vti_path.is_file():
        raise FormatError(f"{vti_path}: no such file")
    material_path = Path(material_path) if material_path is not None else vti_path.with_name("material.yaml")
    if not material_path.is_file():
        raise FormatError(f"{material_path}: no such file (the material configuration of {vti_path.name}; pass material_path)")
    material, size = _load_vti(vti_path)
    materials, phases = _load_material_yaml(material_path)

    cells = material.shape
    spacing = np.asarray(size, dtype=np.float64) / np.asarray(cells)
    if material.dtype.kind == "f":
        if not np.all(np.isfinite(material)) or not np.array_equal(material, np.round(material)):
            raise FormatError(f"{source}: material ids are not integers")
    elif material.dtype.kind not in "iu":
        raise FormatError(f"{source}: material ids have dtype {material.dtype}, expected integers")
    material = material.astype(np.int64)
    if material.min() < 0:
        raise FormatError(f"{source}: negative material id {int(material.min())}")
    uniq, inverse = np.unique(material.reshape(-1), return_inverse=True)
    _check_grain_count(len(uniq), source)
    if uniq[-1] >= len(materials):
        missing = uniq[uniq >= len(materials)]
        raise FormatError(
            f"{source}: material ids {_few(missing)} have no entry in {material_path.name} "
            f"({len(materials)} materials, ids 0..{len(materials) - 1})"
        )

    numbers = {name: k for k, name in enumerate(phases, start=1)}
    table = {}
    for name, k in numbers.items():
        spec = phases[name]
        lattice = spec.get("lattice") if isinstance(spec, dict) else None
        label = "no lattice" if lattice is None else f"unsupported lattice {lattice!r} (cF, cI, cP, hP)"
        table[k] = Phase(str(name), LATTICE_FAMILIES.get(lattice), lattice, label)
    quats = np.empty((len(uniq), 4))
    grain_phase = np.empty(len(uniq), dtype=np.int64)
    for k, m in enumerate(uniq):
        q, phase = _constituent(materials[int(m)], int(m), material_path)
        quats[k] = q
        if phase not in numbers:  # refused only when its family is needed (crystal= may override it)
            numbers[phase] = len(numbers) + 1
            table[numbers[phase]] = Phase(str(phase), None, None, "no entry under 'phase'")
        grain_phase[k] = numbers[phase]
    import damask

    euler = damask.Rotation.from_quaternion(quats, accept_homomorph=True).as_Euler_angles()
    grain_ids = inverse.reshape(cells)
    return Volume(grain_ids, np.asarray(euler, dtype=np.float64).reshape(-1, 3), grain_phase, table, spacing, True,
                  source, "damask", {"material": str(material_path)})


def write_damask(
    out_dir: str | Path,
    ves: VESet,
    index: int = 0,
    phase_name: str | None = None,
    *,
    name: str | None = None,
    overwrite: bool = False,
) -> tuple[Path, Path]:
    """Export VE ``index`` of ``ves`` as ``<out_dir>/<name>.vti`` and ``<out_dir>/material.yaml``.

    Material ``g`` is grain ``g`` (one constituent of phase ``phase_name``, default the crystal
    family, lattice cF or hP, orientation ``damask.Rotation.from_Euler_angles``), homogenization
    ``SX``; the grid size is n * resolution. ``name`` defaults to ``ve<ve_index>``. An existing,
    different ``material.yaml`` (another VE's) is refused unless ``overwrite``. Returns the two paths.
    """
    import damask

    out_dir = Path(out_dir)
    source = str(out_dir)
    g, e = _export_ve(ves, index, source)
    name = name if name is not None else f"ve{int(ves.ve_index[index])}"
    phase_name = phase_name if phase_name is not None else ves.crystal
    if not name or "/" in name or os.sep in name:
        raise FormatError(f"{out_dir}: bad grid name {name!r}")
    vti_path = out_dir / f"{name}.vti"
    material_path = out_dir / "material.yaml"

    config = damask.ConfigMaterial().material_add(
        O=damask.Rotation.from_Euler_angles(e.astype(np.float64)), phase=phase_name, homogenization="SX"
    )
    config["homogenization"]["SX"] = {"N_constituents": 1, "mechanical": {"type": "pass"}}
    config["phase"][phase_name] = {"lattice": EXPORT_LATTICE[ves.crystal]}
    n = g.shape[0]
    grid = damask.GeomGrid(
        material=g.astype(np.int32),
        size=np.full(3, n * float(ves.resolution)),
        comments=[f"microfp export: VE {int(ves.ve_index[index])}, {ves.crystal}, resolution {ves.resolution:g}"],
    )
    if material_path.exists() and not overwrite:
        try:
            same = material_path.read_text() == _yaml_text(config)
        except (OSError, UnicodeDecodeError):
            same = False
        if not same:
            raise FormatError(
                f"{material_path}: exists and belongs to another VE; export into another directory or pass overwrite=True"
            )

    def write_vti(tmp: Path) -> None:
        with _quiet_vtk():
            grid.save(tmp)
        _load_vti(tmp)  # VTK writers report failure only on stderr: read back what was written

    def write_yaml(tmp: Path) -> None:
        config.save(tmp)

    _atomic_write({vti_path: write_vti, material_path: write_yaml}, source)
    return vti_path, material_path


def _load_vti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(material (x, y, z), size (3,)) of a VTK image data file; FormatError if it is not one."""
    try:
        import damask
        from vtkmodules.vtkCommonCore import vtkCommand
        from vtkmodules.vtkIOXML import vtkXMLImageDataReader

        errors: list[str] = []
        reader = vtkXMLImageDataReader()
        reader.AddObserver(vtkCommand.ErrorEvent, lambda obj, event: errors.append(event))
        reader.SetFileName(str(path))
        with _quiet_vtk():
            reader.Update()
        data = reader.GetOutput()
        dims = tuple(int(d) for d in data.GetDimensions()) if data is not None else (0, 0, 0)
        if errors or reader.GetErrorCode() or min(dims) < 1:
            raise FormatError(f"{path}: not a readable VTK image data (.vti) file (truncated or malformed)")
        if len(dims) != 3 or min(dims) < 2:
            raise FormatError(f"{path}: grid has {' x '.join(str(d - 1) for d in dims)} cells, expected a 3D grid")
        cells = tuple(d - 1 for d in dims)
        vtk = damask.VTK(data)
        if "material" not in vtk.labels.get("Cell Data", []):
            raise FormatError(f"{path}: no cell array 'material' in the grid (not a DAMASK grid)")
        material = np.asarray(vtk.get("material"))
        if material.ndim != 1 or material.size != math.prod(cells):
            raise FormatError(f"{path}: 'material' has {material.size} values for {cells} cells")
        bounds = np.array(data.GetBounds(), dtype=np.float64).reshape(3, 2)
        size = bounds[:, 1] - bounds[:, 0]
        return material.reshape(cells, order="F"), size
    except MicrofpError:
        raise
    except (OSError, KeyError, ValueError, TypeError, RuntimeError, AttributeError) as err:
        raise FormatError(f"{path}: not a readable DAMASK grid ({_reason(err)})") from None


def _load_material_yaml(path: Path) -> tuple[list[Any], dict[str, Any]]:
    """(material list, phase dict) of a DAMASK material configuration."""
    import damask
    import yaml

    try:
        config = damask.ConfigMaterial.load(path)
    except yaml.YAMLError as err:
        raise FormatError(f"{path}: malformed YAML ({_reason(err)})") from None
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError, AttributeError) as err:
        raise FormatError(f"{path}: not a readable material configuration ({_reason(err)})") from None
    if not isinstance(config, dict) or not isinstance(config.get("material"), list) or not config["material"]:
        raise FormatError(f"{path}: no 'material' list (not a DAMASK material configuration)")
    phases = config.get("phase")
    return config["material"], phases if isinstance(phases, dict) else {}


def _constituent(entry: Any, m: int, path: Path) -> tuple[np.ndarray, Any]:
    """(unit quaternion, phase name) of the single constituent of material ``m``."""
    constituents = entry.get("constituents") if isinstance(entry, dict) else None
    if not isinstance(constituents, list) or not constituents:
        raise FormatError(f"{path}: material {m} has no constituents")
    if len(constituents) != 1:
        raise FormatError(f"{path}: material {m} has {len(constituents)} constituents; only single-constituent materials (one grain each) are supported")
    c = constituents[0]
    if not isinstance(c, dict) or "O" not in c:
        raise FormatError(f"{path}: material {m} has no orientation O")
    try:
        q = np.asarray(c["O"], dtype=np.float64)
    except (TypeError, ValueError):
        raise FormatError(f"{path}: orientation O of material {m} is not a list of 4 numbers") from None
    if q.shape != (4,):
        raise FormatError(f"{path}: orientation O of material {m} has shape {q.shape}, expected a quaternion of 4 numbers")
    if not np.all(np.isfinite(q)):
        raise FormatError(f"{path}: orientation O of material {m} has NaN or infinite values")
    norm = float(np.linalg.norm(q))
    if abs(norm - 1.0) > 1e-3:
        raise FormatError(f"{path}: orientation O of material {m} is not a unit quaternion (norm {norm:.4g})")
    return q / norm, c.get("phase")


def _yaml_text(config: Any) -> str:
    import io

    buffer = io.StringIO()
    config.save(buffer)
    return buffer.getvalue()


class _quiet_vtk:
    """Silence VTK's error printing (we report one line ourselves)."""

    def __enter__(self) -> None:
        from vtkmodules.vtkCommonCore import vtkObject

        self._previous = vtkObject.GetGlobalWarningDisplay()
        vtkObject.GlobalWarningDisplayOff()

    def __exit__(self, *exc: object) -> None:
        from vtkmodules.vtkCommonCore import vtkObject

        vtkObject.SetGlobalWarningDisplay(self._previous)


# --------------------------------------------------------------------------------------------------
# shared helpers


def _one_ve(grain_ids: np.ndarray, euler: np.ndarray, crystal: str, resolution: float, source: str, fmt: str) -> VESet:
    """One-VE VESet from (x, y, z) grain ids 0..G-1 and G Euler angles, reduced to the fundamental zone."""
    return VESet.from_ves([(grain_ids, reduced_euler(euler, crystal))], crystal=crystal, resolution=resolution,
                          attrs={"source": source, "source_format": fmt}, source=source)


def reduced_euler(euler: np.ndarray, crystal: str) -> np.ndarray:
    """Bunge angles (G, 3) in radians -> (G, 3) float32, reduced to the family's fundamental zone (damask)."""
    import damask

    rotations = damask.Rotation.from_Euler_angles(np.asarray(euler, dtype=np.float64).reshape(-1, 3))
    reduced = damask.Orientation(rotation=rotations, family=crystal).reduced.as_Euler_angles()
    return np.clip(np.asarray(reduced).reshape(-1, 3), 0.0, EULER_SCALE.astype(np.float64)).astype(np.float32)


def _export_ve(ves: VESet, index: int, source: str) -> tuple[np.ndarray, np.ndarray]:
    """(grain ids (n,n,n), Euler (G,3)) of VE ``index``, after validating the set."""
    validate(ves, source)
    if not isinstance(index, (int, np.integer)) or not 0 <= index < len(ves):
        raise FormatError(f"{source}: VE index {index} out of range 0..{len(ves) - 1}")
    return ves.grain_ids[index], np.asarray(ves.grain_euler(index), dtype=np.float32)


def _atomic_write(writers: dict[Path, Callable[[Path], None]], source: str) -> None:
    """Write each path through its temp sibling, then rename all; on failure leave nothing new
    (:func:`microfp.atomic.atomic_outputs`)."""
    try:
        with atomic_outputs(*writers) as temps:
            for (path, write), tmp in zip(writers.items(), temps):
                write(tmp)
                if not tmp.is_file():
                    raise FormatError(f"{path}: writing failed (no output produced)")
    except MicrofpError:
        raise
    except (OSError, ValueError, TypeError, RuntimeError) as err:
        raise FormatError(f"{source}: cannot write ({_reason(err)})") from None


def _check_crystal(crystal: str, source: str) -> str:
    if crystal not in CRYSTAL_FAMILIES:
        raise FormatError(f"{source}: crystal family must be cubic or hexagonal, got {crystal!r}")
    return crystal


def _check_cubic(shape: tuple[int, ...], source: str) -> None:
    if len(set(shape)) != 1:
        raise FormatError(
            f"{source}: VE must be cubic (n x n x n voxels), got {shape[0]} x {shape[1]} x {shape[2]} (x, y, z); "
            "volumes of any shape: `microfp fingerprint-volume`"
        )


def _check_resolution(resolution: float, source: str) -> float:
    try:
        value = float(resolution)
    except (TypeError, ValueError):
        value = float("nan")
    if not (math.isfinite(value) and value > 0):
        raise FormatError(f"{source}: resolution must be a positive number, got {resolution!r}")
    return value


def _isotropic(spacing: np.ndarray, source: str, what: str) -> float:
    spacing = np.asarray(spacing, dtype=np.float64).reshape(-1)
    if spacing.size != 3 or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise FormatError(f"{source}: {what} {spacing.tolist()} is not three positive numbers")
    if not np.allclose(spacing, spacing[0], rtol=1e-5, atol=0):
        raise FormatError(f"{source}: voxels must be cubes, but {what} is {spacing.tolist()}; pass resolution= to override")
    return float(spacing[0])


def _check_grain_count(count: int, source: str) -> None:
    if count > MAX_GRAINS:
        raise FormatError(f"{source}: {count} grains, more than the {MAX_GRAINS} a VE may have")


def _check_angles(euler: np.ndarray, source: str, what: str) -> None:
    if not np.all(np.isfinite(euler)):
        raise FormatError(f"{source}: {what} contain NaN or infinite values")
    upper = EULER_SCALE.astype(np.float64) + ANGLE_TOLERANCE
    if euler.size and (np.any(euler < -ANGLE_TOLERANCE) or np.any(euler > upper)):
        hi = euler.max(axis=0)
        raise FormatError(
            f"{source}: {what} outside [0, 2pi] x [0, pi] x [0, 2pi] radians (max {hi[0]:.4g}, {hi[1]:.4g}, "
            f"{hi[2]:.4g}; degrees given as radians?)"
        )


def _few(values: np.ndarray, k: int = 5) -> str:
    text = ", ".join(str(int(v)) for v in values[:k])
    return text + (", ..." if len(values) > k else "")


def _reason(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return " ".join(text.split())[:200]


# Keep ShardError importable from here: readers may raise it (shards.validate) as well as FormatError.
__all__ += ["ShardError"]
