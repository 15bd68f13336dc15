"""The ``generate`` stage: build every set of VEs as HDF5 shards, resumably and in parallel.

Each VE gets its own random stream, derived from (``seed``, set name, VE index) with numpy's
``SeedSequence``; so a VE does not depend on the number of processes, on the shard size or on
which shards were already on disk, and the same seed gives byte-identical shards.

A set directory holds ``shard-00000.h5``, ``shard-00001.h5``, ... A shard is written atomically
and records the generator parameters; a rerun keeps every shard whose parameters match and
regenerates the rest, so a killed run resumes from the last complete shard.
"""

from __future__ import annotations

import json
import multiprocessing
import zlib
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from microfp import shards, volumes
from microfp.atomic import save_figure, write_json
from microfp.config import TEXTURES_DEG, Params, SetSpec
from microfp.console import ProgressBar
from microfp.determinism import source_digest
from microfp.errors import MicrofpError
from microfp.runtime import resolve_workers

GENERATOR = "laguerre-v1"
"""Name of the generator algorithm, stored in each shard."""


def generator_digest() -> str:
    """sha256 (16 hex digits) of the source of the modules that make a VE.

    Stored in every shard, so a shard made by other generator code is never resumed from: a
    persistent output would otherwise keep VEs of an older algorithm whose parameters look equal.
    """
    from microfp import crystallography

    return source_digest(volumes, crystallography)


def ve_rng(seed: int, set_name: str, index: int) -> np.random.Generator:
    """The random stream of VE ``index`` of ``set_name`` (independent of sharding and workers)."""
    set_key = zlib.crc32(set_name.encode())
    return np.random.default_rng(np.random.SeedSequence(entropy=seed, spawn_key=(set_key, index)))


def shard_attrs(params: Params, set_name: str) -> dict[str, Any]:
    """Attributes that identify how a set's shards were made (compared on resume)."""
    spec = params.generate.sets[set_name]
    return {
        "set": set_name,
        "seed": params.seed,
        "generator": GENERATOR,
        "generator_code": generator_digest(),
        "texture": spec.texture,
        "params": {
            "ve_size": params.ve_size,
            "resolution": params.resolution,
            "shard_size": params.generate.shard_size,
            **spec.model_dump(mode="json"),
        },
    }


def _same_attrs(found: dict[str, Any], expected: dict[str, Any]) -> bool:
    for key, value in expected.items():
        stored = found.get(key)
        if isinstance(value, dict):
            try:
                stored = json.loads(stored) if isinstance(stored, str) else None
            except json.JSONDecodeError:
                return False
        if stored != value:
            return False
    return True


def shard_ranges(n: int, shard_size: int) -> list[range]:
    """VE index ranges of the shards of a set of ``n`` VEs."""
    return [range(start, min(start + shard_size, n)) for start in range(0, n, shard_size)]


def shard_path(out_dir: Path, k: int) -> Path:
    return out_dir / f"shard-{k:05d}.h5"


def pending_shards(params: Params, set_name: str, out_dir: Path) -> list[int]:
    """Indices of the shards still to write; removes stale shards and leftover temp files."""
    spec = params.generate.sets[set_name]
    ranges = shard_ranges(spec.n, params.generate.shard_size)
    expected = shard_attrs(params, set_name)
    out_dir.mkdir(parents=True, exist_ok=True)
    for leftover in out_dir.glob(".*.tmp*"):
        leftover.unlink()
    for path in out_dir.glob("shard-*.h5"):
        k = int(path.stem.split("-")[1]) if path.stem.split("-")[1].isdigit() else -1
        if not 0 <= k < len(ranges):
            path.unlink()
    todo = []
    for k, indices in enumerate(ranges):
        path = shard_path(out_dir, k)
        if path.exists():
            try:
                attrs = shards.read_attrs(path)
                with_count = _same_attrs(attrs, expected) and _shard_len(path) == len(indices)
            except shards.ShardError:
                with_count = False
            if with_count:
                continue
            path.unlink()
        todo.append(k)
    return todo


def _shard_len(path: Path) -> int:
    return shards.shard_shape(path)[0]


def _make_ve(job: tuple[SetSpec, int, float, int, str, int]) -> tuple[np.ndarray, np.ndarray, float]:
    spec, ve_size, resolution, seed, set_name, index = job
    return volumes.generate_ve(spec, ve_size, resolution, ve_rng(seed, set_name, index))


def _map(jobs: Iterable[Any], workers: int) -> Iterator[Any]:
    """Ordered map of :func:`_make_ve` over processes (or in-process for one worker)."""
    if workers <= 1:
        yield from map(_make_ve, jobs)
        return
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        yield from pool.map(_make_ve, jobs, chunksize=2)


def generate_set(params: Params, set_name: str, out_dir: Path, workers: int = 0, progress: bool = True) -> int:
    """Write all shards of ``set_name`` into ``out_dir``; returns the number of VEs generated now."""
    if set_name not in params.generate.sets:
        known = ", ".join(params.generate.sets)
        raise MicrofpError(f"unknown set {set_name!r}; params.yaml defines: {known}")
    spec = params.generate.sets[set_name]
    ranges = shard_ranges(spec.n, params.generate.shard_size)
    todo = pending_shards(params, set_name, out_dir)
    attrs = shard_attrs(params, set_name)
    jobs = [
        (spec, params.ve_size, params.resolution, params.seed, set_name, i) for k in todo for i in ranges[k]
    ]
    results = _map(jobs, min(resolve_workers(workers), max(1, len(jobs))))
    with ProgressBar(progress, f"generate {set_name}", len(jobs)) as advance:
        for k in todo:
            ves = []
            for _ in ranges[k]:
                ves.append(next(results))
                advance()
            shards.VESet.from_ves(
                [(g, e) for g, e, _ in ves],
                crystal=spec.crystal,
                resolution=params.resolution,
                ve_index=np.asarray(ranges[k], dtype=np.int64),
                esd_target=np.array([t for _, _, t in ves], dtype=np.float32),
                attrs=attrs,
            ).write(shard_path(out_dir, k))
    return len(jobs)


# --- statistics and pictures -------------------------------------------------------------------


def iter_ves(set_dir: Path, limit: int | None = None) -> Iterator[tuple[shards.VESet, int]]:
    """(shard, index) of the first ``limit`` VEs of a set directory, shard by shard."""
    seen = 0
    for path in shards.shard_paths(set_dir):
        ves = shards.read_shard(path)
        for i in range(len(ves)):
            if limit is not None and seen >= limit:
                return
            seen += 1
            yield ves, i


def set_statistics(set_dir: Path, spec: SetSpec, max_ves: int = 1000) -> dict[str, float]:
    """Measured statistics of a set (on its first ``max_ves`` VEs; the VE count is exact).

    ESDs are in length units; ``grains_per_face`` is the mean number of distinct grains on
    each of the six faces of a VE, ``grains_per_face_effective`` the area-weighted count
    (:func:`microfp.volumes.effective_grains_per_face`); ``elongation_x_to_yz`` is the ratio of
    mean intercept lengths along x and along y, z (1 for equiaxed grains, ~2 for 2:1:1). Textured sets also get the mean orientation (Bunge, degrees)
    and the misorientation of the grains to the ideal component (degrees).
    """
    n_ves = sum(_shard_len(p) for p in shards.shard_paths(set_dir))
    esds, faces, effective, intercepts, grains, eulers = [], [], [], [], [], []
    crystal = "cubic"
    for ves, i in iter_ves(set_dir, max_ves):
        esds.append(volumes.grain_esd(ves.grain_ids[i], ves.resolution))
        faces.append(volumes.grains_per_face(ves.grain_ids[i]))
        effective.append(volumes.effective_grains_per_face(ves.grain_ids[i]))
        intercepts.append(volumes.mean_intercept_lengths(ves.grain_ids[i], ves.resolution))
        grains.append(int(ves.n_grains[i]))
        eulers.append(ves.grain_euler(i))
        crystal = ves.crystal
    all_esd = np.concatenate(esds)
    stats = {
        "n_ves": int(n_ves),
        "n_measured": len(faces),
        "esd_mean": float(all_esd.mean()),
        "esd_std": float(all_esd.std()),
        "esd_target": float(np.mean(spec.esd_means)),
        "grains_per_face": float(np.mean(faces)),
        "grains_per_face_std": float(np.std(faces)),
        "grains_per_face_effective": float(np.mean(effective)),
        "elongation_x_to_yz": float(np.mean([m[0] / (0.5 * (m[1] + m[2])) for m in intercepts])),
        "grains_per_ve": float(np.mean(grains)),
    }
    if spec.texture != "random":
        stats.update(texture_statistics(np.concatenate(eulers), TEXTURES_DEG[spec.texture], crystal))
    return stats


def texture_statistics(euler: np.ndarray, ideal_deg: tuple[float, float, float], crystal: str) -> dict[str, float]:
    """Mean orientation of textured grains and their spread about the ideal component.

    ``euler`` (G, 3) Bunge radians. Each grain is replaced by its symmetry equivalent closest to
    the ideal orientation before averaging (damask's quaternion average), so grains split by the
    fundamental-zone boundary still average correctly. Angles in degrees.
    """
    import damask

    grains = damask.Orientation.from_Euler_angles(phi=euler, family=crystal)
    ideal = damask.Orientation.from_Euler_angles(phi=np.asarray(ideal_deg), degrees=True, family=crystal)
    spread = np.degrees(grains.disorientation_angle(ideal.broadcast_to(grains.shape)))
    equivalents = grains.equivalent  # (n_symmetry, G)
    to_ideal = damask.Rotation(equivalents.quaternion).misorientation_angle(
        damask.Rotation(ideal.quaternion).broadcast_to(equivalents.shape)
    )
    closest = equivalents.quaternion[np.argmin(to_ideal, axis=0), np.arange(len(euler))]
    mean = damask.Orientation(rotation=damask.Rotation(closest).average(), family=crystal)
    mean_euler = mean.as_Euler_angles(degrees=True)
    return {
        "texture_mean_phi1_deg": float(mean_euler[0]),
        "texture_mean_Phi_deg": float(mean_euler[1]),
        "texture_mean_phi2_deg": float(mean_euler[2]),
        "texture_mean_to_ideal_deg": float(np.degrees(mean.disorientation_angle(ideal))),
        "texture_spread_mean_deg": float(spread.mean()),
        "texture_spread_std_deg": float(spread.std()),
    }


def plot_set(set_dir: Path, out_png: Path, title: str, n_ves: int = 4) -> None:
    """Mid-slices (x, y, z) of the first VEs, coloured by normalised Euler angles as RGB (Fig. 5)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picked = list(iter_ves(set_dir, n_ves))
    fig, axes = plt.subplots(len(picked), 3, figsize=(7.5, 2.5 * len(picked)), squeeze=False)
    for row, (ves, i) in enumerate(picked):
        field = ves.orientation_field(i)  # (3, n, n, n), RGB = normalised (phi1, Phi, phi2)
        mid = field.shape[1] // 2
        slices = (field[:, mid, :, :], field[:, :, mid, :], field[:, :, :, mid])
        for col, (plane, rgb) in enumerate(zip(("x", "y", "z"), slices)):
            ax = axes[row, col]
            ax.imshow(np.clip(np.moveaxis(rgb, 0, -1), 0, 1).transpose(1, 0, 2), origin="lower")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"VE {int(ves.ve_index[i])}, {plane} = n/2", fontsize=8)
    fig.suptitle(f"{title}: mid-slices, RGB = (phi1/2pi, Phi/pi, phi2/2pi)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, out_png)


STATS_DIGITS = 9  # significant digits kept in the statistics JSON


def rounded(stats: dict[str, float]) -> dict[str, float]:
    """Floats rounded to :data:`STATS_DIGITS` significant digits: the statistics go through BLAS and
    damask's averaging, whose last bits differ between CPUs of one machine kind (AVX2 vs AVX-512
    kernels), while the file is a DVC output that must have the same md5 on every such host."""
    return {k: float(f"{v:.{STATS_DIGITS}g}") if isinstance(v, float) else v for k, v in stats.items()}


def write_set_report(params: Params, set_name: str, set_dir: Path, metrics_path: Path, plot_path: Path) -> dict:
    """Statistics JSON and mid-slice plot of one set."""
    stats = rounded(set_statistics(set_dir, params.generate.sets[set_name]))
    write_json(metrics_path, stats)
    plot_set(set_dir, plot_path, set_name)
    return stats


def merge_set_metrics(paths: list[Path], out: Path) -> dict[str, dict]:
    """Merge per-set statistics files ``<set>.json`` into one ``{set: stats}`` JSON."""
    merged = {}
    for path in sorted(paths):
        try:
            merged[path.stem] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise MicrofpError(f"{path}: cannot read set statistics ({err})") from None
    write_json(out, merged)
    return merged
