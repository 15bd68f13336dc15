"""Out-of-distribution (OOD) score of fingerprints: is a VE like the ones the model was trained on?

The score of a fingerprint ``z`` (latent_dim,) is its Mahalanobis distance to the training
fingerprints, ``d(z) = sqrt((z - m)^T S^-1 (z - m))``, with ``m`` the mean and ``S`` the Ledoit-Wolf
shrunk covariance of the training fingerprints (full rank even with fewer VEs than dimensions). It is
calibrated on the validation set, which the VAE did not train on: the percentile of ``d`` among the
validation distances is reported, and a fingerprint is flagged when ``d`` exceeds their 99th
percentile (so about 1 % of in-distribution VEs are flagged, by construction).

The calibration is a small JSON file written by the ``fingerprint`` stages beside the model
(``models/vae_ood.json``, ``models/vae_hcp_ood.json``; a DVC output, so ``dvc pull`` brings it). It
also records what a volume must be turned into for this model: ``crystal`` family, ``resolution``
(length units per voxel) and ``ve_size``. The surrogate checkpoint embeds the hexagonal one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from microfp.atomic import write_json
from microfp.errors import MicrofpError

__all__ = ["FLAG_PERCENTILE", "OODCalibration", "OODError", "default_path", "fit", "load", "save"]

FORMAT = "microfp-ood-1"
FLAG_PERCENTILE = 99.0
"""Fingerprints farther than this percentile of the validation distances are flagged."""


class OODError(MicrofpError):
    """A missing or unreadable OOD calibration file; one line."""


@dataclass
class OODCalibration:
    """Mahalanobis model of the training fingerprints, calibrated on validation fingerprints.

    ``mean`` (d,), ``precision`` (d, d) inverse shrunk covariance, ``val_distances`` (n_val,) sorted
    validation distances, ``threshold`` their ``FLAG_PERCENTILE``-th percentile, ``meta`` what the
    model expects (crystal, resolution, ve_size, latent_dim) and where the fingerprints came from.
    """

    mean: np.ndarray
    precision: np.ndarray
    val_distances: np.ndarray
    threshold: float
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def latent_dim(self) -> int:
        return int(self.mean.shape[0])

    def distance(self, z: np.ndarray) -> np.ndarray:
        """Mahalanobis distances (N,) of fingerprints ``z`` (N, d) to the training fingerprints."""
        z = np.atleast_2d(np.asarray(z, dtype=np.float64))
        if z.shape[1] != self.latent_dim:
            raise OODError(f"fingerprints have {z.shape[1]} values, the OOD calibration {self.latent_dim}")
        diff = z - self.mean
        return np.sqrt(np.maximum(np.einsum("ni,ij,nj->n", diff, self.precision, diff), 0.0))

    def percentile(self, distance: np.ndarray) -> np.ndarray:
        """Percent (N,) of validation fingerprints at or below each distance, 0..100."""
        rank = np.searchsorted(self.val_distances, np.asarray(distance, dtype=np.float64), side="right")
        return 100.0 * rank / self.val_distances.size

    def score(self, z: np.ndarray) -> dict[str, np.ndarray]:
        """``ood_distance``, ``ood_percentile`` and ``ood_flag`` (> threshold) of fingerprints (N, d)."""
        d = self.distance(z)
        return {"ood_distance": d, "ood_percentile": self.percentile(d), "ood_flag": d > self.threshold}


def fit(train_z: np.ndarray, val_z: np.ndarray, meta: dict[str, Any] | None = None) -> OODCalibration:
    """Fit on training fingerprints ``train_z`` (N, d), calibrate on validation ``val_z`` (M, d)."""
    from sklearn.covariance import LedoitWolf

    train_z = np.asarray(train_z, dtype=np.float64)
    val_z = np.asarray(val_z, dtype=np.float64)
    if train_z.ndim != 2 or train_z.shape[0] < 2 or val_z.ndim != 2 or val_z.shape[0] < 1:
        raise OODError(f"OOD calibration needs >= 2 training and >= 1 validation fingerprints, got {train_z.shape[0]} and {val_z.shape[0]}")
    lw = LedoitWolf().fit(train_z)
    cal = OODCalibration(lw.location_, lw.precision_, np.zeros(1), 0.0, dict(meta or {}))
    dist = np.sort(cal.distance(val_z))
    cal.val_distances = dist
    cal.threshold = float(np.percentile(dist, FLAG_PERCENTILE))
    cal.meta.update(n_train=int(train_z.shape[0]), n_val=int(val_z.shape[0]), method="mahalanobis-ledoit-wolf",
                    flag_percentile=FLAG_PERCENTILE, train_spread=spread(train_z))
    return cal


def spread(z: np.ndarray) -> float:
    """RMS Euclidean distance of fingerprints ``z`` (N, d) to their mean (fingerprint units)."""
    z = np.asarray(z, dtype=np.float64)
    return float(np.sqrt(((z - z.mean(axis=0)) ** 2).sum(axis=1).mean()))


def to_dict(cal: OODCalibration) -> dict[str, Any]:
    """JSON-ready form (also embedded in the surrogate checkpoint)."""
    return {"format": FORMAT, "mean": cal.mean.tolist(), "precision": cal.precision.tolist(),
            "val_distances": cal.val_distances.tolist(), "threshold": cal.threshold, "meta": cal.meta}


def from_dict(data: Any, source: str) -> OODCalibration:
    """Inverse of :func:`to_dict`; one-line :class:`OODError` when it is not a calibration."""
    try:
        if data.get("format") != FORMAT:
            raise KeyError("format")
        cal = OODCalibration(np.asarray(data["mean"], np.float64), np.asarray(data["precision"], np.float64),
                             np.asarray(data["val_distances"], np.float64), float(data["threshold"]), dict(data["meta"]))
        d = cal.mean.shape
        if len(d) != 1 or cal.precision.shape != d * 2 or cal.val_distances.ndim != 1 or not cal.val_distances.size:
            raise ValueError("shapes")
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
