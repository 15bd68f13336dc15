"""Reconstruction accuracy of the VAE (paper section 3.2, eq. 5, Tables 4-6): the ``evaluate`` stage.

Stage ``evaluate`` (``microfp evaluate``)::

    models/vae/best.ckpt, data/ves/<set>/shard-*.h5 (every set), params.yaml
        -> metrics/reconstruction.json   {set: {phi4_mean, phi4_std, disorientation_deg_mean, ...}}
        -> plots/reconstruction/<set>.png  input vs reconstruction mid-slices + per-VE phi4 histogram

Metrics, per voxel, between the input orientation and the reconstructed one (both Bunge Euler angles;
the reconstruction is the VAE's normalised output times (2 pi, pi, 2 pi)):

* ``phi4 = 1 - |q1 . q2|`` (paper eq. 5, Huynh's metric), quaternions from the Euler angles with
  damask's conventions. phi4 is **not** symmetry-aware: two symmetry-equivalent orientations can have
  phi4 > 0, exactly as in the paper (whose inputs are reduced to the fundamental zone). It lies in
  [0, 1]: phi4 = 1 - cos(omega / 2) for the plain (symmetry-blind) misorientation angle omega, so 0.03
  corresponds to ~28 degrees, and a 180-degree cubic symmetry operation gives phi4 = 1.
* the symmetry-aware **disorientation angle** in degrees (cubic 432 or hexagonal 622, from the shard's
  ``crystal`` attribute): the smallest rotation angle among all symmetry-equivalent misorientations,
  with damask's closed form (``damask.Orientation.disorientation_angle``) ported to torch so that it
  runs batched on the GPU; ``disorientation_angle_damask`` is the chunked damask reference (tests
  compare both on random and symmetry-equivalent pairs).

Each VE gets the mean over its voxels; a set gets the mean and standard deviation over its VEs (the
paper's ``mean +- std``). Keys per set: ``n_ves``, ``phi4_mean``, ``phi4_std``,
``disorientation_deg_mean``/``_std``/``_median``, ``within_5deg`` (fraction of voxels within 5 degrees)
``mean_field_phi4_mean``/``mean_field_disorientation_deg_mean``: the score of the set's mean field
(per voxel the mean orientation of its VEs, :func:`mean_field`, returned for every VE: what a model
that ignores its input gets at best; a collapsed VAE scores about this or worse) and, as a yardstick, ``reference_phi4_mean``/``reference_disorientation_deg_mean``: the same metrics
between each VE and the previous VE of its set, i.e. a "reconstruction" that knows the set's texture
but nothing of the VE (for a random cubic texture the disorientation is ~40.7 degrees, Mackenzie). Everything is vectorised over voxels and VEs; there is no Python loop over
voxels. All files are written atomically.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import typer

from microfp.atomic import save_figure, write_json
from microfp.config import Params, load_params
from microfp.errors import MicrofpError
from microfp.model import load_vae
from microfp.rotations import (
    align_to,
    disorientation_cos_half,
    euler_field_to_quaternion,
    phi4,
    quaternion_field_to_euler,
)
from microfp.rotations import euler_to_quaternion as euler_to_quaternion_t
from microfp.runtime import pick_device
from microfp.setdata import DEFAULT_DATA, find_sets, iter_set_batches
from microfp.shards import EULER_SCALE, ShardError
from microfp.tracking import log_mlflow

__all__ = [
    "disorientation_angle",
    "disorientation_angle_damask",
    "evaluate",
    "evaluate_command",
    "mean_field",
    "reconstruction_metrics",
]

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Orientation metrics (torch, any device, any batch shape)


def disorientation_angle(q1: torch.Tensor, q2: torch.Tensor, family: str) -> torch.Tensor:
    """Symmetry-aware disorientation angle (radians) of pairs of orientations ``(..., 4)``.

    The closed form of ``damask.Orientation.disorientation_angle`` (same crystal family on both
    sides): with ``a = |q1 * conj(q2)|`` per component, the largest ``|w|`` over the symmetric
    equivalents is, for cubic (432), ``max(sum(a) / 2, a_(1), (a_(1) + a_(2)) / sqrt 2)`` with
    ``a_(1) >= a_(2)`` the two largest components; for hexagonal (622) it is
    ``max(m1, m2, m1 sqrt3/2 + m4/2, m2 sqrt3/2 + m3/2)`` with ``m1 >= m4`` the sorted ``(|w|, |z|)``
    and ``m2 >= m3`` the sorted ``(|x|, |y|)``. The angle is ``2 acos`` of it.
    """
    trace = disorientation_cos_half(q1, q2, family)
    return 2.0 * torch.arccos(trace.clamp(max=1.0))


def disorientation_angle_damask(
    euler1: np.ndarray, euler2: np.ndarray, family: str, chunk: int = 262_144
) -> np.ndarray:
    """Reference: damask's ``Orientation.disorientation_angle`` of ``(N, 3)`` Bunge radians pairs, in
    chunks (the full ``disorientation`` of 262k pairs at once needs > 24 GB). Radians, ``(N,)``."""
    import damask

    e1 = np.asarray(euler1, dtype=np.float64).reshape(-1, 3)
    e2 = np.asarray(euler2, dtype=np.float64).reshape(-1, 3)
    out = np.empty(len(e1))
    for start in range(0, len(e1), chunk):
        sl = slice(start, start + chunk)
        o1 = damask.Orientation.from_Euler_angles(phi=e1[sl], family=family)
        o2 = damask.Orientation.from_Euler_angles(phi=e2[sl], family=family)
        out[sl] = np.asarray(o1.disorientation_angle(o2)).reshape(-1)
    return out


def reconstruction_metrics(x: torch.Tensor, x_hat: torch.Tensor, family: str) -> dict[str, torch.Tensor]:
    """Per-VE mean metrics of a batch of normalised Euler fields ``(B, 3, n, n, n)`` (input, output).

    Computed in float64 (small angles: ``acos`` near 1). Returns ``(B,)`` tensors ``phi4``,
    ``disorientation_deg`` and ``within_5deg`` (fraction of voxels with a disorientation < 5 degrees),
    and ``phi4_map`` ``(B, n, n, n)`` float32 for the plots.
    """
    if x.shape != x_hat.shape or x.ndim != 5 or x.shape[1] != 3:
        raise MicrofpError(f"expected two (B, 3, n, n, n) fields of equal shape, got {tuple(x.shape)} and {tuple(x_hat.shape)}")
    scale = torch.as_tensor(EULER_SCALE, dtype=torch.float64, device=x.device).view(1, 3, 1, 1, 1)
    e1 = (x.double() * scale).movedim(1, -1)  # (B, n, n, n, 3) radians
    e2 = (x_hat.double() * scale).movedim(1, -1)
    q1, q2 = euler_to_quaternion_t(e1), euler_to_quaternion_t(e2)
    p = phi4(q1, q2)
    omega = torch.rad2deg(disorientation_angle(q1, q2, family))
    dims = (1, 2, 3)
    return {
        "phi4": p.mean(dims),
        "disorientation_deg": omega.mean(dims),
        "within_5deg": (omega < 5.0).double().mean(dims),
        "phi4_map": p.float(),
    }


# ---------------------------------------------------------------------------------------------
# The set's mean field


def mean_field(x: torch.Tensor, crystal: str, iterations: int = 3) -> torch.Tensor:
    """The set's mean field ``(1, 3, n, n, n)`` of normalised Euler fields ``x`` ``(B, 3, n, n, n)``: per
    voxel the mean orientation of the VEs (each aligned to the running mean by the crystal symmetry,
    then averaged as quaternions), as normalised Euler angles. The best single output of a model that
    ignores its input (for a textured set about the texture component; a plain mean of Euler angles
    or of fundamental-zone quaternions breaks where orientations straddle a periodic or zone boundary)."""
    q = euler_field_to_quaternion(x.double(), crystal)  # (B, 4, n, n, n)
    ref = q[:1]
    for _ in range(iterations):
        ref = torch.nn.functional.normalize(align_to(q, ref, crystal, dim=1).sum(0, keepdim=True), dim=1)
    return quaternion_field_to_euler(ref, crystal).to(x.dtype)


def set_mean_field(set_dir: str | Path, batch_size: int, limit: int | None, ve_size: int) -> torch.Tensor:
    """:func:`mean_field` of the first ``limit`` VEs of a set directory."""
    batches = list(iter_set_batches(set_dir, batch_size, limit, ve_size))
    if not batches:
        raise ShardError(f"{set_dir}: no VEs to evaluate")
    return mean_field(torch.cat([b.x for b in batches]), batches[0].crystal)


# ---------------------------------------------------------------------------------------------
# The stage


def _summary(per_ve: dict[str, np.ndarray]) -> dict[str, float]:
    p, d, w = per_ve["phi4"], per_ve["disorientation_deg"], per_ve["within_5deg"]
    out = {
        "n_ves": int(len(p)),
        "phi4_mean": float(p.mean()),
        "phi4_std": float(p.std()),
        "disorientation_deg_mean": float(d.mean()),
        "disorientation_deg_std": float(d.std()),
        "disorientation_deg_median": float(np.median(d)),
        "within_5deg": float(w.mean()),
    }
    if len(per_ve["mf_phi4"]):
        # The set's mean field (per-voxel mean of its normalised Euler fields) as the reconstruction of
        # every VE: what a model that ignores its input gets (a collapsed VAE scores about this).
        out["mean_field_phi4_mean"] = float(per_ve["mf_phi4"].mean())
        out["mean_field_disorientation_deg_mean"] = float(per_ve["mf_disorientation_deg"].mean())
    if len(per_ve["ref_phi4"]):
        # Reference "reconstruction" that knows the set but not the VE: the previous VE of the set.
        out["reference_phi4_mean"] = float(per_ve["ref_phi4"].mean())
        out["reference_disorientation_deg_mean"] = float(per_ve["ref_disorientation_deg"].mean())
    return out


@torch.no_grad()
def evaluate(
    params: Params,
    checkpoint: str | Path = "models/vae/best.ckpt",
    data: str | Path = DEFAULT_DATA,
    metrics: str | Path = "metrics/reconstruction.json",
    plots: str | Path | None = "plots/reconstruction",
) -> dict[str, dict[str, float]]:
    """Reconstruct up to ``evaluate.max_ves_per_set`` VEs of every set and write the metrics/plots."""
    t0 = time.time()
    ev = params.evaluate
    device = pick_device(ev.device)
    sets = find_sets(data, ev.sets)  # fail on missing shards before loading the model
    vae = load_vae(checkpoint, expect=params, device=device)
    results: dict[str, dict[str, float]] = {}
    for name in sets:
        per_ve: dict[str, list[np.ndarray]] = {
            "phi4": [], "disorientation_deg": [], "within_5deg": [], "ve_id": [], "ref_phi4": [], "ref_disorientation_deg": [],
            "mf_phi4": [], "mf_disorientation_deg": [],
        }
        mean_field = set_mean_field(Path(data) / name, ev.batch_size, ev.max_ves_per_set, params.ve_size).to(device)
        previous: torch.Tensor | None = None  # last VE of the previous batch
        examples: list[tuple[np.ndarray, np.ndarray, np.ndarray, int]] = []
        crystal = "cubic"
        for batch in iter_set_batches(Path(data) / name, ev.batch_size, ev.max_ves_per_set, params.ve_size):
            crystal = batch.crystal
            x = batch.x.to(device)
            x_hat = vae.decode(vae.encode(x)[0])  # eval: z = mu
            m = reconstruction_metrics(x, x_hat.float(), batch.crystal)
            for key in ("phi4", "disorientation_deg", "within_5deg"):
                per_ve[key].append(m[key].cpu().numpy())
            per_ve["ve_id"].append(batch.ve_id)
            mf = reconstruction_metrics(x, mean_field.expand_as(x).contiguous(), batch.crystal)
            per_ve["mf_phi4"].append(mf["phi4"].cpu().numpy())
            per_ve["mf_disorientation_deg"].append(mf["disorientation_deg"].cpu().numpy())
            shifted = torch.cat([previous, x[:-1]]) if previous is not None else x[:-1]
            if len(shifted):
                ref = reconstruction_metrics(x[len(x) - len(shifted):], shifted, batch.crystal)
                per_ve["ref_phi4"].append(ref["phi4"].cpu().numpy())
                per_ve["ref_disorientation_deg"].append(ref["disorientation_deg"].cpu().numpy())
            previous = x[-1:]
            if len(examples) < 2:
                mid = x.shape[2] // 2
                for i in range(min(2 - len(examples), x.shape[0])):
                    examples.append((x[i, :, :, :, mid].cpu().numpy(), x_hat[i, :, :, :, mid].float().cpu().numpy(),
                                     m["phi4_map"][i, :, :, mid].cpu().numpy(), int(batch.ve_id[i])))
        arrays = {k: np.concatenate(v) if v else np.zeros(0) for k, v in per_ve.items()}
        results[name] = _summary(arrays)
        r = results[name]
        log.info(f"{name}: {r['n_ves']} VEs ({crystal}), phi4 {r['phi4_mean']:.4f} +- {r['phi4_std']:.4f}, "
             f"disorientation {r['disorientation_deg_mean']:.2f} deg (mean field: {r['mean_field_phi4_mean']:.4f}, "
             f"{r['mean_field_disorientation_deg_mean']:.2f} deg)")
        if plots is not None:
            plot_reconstruction(Path(plots) / f"{name}.png", name, examples, arrays["phi4"], results[name])
    write_json(metrics, results)
    log_mlflow("evaluate", params, results, checkpoint)
    log.info(f"{len(sets)} sets in {time.time() - t0:.1f} s on {device}; wrote {metrics}")
    return results


def _rgb(field: np.ndarray) -> np.ndarray:
    """(3, a, b) normalised Euler slice -> (b, a, 3) RGB image with x to the right, y up."""
    return np.clip(np.moveaxis(field, 0, -1), 0, 1).transpose(1, 0, 2)


def plot_reconstruction(
    path: Path, name: str, examples: list[tuple[np.ndarray, np.ndarray, np.ndarray, int]],
    phi4_per_ve: np.ndarray, summary: dict[str, float],
) -> None:
    """Mid-slices (z = n/2) of input and reconstruction (RGB = normalised Euler, as the paper's Fig. 5),
    the phi4 map of the slice, and the histogram of the per-VE mean phi4."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(1, len(examples))
    fig = plt.figure(figsize=(11, 2.9 * rows))
    grid = fig.add_gridspec(rows, 4, width_ratios=[1, 1, 1, 1.3])
    vmax = max(1e-6, max((float(e[2].max()) for e in examples), default=1e-6))
    for r, (inp, rec, pmap, ve_id) in enumerate(examples):
        for c, (img, title) in enumerate(((inp, "input"), (rec, "reconstruction"))):
            ax = fig.add_subplot(grid[r, c])
            ax.imshow(_rgb(img), origin="lower", interpolation="nearest")
            ax.set_title(f"VE {ve_id} {title}", fontsize=8)
            ax.set_xticks([]), ax.set_yticks([])
        ax = fig.add_subplot(grid[r, 2])
        im = ax.imshow(pmap.T, origin="lower", cmap="magma", vmin=0, vmax=vmax, interpolation="nearest")
        ax.set_title("phi4 per voxel", fontsize=8)
        ax.set_xticks([]), ax.set_yticks([])
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    ax = fig.add_subplot(grid[:, 3])
    ax.hist(phi4_per_ve, bins=min(30, max(5, len(phi4_per_ve) // 3)), color="tab:blue", edgecolor="white")
    ax.axvline(summary["phi4_mean"], color="k", ls="--", lw=1)
    ax.set_xlabel("phi4 = 1 - |q1.q2|, mean per VE")
    ax.set_ylabel("VEs")
    ax.set_title(f"{name}: {summary['phi4_mean']:.4f} +- {summary['phi4_std']:.4f} (n={summary['n_ves']})\n"
                 f"disorientation {summary['disorientation_deg_mean']:.2f} deg", fontsize=8)
    fig.suptitle(f"{name}: mid-slices z = n/2, RGB = (phi1/2pi, Phi/pi, phi2/2pi)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def evaluate_command(
    params: Annotated[Path, typer.Option("--params", "-p", help="parameter file (params.yaml or configs/paper.yaml)")] = Path("params.yaml"),
    checkpoint: Annotated[Path, typer.Option(help="trained VAE checkpoint")] = Path("models/vae/best.ckpt"),
    data: Annotated[Path, typer.Option(help="directory of the sets, each a folder of shard-*.h5")] = DEFAULT_DATA,
    metrics: Annotated[Path, typer.Option(help="metrics JSON keyed by set")] = Path("metrics/reconstruction.json"),
    plots: Annotated[Path, typer.Option(help="directory of the per-set PNGs")] = Path("plots/reconstruction"),
) -> None:
    """Reconstruction accuracy of the VAE on every set (paper eq. 5, Tables 4-6).

    For up to evaluate.max_ves_per_set VEs of each set in data/ves (or of evaluate.sets), encodes
    (z = mu), decodes and compares the orientation of every voxel: phi4 = 1 - |q1.q2| (not
    symmetry-aware, as in the paper) and the cubic/hexagonal disorientation angle in degrees. Writes
    metrics/reconstruction.json ({set: {phi4_mean, phi4_std, disorientation_deg_mean, ...}}) and
    plots/reconstruction/<set>.png. Uses the GPU when there is one (evaluate.device).
    """
    evaluate(load_params(params), checkpoint=checkpoint, data=data, metrics=metrics, plots=plots)
