"""HDF5 shards: how sets of VEs are stored on disk.

A VE is a periodic grain-ID map plus one orientation per grain (as Dream3D and DAMASK hold them),
about 100x smaller than the dense (3, n, n, n) float tensor the VAE sees. One shard holds up to
``shard_size`` VEs of one set:

================  ===================  ==========================================================
dataset           shape, dtype         meaning
================  ===================  ==========================================================
``grain_ids``     (N, n, n, n) uint16  grain index of each voxel, axes (x, y, z), 0..G_i-1
``euler``         (N, G_max, 3) f32    Bunge Euler angles (phi1, Phi, phi2) in radians, in the
                                       fundamental zone; rows >= n_grains[i] are NaN
``n_grains``      (N,) int32           number of grains G_i of each VE
``ve_index``      (N,) int64           index of the VE within its set
``esd_target``    (N,) float32         ESD mean (length units) the VE was drawn from
================  ===================  ==========================================================

File attributes: ``format_version``, ``crystal`` (cubic|hexagonal), ``set`` (name), ``seed``,
``resolution`` (length units per voxel), ``params`` (JSON of the generator parameters) and
``texture``. Files are written to a temporary name and renamed, so a shard that exists is complete.
Writing is deterministic: the same arrays and attributes give byte-identical files.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from microfp.atomic import atomic_output
from microfp.errors import MicrofpError

FORMAT_VERSION = 1
CRYSTAL_FAMILIES = ("cubic", "hexagonal")
EULER_MAX: tuple[float, float, float] = (2 * math.pi, math.pi, 2 * math.pi)
"""Upper bounds of Bunge Euler angles (phi1, Phi, phi2), radians: the VAE's input is the angles
divided by them, in [0, 1] (paper section 2.1)."""
EULER_SCALE = np.array(EULER_MAX, dtype=np.float32)
""":data:`EULER_MAX` in float32, the precision of the stored angles. (``microfp.crystallography`` keeps
a copy of EULER_MAX: its source is hashed into every shard, so an edit there would change them all.)"""


class ShardError(MicrofpError):
    """A shard or VE file that cannot be used; the message is one line."""


@dataclass
class VESet:
    """A batch of VEs of one crystal family, as stored in a shard; checked (:meth:`validate`) when
    made, so a VESet that exists is one that :meth:`write` accepts (until its arrays are changed).

    ``grain_ids`` (N, n, n, n) uint16; ``euler`` (N, G_max, 3) float32 radians (NaN padded);
    ``n_grains`` (N,) int32; ``ve_index`` (N,) int64; ``esd_target`` (N,) float32. ``source`` names
    where the VEs come from in error messages (a path, an imported file).
    """

    grain_ids: np.ndarray
    euler: np.ndarray
    n_grains: np.ndarray
    ve_index: np.ndarray
    esd_target: np.ndarray
    crystal: str
    resolution: float
    attrs: dict[str, Any] = field(default_factory=dict)
    source: str = field(default="VE set", repr=False, compare=False)

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def from_ves(
        cls,
        ves: list[tuple[np.ndarray, np.ndarray]],
        crystal: str,
        resolution: float,
        ve_index: np.ndarray | list[int] | None = None,
        esd_target: np.ndarray | None = None,
        attrs: dict[str, Any] | None = None,
        source: str = "VE set",
    ) -> "VESet":
        """A VESet of (grain_ids (n, n, n), euler (G, 3)) pairs (:func:`pack`); ``ve_index`` defaults to
        0..N-1, ``esd_target`` to NaN."""
        grain_ids, euler, n_grains = pack(ves)
        n = len(ves)
        return cls(
            grain_ids=grain_ids,
            euler=euler,
            n_grains=n_grains,
            ve_index=np.arange(n, dtype=np.int64) if ve_index is None else np.asarray(ve_index, dtype=np.int64),
            esd_target=np.full(n, np.nan, np.float32) if esd_target is None else np.asarray(esd_target, dtype=np.float32),
            crystal=crystal,
            resolution=float(resolution),
            attrs=dict(attrs or {}),
            source=source,
        )

    @classmethod
    def read(cls, path: str | Path) -> "VESet":
        """The VEs of a shard written by :meth:`write`; :class:`ShardError` (one line) if it is bad."""
        return read_shard(path)

    def write(self, path: str | Path) -> None:
        """Validate and write to ``path`` atomically (:func:`write_shard`)."""
        write_shard(path, self)

    def validate(self, source: str | None = None) -> None:
        """Check shapes, dtypes, id and angle ranges; :class:`ShardError` (one line, prefixed with
        ``source``, default :attr:`source`) if they are wrong."""
        validate(self, self.source if source is None else source)

    def __len__(self) -> int:
        return int(self.grain_ids.shape[0])

    @property
    def ve_size(self) -> int:
        return int(self.grain_ids.shape[1])

    def grain_euler(self, i: int) -> np.ndarray:
        """(G_i, 3) Bunge Euler angles of the grains of VE ``i``, radians."""
        return self.euler[i, : self.n_grains[i]]

    def select(self, i: int) -> "VESet":
        """A one-VE VESet of VE ``i`` (its Euler rows trimmed to its own grains)."""
        sl = slice(i, i + 1)
        return VESet(self.grain_ids[sl], self.euler[sl, : self.n_grains[i]], self.n_grains[sl],
                     self.ve_index[sl], self.esd_target[sl], self.crystal, self.resolution, self.attrs, self.source)

    def orientation_field(self, i: int) -> np.ndarray:
        """Normalised (3, n, n, n) float32 Euler field of VE ``i`` (the VAE's input)."""
        return euler_field(self.grain_ids[i], self.grain_euler(i))


def pack(ves: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stack (grain_ids (n,n,n), euler (G,3)) pairs into the shard arrays, NaN-padding ``euler``.

    Returns ``grain_ids`` (N,n,n,n) uint16, ``euler`` (N,G_max,3) float32, ``n_grains`` (N,) int32.
    """
    if not ves:
        raise ShardError("no VEs to pack")
    g_max = max(e.shape[0] for _, e in ves)
    euler = np.full((len(ves), g_max, 3), np.nan, dtype=np.float32)
    for i, (_, e) in enumerate(ves):
        euler[i, : e.shape[0]] = e
    grain_ids = np.stack([g.astype(np.uint16, copy=False) for g, _ in ves])
    n_grains = np.array([e.shape[0] for _, e in ves], dtype=np.int32)
    return grain_ids, euler, n_grains


def euler_field(grain_ids: np.ndarray, euler: np.ndarray) -> np.ndarray:
    """Expand one VE to the normalised orientation field the VAE sees.

    ``grain_ids`` (n, n, n) integer grain index per voxel, ``euler`` (G, 3) Bunge radians.
    Returns (3, n, n, n) float32 in [0, 1]: (phi1 / 2pi, Phi / pi, phi2 / 2pi).
    """
    normalised = (euler / EULER_SCALE).astype(np.float32)
    return np.ascontiguousarray(np.moveaxis(normalised[grain_ids], -1, 0))


def validate(ves: VESet, source: str) -> None:
    """Check shapes, dtypes, id ranges and angle ranges; raise :class:`ShardError` (one line)."""
    g, e, n = ves.grain_ids, ves.euler, ves.n_grains
    if g.ndim != 4 or len(set(g.shape[1:])) != 1:
        raise ShardError(f"{source}: grain_ids must have shape (N, n, n, n), got {g.shape}")
    if g.dtype != np.uint16:
        raise ShardError(f"{source}: grain_ids must be uint16, got {g.dtype}")
    if e.ndim != 3 or e.shape[0] != g.shape[0] or e.shape[2] != 3:
        raise ShardError(f"{source}: euler must have shape ({g.shape[0]}, G, 3), got {e.shape}")
    for name, arr in (("n_grains", n), ("ve_index", ves.ve_index), ("esd_target", ves.esd_target)):
        if arr.shape != (g.shape[0],):
            raise ShardError(f"{source}: {name} must have shape ({g.shape[0]},), got {arr.shape}")
    if ves.crystal not in CRYSTAL_FAMILIES:
        raise ShardError(f"{source}: crystal family must be cubic or hexagonal, got {ves.crystal!r}")
    if not (np.isfinite(ves.resolution) and ves.resolution > 0):
        raise ShardError(f"{source}: resolution must be a positive number, got {ves.resolution}")
    if np.any(n < 1) or np.any(n > e.shape[1]):
        raise ShardError(f"{source}: n_grains out of range 1..{e.shape[1]}")
    for i in range(g.shape[0]):
        if int(g[i].max()) >= n[i]:
            raise ShardError(f"{source}: VE {i} has grain id {int(g[i].max())} >= n_grains {n[i]}")
        angles = e[i, : n[i]]
        if not np.all(np.isfinite(angles)):
            raise ShardError(f"{source}: VE {i} has NaN or infinite Euler angles")
        if np.any(angles < -1e-6) or np.any(angles > EULER_SCALE + 1e-5):
            raise ShardError(
                f"{source}: VE {i} has Euler angles outside [0, 2pi] x [0, pi] x [0, 2pi] radians "
                "(degrees given as radians?)"
            )


def write_shard(path: str | Path, ves: VESet) -> None:
    """Validate and write ``ves`` to ``path`` atomically (temp file, then rename)."""
    path = Path(path)
    validate(ves, str(path))
    with atomic_output(path) as tmp:
        # track_order/track_times off and fixed chunking: byte-identical output for equal input.
        with h5py.File(tmp, "w", libver=("earliest", "v110"), track_order=False) as f:
            n = ves.ve_size
            chunks = (1, n, n, n)
            opts = dict(compression="gzip", compression_opts=4, shuffle=True, track_times=False)
            f.create_dataset("grain_ids", data=ves.grain_ids, chunks=chunks, **opts)
            f.create_dataset("euler", data=ves.euler.astype(np.float32), **opts)
            f.create_dataset("n_grains", data=ves.n_grains.astype(np.int32), track_times=False)
            f.create_dataset("ve_index", data=ves.ve_index.astype(np.int64), track_times=False)
            f.create_dataset("esd_target", data=ves.esd_target.astype(np.float32), track_times=False)
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["crystal"] = ves.crystal
            f.attrs["resolution"] = float(ves.resolution)
            for key, value in sorted(ves.attrs.items()):
                f.attrs[key] = value if isinstance(value, (int, float, str)) else json.dumps(value, sort_keys=True)


def read_attrs(path: str | Path) -> dict[str, Any]:
    """File attributes of a shard, without reading the arrays; :class:`ShardError` if unreadable."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
    except (OSError, KeyError) as err:
        raise ShardError(f"{path}: not a readable HDF5 shard ({_reason(err)})") from None


def _check_header(f: h5py.File, path: Path) -> None:
    missing = [k for k in ("grain_ids", "euler", "n_grains") if k not in f]
    if missing:
        raise ShardError(f"{path}: not a microfp shard (missing {', '.join(missing)})")
    version = int(f.attrs.get("format_version", -1))
    if version != FORMAT_VERSION:
        raise ShardError(f"{path}: shard format version {version}, expected {FORMAT_VERSION}")


def shard_shape(path: str | Path) -> tuple[int, ...]:
    """Shape (N, n, n, n) of a shard's ``grain_ids``, checking its header without reading voxels."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            _check_header(f, path)
            return tuple(f["grain_ids"].shape)
    except ShardError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as err:
        raise ShardError(f"{path}: corrupt or truncated shard ({_reason(err)})") from None


def read_shard(path: str | Path) -> VESet:
    """Read a shard written by :func:`write_shard`; :class:`ShardError` (one line) if it is bad."""
    path = Path(path)
    if not path.is_file():
        raise ShardError(f"{path}: no such shard file")
    try:
        with h5py.File(path, "r") as f:
            _check_header(f, path)
            n = f["grain_ids"].shape[0]
            ves = VESet(
                grain_ids=f["grain_ids"][()],
                euler=f["euler"][()],
                n_grains=f["n_grains"][()],
                ve_index=f["ve_index"][()] if "ve_index" in f else np.arange(n, dtype=np.int64),
                esd_target=f["esd_target"][()] if "esd_target" in f else np.full(n, np.nan, np.float32),
                crystal=str(f.attrs.get("crystal", "")),
                resolution=float(f.attrs.get("resolution", float("nan"))),
                attrs={k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()},
                source=str(path),
            )
    except ShardError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as err:
        raise ShardError(f"{path}: corrupt or truncated shard ({_reason(err)})") from None
    return ves


def shard_paths(directory: str | Path) -> list[Path]:
    """The shard files of a set directory, in order; :class:`ShardError` if there are none."""
    directory = Path(directory)
    paths = sorted(directory.glob("shard-*.h5"))
    if not paths:
        raise ShardError(f"{directory}: no shards found (run `microfp generate` or `dvc repro` first)")
    return paths


def read_set(directory: str | Path) -> VESet:
    """All VEs of a set directory concatenated (for small sets and tests)."""
    parts = [read_shard(p) for p in shard_paths(directory)]
    g_max = max(p.euler.shape[1] for p in parts)
    euler = np.concatenate(
        [np.pad(p.euler, ((0, 0), (0, g_max - p.euler.shape[1]), (0, 0)), constant_values=np.nan) for p in parts]
    )
    first = parts[0]
    return VESet(
        grain_ids=np.concatenate([p.grain_ids for p in parts]),
        euler=euler,
        n_grains=np.concatenate([p.n_grains for p in parts]),
        ve_index=np.concatenate([p.ve_index for p in parts]),
        esd_target=np.concatenate([p.esd_target for p in parts]),
        crystal=first.crystal,
        resolution=first.resolution,
        attrs=first.attrs,
        source=str(directory),
    )


def _reason(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text[:200]
