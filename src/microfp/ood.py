"""Out-of-distribution (OOD) check of VEs: is a VE like the ones the model was trained on?

Two checks, each a Mahalanobis distance ``d(x) = sqrt((x - m)^T S^-1 (x - m))`` of a descriptor ``x``
of the VE to the descriptors of the training VEs (``m`` their mean, ``S`` their Ledoit-Wolf shrunk
covariance, full rank even with fewer VEs than dimensions):

``fingerprint``
    ``x`` = the VAE's fingerprint (mu). What the surrogate sees; but an encoder may map an unfamiliar
    input into a familiar region of its latent space (an untrained or poorly trained VAE ignores
    texture altogether), so a latent-space check alone can miss what it was built for.
``microstructure``
    ``x`` = :func:`microstructure_descriptor`, computed from the orientation field itself,
    independent of the VAE: the volume-averaged texture coefficients (crystal-symmetry-invariant
    harmonics of the orientation, :func:`microfp.harmonics.local_state`; 0 for a random texture)
    and, per axis, the share of neighbouring voxel pairs misoriented by more than
    ``BOUNDARY_DEG`` (grain-boundary density, about 1 / grain size along that axis: catches small,
    large and elongated grains). Chosen over the 2-point statistics (which also separate these sets)
    because it needs no PCA basis in the calibration, costs one pass over the voxels, and each
    number has a name: 9 (cubic) or 18 (hexagonal) texture coefficients and 3 boundary densities.
    Measured on the default profile's sets (issue 14), calibrated on val: it flags every brass,
    copper, cube and Goss VE (2 and 0.01 degree spread), every small, large, elongated and
    small_mixed VE, and no validation VE, where the fingerprint check of the current VAE flags 0 %
    of brass, cube and Goss. Each half alone also flags all textured VEs (their neighbouring grains
    are misoriented by a few degrees only, below ``BOUNDARY_DEG``, so few boundaries count); the
    texture half misses small grains, which the boundary half catches.

Both are calibrated on the validation set, which the VAE did not train on. A VE's percentile per
check is the share of validation VEs at or below its distance. The flag: each distance is divided by
its check's ``FLAG_PERCENTILE``-th validation percentile, the VE's score is the larger ratio, and it is
flagged when the score exceeds the ``FLAG_PERCENTILE``-th percentile of the validation VEs' scores.
So about 1 % of VEs like the training ones are flagged whichever check fires (calibrating the
two checks jointly, not each at 99 %, which would flag up to 2 %); a check "fires" when its own ratio
is above that threshold (the combined flag is: either fires).

The calibration is a small JSON file written by the ``fingerprint`` stages beside the model
(``models/vae_ood.json``, ``models/vae_hcp_ood.json``; a DVC output, so ``dvc pull`` brings it). It
also records what a volume must be turned into for this model: ``crystal`` family, ``resolution``
(length units per voxel) and ``ve_size``. The surrogate checkpoint embeds the hexagonal one. A file of
the previous format (``microfp-ood-1``, fingerprint check only) still reads, as a one-check calibration.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from microfp.atomic import write_json
from microfp.errors import MicrofpError

__all__ = [
    "BOUNDARY_DEG",
    "CHECKS",
    "FLAG_PERCENTILE",
    "Check",
    "OODCalibration",
    "OODError",
    "boundary_density",
    "default_path",
    "fit",
    "load",
    "microstructure_descriptor",
    "save",
    "texture_coefficients",
]

FORMAT = "microfp-ood-2"
FORMAT_V1 = "microfp-ood-1"
FLAG_PERCENTILE = 99.0
"""VEs whose combined score exceeds this percentile of the validation VEs' scores are flagged."""
CHECKS = ("fingerprint", "microstructure")
BOUNDARY_DEG = 5.0
"""Neighbouring voxels misoriented by more than this (degrees) lie on either side of a grain boundary
(the usual low-angle boundary threshold of EBSD grain reconstruction)."""


class OODError(MicrofpError):
    """A missing or unreadable OOD calibration file, or descriptors that do not fit it; one line."""


# ---------------------------------------------------------------------------------------------
# The microstructure descriptor (input space)


def _check_fields(fields: np.ndarray) -> np.ndarray:
    fields = np.asarray(fields)
    if fields.ndim == 4:
        fields = fields[None]
    if fields.ndim != 5 or fields.shape[1] != 3 or min(fields.shape[2:]) < 2:
        raise OODError(f"orientation fields must be (B, 3, n, n, n) normalised Euler angles, got shape {fields.shape}")
    return fields


def _orientations(field: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct orientations of a normalised Euler field ``(3, n, n, n)``: Bunge radians ``(U, 3)``
    float64, the label ``(n, n, n)`` of every voxel, the voxel count ``(U,)`` of each (one per grain
    in a grain-map VE, so the descriptor costs little more than a pass over the voxels)."""
    from microfp.shards import EULER_SCALE

    flat = np.zeros((field[0].size, 4), dtype=np.float32)
    flat[:, :3] = field.reshape(3, -1).T + np.float32(0.0)  # -0.0 -> 0.0: equal angles, equal bits
    keys = flat.view(np.uint64)  # (N, 2): the bits of (phi1, Phi) and (phi2, 0), sorted as integers
    order = np.lexsort((keys[:, 1], keys[:, 0]))
    ordered = keys[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = (ordered[1:] != ordered[:-1]).any(axis=1)
    group = np.cumsum(first) - 1
    label = np.empty(len(order), dtype=np.int64)
    label[order] = group
    unique = flat[order[first], :3].astype(np.float64)
    return unique * EULER_SCALE.astype(np.float64), label.reshape(field.shape[1:]), np.bincount(group)


def texture_coefficients(euler: np.ndarray, counts: np.ndarray, family: str) -> np.ndarray:
    """Volume average ``(C,)`` of the symmetry-invariant local state (:func:`microfp.harmonics.local_state`)
    of orientations ``euler`` (U, 3) occupying ``counts`` (U,) voxels: the lowest-order texture
    coefficients, C = 9 (cubic, l = 4) or 18 (hexagonal, l = 2 and 6); 0 for a random texture."""
    from microfp.harmonics import local_state

    return (counts.astype(np.float64) @ local_state(euler, family)) / counts.sum()


def boundary_density(euler: np.ndarray, label: np.ndarray, family: str, degrees: float = BOUNDARY_DEG) -> np.ndarray:
    """Per axis x, y, z, the share ``(3,)`` of neighbouring voxel pairs of a labelled field (``label``
    (n, n, n) indexes orientations ``euler`` (U, 3)) whose disorientation exceeds ``degrees``.

    Only pairs inside the field (no wrap-around), so a window cut from a non-periodic volume and a
    periodic VE are measured alike. The disorientation is computed once per distinct pair of labels.
    """
    import torch

    from microfp.rotations import disorientation_cos_half, euler_to_quaternion

    q = euler_to_quaternion(torch.from_numpy(euler))
    cos_limit = math.cos(math.radians(degrees) / 2.0)
    u = np.int64(len(euler))
    out = np.zeros(3)
    for axis in range(3):
        n = label.shape[axis]
        a = np.take(label, np.arange(n - 1), axis=axis).ravel()
        b = np.take(label, np.arange(1, n), axis=axis).ravel()
        differ = a != b
        pairs, counts = np.unique(a[differ].astype(np.int64) * u + b[differ], return_counts=True)
        if pairs.size:
            idx_a, idx_b = torch.from_numpy(pairs // u), torch.from_numpy(pairs % u)
            boundary = (disorientation_cos_half(q[idx_a], q[idx_b], family) < cos_limit).numpy()
            out[axis] = int(counts[boundary].sum()) / a.size
    return out


def microstructure_descriptor(fields: np.ndarray, family: str) -> np.ndarray:
    """Input-space descriptor ``(B, C + 3)`` float64 of normalised Euler fields ``(B, 3, n, n, n)``:
    texture coefficients (:func:`texture_coefficients`) then boundary densities x, y, z
    (:func:`boundary_density`). Independent of the VAE; deterministic."""
    rows = []
    for f in _check_fields(fields):
        euler, label, counts = _orientations(f)
        rows.append(np.concatenate([texture_coefficients(euler, counts, family), boundary_density(euler, label, family)]))
    return np.stack(rows)


# ---------------------------------------------------------------------------------------------
# One check: a Mahalanobis model of a descriptor


@dataclass
class Check:
    """Mahalanobis model of one descriptor of the training VEs, with the validation distances.

    ``mean`` (d,), ``precision`` (d, d) inverse shrunk covariance, ``val_distances`` (n_val,) sorted
    distances of the validation VEs, ``scale`` their ``FLAG_PERCENTILE``-th percentile.
    """

    mean: np.ndarray
    precision: np.ndarray
    val_distances: np.ndarray
    scale: float

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    def distance(self, x: np.ndarray, name: str = "descriptor") -> np.ndarray:
        """Mahalanobis distances (N,) of descriptors ``x`` (N, d) to the training descriptors."""
        x = np.atleast_2d(np.asarray(x, dtype=np.float64))
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise OODError(f"{name}s have {x.shape[-1]} values, the OOD calibration {self.dim}")
        diff = x - self.mean
        return np.sqrt(np.maximum(np.einsum("ni,ij,nj->n", diff, self.precision, diff), 0.0))

    def percentile(self, distance: np.ndarray) -> np.ndarray:
        """Percent (N,) of validation VEs at or below each distance, 0..100."""
        return _rank(self.val_distances, distance)


def _rank(sorted_values: np.ndarray, x: np.ndarray) -> np.ndarray:
    rank = np.searchsorted(sorted_values, np.asarray(x, dtype=np.float64), side="right")
    return 100.0 * rank / sorted_values.size


def fit_check(train: np.ndarray, val: np.ndarray, name: str = "descriptor") -> Check:
    """Ledoit-Wolf Mahalanobis model of ``train`` (N, d), validation distances of ``val`` (M, d)."""
    from sklearn.covariance import LedoitWolf

    train = np.ascontiguousarray(train, dtype=np.float64)
    val = np.ascontiguousarray(val, dtype=np.float64)
    if train.ndim != 2 or train.shape[0] < 2 or val.ndim != 2 or val.shape[0] < 1:
        raise OODError(f"OOD calibration needs >= 2 training and >= 1 validation {name}s, got {len(train)} and {len(val)}")
    lw = LedoitWolf().fit(train)
    check = Check(lw.location_, lw.precision_, np.zeros(1), 1.0)
    dist = np.sort(check.distance(val, name))
    check.val_distances = dist
    check.scale = float(np.percentile(dist, FLAG_PERCENTILE)) or 1.0
    return check


# ---------------------------------------------------------------------------------------------
# The calibration: both checks, the combined threshold


@dataclass
class OODCalibration:
    """The checks (``CHECKS`` order, those present), the combined threshold and what the model expects.

    ``val_scores`` (n_val,) sorted combined scores of the validation VEs (larger ratio of distance to
    the check's ``scale``), ``threshold`` their ``FLAG_PERCENTILE``-th percentile; ``meta``: crystal,
    resolution, ve_size, latent_dim, where the descriptors came from.
    """

    checks: dict[str, Check]
    val_scores: np.ndarray
    threshold: float
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def latent_dim(self) -> int:
        return self.checks["fingerprint"].dim

    def descriptor(self, fields: np.ndarray) -> np.ndarray:
        """The microstructure descriptor of normalised Euler fields, for this model's crystal family."""
        return microstructure_descriptor(fields, str(self.meta.get("crystal", "cubic")))

    def score_descriptors(self, x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Per check ``ood_<check>_distance``, ``ood_<check>_percentile``, ``ood_<check>_flag``, then
        ``ood_percentile`` (rank of the combined score among the validation VEs) and ``ood_flag``.

        ``x`` maps every check of the calibration to its descriptors (N, d).
        """
        missing = [name for name in self.checks if name not in x]
        if missing:
            raise OODError(f"no {', '.join(missing)} descriptors to score (the OOD calibration has {', '.join(self.checks)})")
        out: dict[str, np.ndarray] = {}
        ratios = []
        for name, check in self.checks.items():
            d = check.distance(x[name], name)
            ratio = d / check.scale
            out[f"ood_{name}_distance"] = d
            out[f"ood_{name}_percentile"] = check.percentile(d)
            out[f"ood_{name}_flag"] = ratio > self.threshold
            ratios.append(ratio)
        combined = np.max(np.stack(ratios), axis=0)
        out["ood_percentile"] = _rank(self.val_scores, combined)
        out["ood_flag"] = combined > self.threshold
        return out

    def score(self, z: np.ndarray, fields: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Score VEs from their fingerprints ``z`` (N, latent_dim) and normalised Euler fields
        ``(N, 3, n, n, n)`` (needed when the calibration has the microstructure check)."""
        x = {"fingerprint": z}
        if "microstructure" in self.checks:
            if fields is None:
                raise OODError("the microstructure check needs the VEs' orientation fields")
            x["microstructure"] = self.descriptor(fields)
        return self.score_descriptors(x)


def fit(train: dict[str, np.ndarray], val: dict[str, np.ndarray], meta: dict[str, Any] | None = None) -> OODCalibration:
    """Fit every check in ``train`` (name -> (N, d) descriptors of the training VEs, ``fingerprint``
    among them) and calibrate the checks and the combined flag on ``val`` (same names, same VEs per
    check)."""
    names = [name for name in CHECKS if name in train]
    if "fingerprint" not in names or set(train) != set(names) or set(val) != set(names):
        raise OODError(f"OOD checks must be {' and/or '.join(CHECKS)} (fingerprint required), got {sorted(train)} / {sorted(val)}")
    n_val = {len(np.atleast_2d(val[name])) for name in names}
    if len(n_val) != 1:
        raise OODError(f"the validation descriptors of the checks are of different VEs ({sorted(n_val)} rows)")
    checks = {name: fit_check(train[name], val[name], name) for name in names}
    scores = np.sort(np.max(np.stack([c.distance(val[n], n) / c.scale for n, c in checks.items()]), axis=0))
    cal = OODCalibration(checks, scores, float(np.percentile(scores, FLAG_PERCENTILE)), dict(meta or {}))
    z = np.asarray(train["fingerprint"], dtype=np.float64)
    cal.meta.update(n_train=int(z.shape[0]), n_val=int(scores.size), method="mahalanobis-ledoit-wolf",
                    checks=names, flag_percentile=FLAG_PERCENTILE, boundary_deg=BOUNDARY_DEG, train_spread=spread(z))
    return cal


def spread(z: np.ndarray) -> float:
    """RMS Euclidean distance of fingerprints ``z`` (N, d) to their mean (fingerprint units)."""
    z = np.ascontiguousarray(z, dtype=np.float64)  # the summation order, so the bits, follow the layout
    return float(np.sqrt(((z - z.mean(axis=0)) ** 2).sum(axis=1).mean()))


# ---------------------------------------------------------------------------------------------
# Files


def to_dict(cal: OODCalibration) -> dict[str, Any]:
    """JSON-ready form (also embedded in the surrogate checkpoint)."""
    checks = {name: {"mean": c.mean.tolist(), "precision": c.precision.tolist(),
                     "val_distances": c.val_distances.tolist(), "scale": c.scale} for name, c in cal.checks.items()}
    return {"format": FORMAT, "checks": checks, "val_scores": cal.val_scores.tolist(), "threshold": cal.threshold,
            "meta": cal.meta}


def _check_from(data: dict[str, Any], scale: float | None = None) -> Check:
    c = Check(np.asarray(data["mean"], np.float64), np.asarray(data["precision"], np.float64),
              np.asarray(data["val_distances"], np.float64), float(data["scale"] if scale is None else scale))
    d = c.mean.shape
    if len(d) != 1 or c.precision.shape != d * 2 or c.val_distances.ndim != 1 or not c.val_distances.size or not c.scale > 0:
        raise ValueError("shapes")
    return c


def from_dict(data: Any, source: str) -> OODCalibration:
    """Inverse of :func:`to_dict` (also reads ``microfp-ood-1``); one-line :class:`OODError` when it is
    not a calibration."""
    try:
        fmt = data.get("format")
        if fmt == FORMAT_V1:  # fingerprint check only, flagged above its own threshold
            check = _check_from(data, scale=1.0)
            cal = OODCalibration({"fingerprint": check}, check.val_distances, float(data["threshold"]), dict(data["meta"]))
        elif fmt == FORMAT:
            checks = {name: _check_from(data["checks"][name]) for name in CHECKS if name in data["checks"]}
            if "fingerprint" not in checks or set(checks) != set(data["checks"]):
                raise KeyError("checks")
            cal = OODCalibration(checks, np.asarray(data["val_scores"], np.float64), float(data["threshold"]), dict(data["meta"]))
            if cal.val_scores.ndim != 1 or not cal.val_scores.size:
                raise ValueError("val_scores")
        else:
            raise KeyError("format")
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        raise OODError(f"{source}: not a microfp OOD calibration ({type(err).__name__}: {str(err)[:80]})") from None
    return cal


def save(path: str | Path, cal: OODCalibration) -> None:
    """Write the calibration as JSON, atomically."""
    write_json(path, to_dict(cal))


def load(path: str | Path) -> OODCalibration:
    """Read a calibration written by :func:`save`."""
    path = Path(path)
    if not path.is_file():
        raise OODError(f"{path}: no OOD calibration (run `dvc repro` for the fingerprint stage, or `dvc pull {path}`)")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise OODError(f"{path}: not a readable OOD calibration ({str(err)[:120]})") from None
    return from_dict(data, str(path))


def default_path(checkpoint: str | Path) -> Path:
    """Calibration file of a VAE checkpoint: ``models/vae/best.ckpt`` -> ``models/vae_ood.json``."""
    folder = Path(checkpoint).parent
    return folder.with_name(f"{folder.name}_ood.json")
