"""Fingerprint real microstructures: volumes of any shape, spacing and number of phases.

``microfp fingerprint-volume FILE --out OUT.parquet`` (a Dream3D ``.dream3d`` or DAMASK ``.vti``)::

    read the volume (formats.read_volume)       grain ids (X, Y, Z), Euler angles per grain, phases, spacing
    -> pick the phase (--phase NAME|NUMBER)     its crystal family must be the model's
    -> resample to the model's resolution       nearest neighbour on grain ids, per axis (anisotropic spacing)
    -> tile into ve_size^3 windows (--stride)   inside the volume; periodic volumes (DAMASK) may wrap
    -> per window: other-phase voxels take the nearest voxel of the phase (windows with less than
       --min-phase-fraction of it are skipped), orientations reduced to the fundamental zone, encoded
       by the VAE (fingerprint = mu), checked against the training VEs (microfp.ood: the fingerprint,
       and a texture + grain-boundary-density descriptor of the window's orientation field)
    -> OUT.parquet, one row per window

The model's ``crystal``, ``resolution`` (length units per voxel) and ``ve_size`` come from its OOD
calibration file (``models/vae_ood.json`` beside ``models/vae/``), written by the fingerprint stage.

Output columns: ``window`` (int64), ``x0, y0, z0`` (int64 window origin in voxels of the resampled
grid), ``origin_x, origin_y, origin_z`` (float64 origin in length units), ``z_0..z_{k-1}`` (float32
fingerprint), ``n_grains`` (int64 grains in the window), ``phase`` (string), ``phase_fraction``
(float64, share of the window's voxels in the phase before filling), per OOD check (``fingerprint``,
``microstructure``) ``ood_<check>_distance`` (float64 Mahalanobis distance), ``ood_<check>_percentile``
(float64, 0-100 among the validation VEs) and ``ood_<check>_flag`` (bool, the check fires), then
``ood_percentile`` (float64, the combined score's percentile) and ``ood_flag`` (bool, either check fires;
about 1 % of validation VEs are flagged). A calibration of the old format has no microstructure check
and no ``ood_microstructure_*`` columns.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

import numpy as np
import pandas as pd
import torch
import typer

from microfp import ood
from microfp.errors import MicrofpError
from microfp.formats import Volume, read_volume, reduced_euler
from microfp.shards import euler_field
from microfp.volumes import grain_esd

__all__ = [
    "MIN_GRAIN_VOXELS",
    "VolumeError",
    "fingerprint_volume",
    "fingerprint_volume_command",
    "resample",
    "select_phase",
    "window_origins",
]

MIN_GRAIN_VOXELS = 2.0
"""Grains must span at least this many voxels (mean equivalent sphere diameter) to be resolved."""


class VolumeError(MicrofpError):
    """A volume that cannot be fingerprinted with this model; one line."""


# ---------------------------------------------------------------------------------------------
# Pure steps


def check_3d(volume: Volume) -> None:
    """A 2D scan (one voxel thick along some axis) cannot be fingerprinted by a 3D VAE."""
    shape = volume.shape
    if min(shape) < 2:
        raise VolumeError(
            f"{volume.source}: a 2D scan ({shape[0]} x {shape[1]} x {shape[2]} voxels); the VAE fingerprints "
            "3D volumes only (reconstruct a 3D volume first, e.g. from serial sections)"
        )


def select_phase(volume: Volume, phase: str | None, family: str) -> int:
    """Number of the phase to fingerprint: ``phase`` as a name or number, else the only phase present.

    Its crystal family must be ``family`` (the model's). One-line :class:`VolumeError` otherwise.
    """
    present = sorted({int(k) for k in np.unique(volume.grain_phase) if k > 0})

    def listing() -> str:
        return ", ".join(f"{k} {volume.phases[k].name!r} ({volume.phases[k].family or volume.phases[k].label})"
                         for k in sorted(volume.phases)) or "none"

    if phase is None:
        if len(present) != 1:
            raise VolumeError(f"{volume.source}: {len(present)} phases ({listing()}); choose one with --phase NAME or NUMBER")
        number = present[0]
    else:
        by_name = [k for k, p in volume.phases.items() if p.name == phase]
        if by_name:
            number = by_name[0]
        elif phase.strip().isdigit() and int(phase) in volume.phases:
            number = int(phase)
        else:
            raise VolumeError(f"{volume.source}: no phase {phase!r}; phases: {listing()}")
        if number not in present:
            raise VolumeError(f"{volume.source}: phase {phase!r} occupies no voxel")
    have = volume.family(number)
    if have != family:
        raise VolumeError(
            f"{volume.source}: phase {volume.phases[number].name!r} is {have}, but the model was trained on {family} VEs"
        )
    return number


def resample(grain_ids: np.ndarray, spacing: np.ndarray, resolution: float) -> np.ndarray:
    """Nearest-neighbour resampling of grain ids ``(X, Y, Z)`` with voxel size ``spacing`` (3,) to
    cubic voxels of ``resolution`` (length units); the box keeps its size (rounded to whole voxels).

    Returns ``(X', Y', Z')`` with ``X' = max(1, round(X * spacing_x / resolution))``; voxel ``j`` takes
    the source voxel that contains its centre ``(j + 1/2) * resolution``.
    """
    index = []
    for n, s in zip(grain_ids.shape, np.asarray(spacing, dtype=np.float64)):
        m = max(1, int(round(n * s / resolution)))
        index.append(np.clip(((np.arange(m) + 0.5) * resolution / s).astype(np.int64), 0, n - 1))
    return grain_ids[np.ix_(*index)]


def mean_grain_diameter(grain_ids: np.ndarray, voxel_volume: float) -> float:
    """Mean equivalent sphere diameter (length units) of the grains present in ``grain_ids``."""
    esd = grain_esd(grain_ids, voxel_volume ** (1.0 / 3.0))
    return float(esd[esd > 0].mean())


def window_origins(shape: tuple[int, ...], size: int, stride: int, periodic: bool) -> np.ndarray:
    """Origins ``(W, 3)`` of ``size``^3 windows with ``stride`` in a volume of ``shape`` voxels.

    Non-periodic: windows lie inside the volume (origins 0, stride, ... <= n - size per axis; an axis
    shorter than ``size`` gives none). Periodic: origins 0, stride, ... < n, windows wrap around (a
    volume smaller than one window repeats itself).
    """
    axes = []
    for n in shape:
        stop = n if periodic else n - size + 1
        axes.append(np.arange(0, max(stop, 0), stride, dtype=np.int64))
    if any(a.size == 0 for a in axes):
        return np.zeros((0, 3), dtype=np.int64)
    return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)


def cut_window(grid: np.ndarray, origin: np.ndarray, size: int) -> np.ndarray:
    """The ``size``^3 block of ``grid`` at ``origin``, wrapping periodically past the end."""
    index = [(o + np.arange(size)) % n for o, n in zip(origin, grid.shape)]
    return grid[np.ix_(*index)]


def fill_other_phases(ids: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Give every voxel where ``keep`` is False the grain id of the nearest voxel where it is True."""
    if keep.all():
        return ids
    from scipy.ndimage import distance_transform_edt

    nearest = distance_transform_edt(~keep, return_distances=False, return_indices=True)
    return ids[tuple(nearest)]


# ---------------------------------------------------------------------------------------------
# The command's work


@dataclass
class Prepared:
    """A volume at the model's resolution, its chosen phase and what the summary states."""

    grid: np.ndarray  # (X', Y', Z') int64 grain ids
    euler: np.ndarray  # (G, 3) float32 reduced Bunge radians of every grain (rows of other phases unused)
    in_phase: np.ndarray  # (G,) bool
    phase_name: str
    periodic: bool
    factor: np.ndarray  # (3,) source voxel size / model voxel size


def prepare(volume: Volume, crystal: str, resolution: float, ve_size: int, phase: str | None,
            periodic: bool | None) -> Prepared:
    """Checks, phase choice, resampling; one-line :class:`VolumeError` for what cannot be fingerprinted."""
    check_3d(volume)
    number = select_phase(volume, phase, crystal)
    if volume.spacing is None:
        raise VolumeError(f"{volume.source}: the file gives no voxel spacing, so it cannot be resampled")
    spacing = np.asarray(volume.spacing, dtype=np.float64)
    in_phase = volume.grain_phase == number
    src_d = mean_grain_diameter(volume.grain_ids, float(np.prod(spacing)))
    if src_d < MIN_GRAIN_VOXELS * spacing.max():
        raise VolumeError(
            f"{volume.source}: too coarse to resolve the grains: they are {src_d:.3g} length units across on "
            f"average, {src_d / spacing.max():.2g} voxels of {spacing.max():g} (at least {MIN_GRAIN_VOXELS:g} needed)"
        )
    if src_d < MIN_GRAIN_VOXELS * resolution:
        raise VolumeError(
            f"{volume.source}: grains of {src_d:.3g} length units are below {MIN_GRAIN_VOXELS:g} voxels of the model's "
            f"resolution {resolution:g}; this model cannot resolve them"
        )
    grid = resample(volume.grain_ids, spacing, resolution)
    wrap = volume.periodic if periodic is None else periodic
    if min(grid.shape) < ve_size and not wrap:
        raise VolumeError(
            f"{volume.source}: {' x '.join(map(str, grid.shape))} voxels at the model's resolution {resolution:g} is smaller "
            f"than one {ve_size}^3 window, and the volume is not periodic (pass --periodic if it is)"
        )
    euler = np.zeros((len(volume.euler), 3), dtype=np.float32)
    euler[in_phase] = reduced_euler(volume.euler[in_phase], crystal)
    return Prepared(grid, euler, in_phase, volume.phases[number].name, wrap, spacing / resolution)


def window_fields(prep: Prepared, origins: np.ndarray, size: int, min_fraction: float) -> tuple[list[int], np.ndarray, list[dict[str, Any]]]:
    """Normalised Euler fields ``(W', 3, n, n, n)`` of the windows with enough of the phase.

    Returns the kept window indices, the fields and per kept window ``n_grains``/``phase_fraction``.
    """
    kept, fields, info = [], [], []
    for w, origin in enumerate(origins):
        ids = cut_window(prep.grid, origin, size)
        keep = prep.in_phase[ids]
        fraction = float(keep.mean())
        if fraction < min_fraction or fraction == 0.0:
            continue
        ids = fill_other_phases(ids, keep)
        grains, local = np.unique(ids, return_inverse=True)
        fields.append(euler_field(local.reshape(ids.shape), prep.euler[grains]))
        kept.append(w)
        info.append({"n_grains": len(grains), "phase_fraction": fraction})
    return kept, (np.stack(fields) if fields else np.zeros((0, 3, size, size, size), np.float32)), info


@torch.no_grad()
def encode(vae: Any, fields: np.ndarray, batch_size: int) -> np.ndarray:
    """mu of the encoder, ``(W, 3, n, n, n)`` -> ``(W, latent_dim)`` float32, in batches."""
    out = [vae.encode(torch.from_numpy(fields[i:i + batch_size]))[0].float().numpy()
           for i in range(0, len(fields), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, vae.cfg.latent_dim), np.float32)


def fingerprint_volume(
    file: Path,
    checkpoint: Path,
    out: Path,
    *,
    ood_path: Path | None = None,
    stride: int | None = None,
    phase: str | None = None,
    min_phase_fraction: float = 0.9,
    periodic: bool | None = None,
    material: Path | None = None,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Fingerprint every window of a volume file and write ``out`` (parquet); returns the summary."""
    from microfp.tables import latent_columns, write_table
    from microfp.model import load_vae

    t0 = time.perf_counter()
    cal = ood.load(ood_path or ood.default_path(checkpoint))
    meta = cal.meta
    crystal, resolution, size = str(meta["crystal"]), float(meta["resolution"]), int(meta["ve_size"])
    stride = size if stride is None else stride
    if stride < 1:
        raise VolumeError(f"--stride must be a positive number of voxels, got {stride}")
    if not 0.0 < min_phase_fraction <= 1.0:
        raise VolumeError(f"--min-phase-fraction must lie in (0, 1], got {min_phase_fraction}")
    vae = load_vae(checkpoint)
    if vae.cfg.ve_size != size or vae.cfg.latent_dim != cal.latent_dim:
        raise VolumeError(f"{checkpoint}: {vae.cfg.ve_size}^3, latent {vae.cfg.latent_dim}; its OOD calibration says "
                          f"{size}^3, latent {cal.latent_dim} (another model's file?)")
    volume = read_volume(file, material)
    prep = prepare(volume, crystal, resolution, size, phase, periodic)
    origins = window_origins(prep.grid.shape, size, stride, prep.periodic)
    kept, fields, info = window_fields(prep, origins, size, min_phase_fraction)
    if not kept:
        raise VolumeError(f"{file}: none of the {len(origins)} windows holds {min_phase_fraction:.0%} of phase {prep.phase_name!r}")
    t_read = time.perf_counter() - t0
    z = encode(vae, fields, batch_size)
    scores = cal.score(z, fields)
    o = origins[kept]
    cols: dict[str, Any] = {"window": np.asarray(kept, dtype=np.int64)}
    cols.update({f"{a}0": o[:, i] for i, a in enumerate("xyz")})
    cols.update({f"origin_{a}": o[:, i] * resolution for i, a in enumerate("xyz")})
    cols.update({name: z[:, i].astype(np.float32) for i, name in enumerate(latent_columns(z.shape[1]))})
    cols["n_grains"] = np.array([r["n_grains"] for r in info], dtype=np.int64)
    cols["phase"] = pd.array([prep.phase_name] * len(kept), dtype="string")
    cols["phase_fraction"] = np.array([r["phase_fraction"] for r in info])
    cols.update(scores)
    write_table(pd.DataFrame(cols), out)
    summary = {
        "shape": volume.shape, "spacing": np.asarray(volume.spacing).tolist(), "resampled": prep.grid.shape,
        "factor": prep.factor.tolist(), "resolution": resolution, "phase": prep.phase_name, "periodic": prep.periodic,
        "windows": len(origins), "fingerprinted": len(kept), "skipped": len(origins) - len(kept),
        "spread": ood.spread(z), "train_spread": float(meta.get("train_spread", float("nan"))),
        "median_percentile": float(np.median(scores["ood_percentile"])),
        "flagged": int(scores["ood_flag"].sum()),
        "flagged_by": {name: int(scores[f"ood_{name}_flag"].sum()) for name in cal.checks},
        "median_percentile_by": {name: float(np.median(scores[f"ood_{name}_percentile"])) for name in cal.checks}, "seconds_read": t_read, "seconds": time.perf_counter() - t0,
    }
    return summary


def describe(file: Path, out: Path, s: dict[str, Any]) -> list[str]:
    """The summary as a few lines for the terminal."""
    fmt = " x ".join
    return [
        f"{file}: {fmt(map(str, s['shape']))} voxels of {fmt(f'{v:g}' for v in s['spacing'])} -> "
        f"{fmt(map(str, s['resampled']))} voxels of {s['resolution']:g} (resampling factor {fmt(f'{v:.3g}' for v in s['factor'])}: "
        "file voxel / model voxel), "
        f"phase {s['phase']!r}, {'periodic' if s['periodic'] else 'not periodic'}",
        f"windows: {s['fingerprinted']} fingerprinted of {s['windows']} ({s['skipped']} skipped: too little of the phase)",
        f"fingerprint spread (RMS distance to the windows' mean): {s['spread']:.3g} (training VEs: {s['train_spread']:.3g})",
        f"out of distribution: {s['flagged']} of {s['fingerprinted']} windows ({s['flagged'] / s['fingerprinted']:.0%}) flagged, "
        "calibrated to flag 1% of the validation VEs ("
        + "; ".join(f"{name} check: {s['flagged_by'][name]} flagged, median percentile {s['median_percentile_by'][name]:.0f}"
                    for name in s["flagged_by"]) + ")",
        f"wrote {out} in {s['seconds']:.1f} s",
    ]


def fingerprint_volume_command(
    file: Annotated[Path, typer.Argument(help="A volume: Dream3D (.dream3d, SIMPL 7 or DREAM3D-NX 8) or DAMASK grid (.vti).")],
    out: Annotated[Path, typer.Option(help="Parquet table to write, one row per window.")],
    checkpoint: Annotated[Path, typer.Option(help="Trained VAE checkpoint.")] = Path("models/vae/best.ckpt"),
    ood_file: Annotated[Optional[Path], typer.Option("--ood", help="OOD calibration of the VAE (default: models/vae_ood.json for models/vae/best.ckpt, written by the fingerprint stage).")] = None,
    stride: Annotated[Optional[int], typer.Option(help="Voxels between window origins (default: ve_size, no overlap).")] = None,
    phase: Annotated[Optional[str], typer.Option(help="Phase to fingerprint, by name or number (default: the only phase).")] = None,
    min_phase_fraction: Annotated[float, typer.Option(help="Skip windows with less of the phase than this.")] = 0.9,
    periodic: Annotated[Optional[bool], typer.Option("--periodic/--not-periodic", help="Whether windows may wrap around (default: DAMASK grids yes, Dream3D files no).")] = None,
    material: Annotated[Optional[Path], typer.Option(help="material.yaml of a DAMASK grid (default: the one next to the .vti).")] = None,
    batch_size: Annotated[int, typer.Option(help="Windows per encoder batch.")] = 8,
) -> None:
    """Fingerprint a real microstructure of any shape, resolution and number of phases.

    Resamples the grain ids to the model's resolution (nearest neighbour; anisotropic spacing is
    fine), cuts ve_size^3 windows every --stride voxels (inside the volume; a periodic DAMASK grid
    may wrap, so even one smaller than a window works), fingerprints each window of the chosen phase
    with the VAE, and checks how far each window lies from the training VEs, by its fingerprint and by
    its texture and grain-boundary density (flagged when either lies beyond what 99% of the
    validation VEs reach). Writes window origin, fingerprint z_*, grain count, phase and per check
    the OOD distance/percentile/flag, plus the combined flag, per window, and prints a summary.
    """
    summary = fingerprint_volume(file, checkpoint, out, ood_path=ood_file, stride=stride, phase=phase,
                                 min_phase_fraction=min_phase_fraction, periodic=periodic, material=material,
                                 batch_size=batch_size)
    for line in describe(file, out, summary):
        typer.echo(line)
