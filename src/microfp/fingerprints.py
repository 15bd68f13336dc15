"""Fingerprints of VEs: the VAE's ``mu`` and a classical 2-point-statistics baseline (``fingerprint`` stage).

Stage ``fingerprint`` (``microfp fingerprint``)::

    models/vae/best.ckpt, data/ves/<set>/shard-*.h5 (every set), params.yaml
        -> data/fingerprints/<set>.parquet       VAE fingerprints (mu of the encoder, paper section 2.2)
        -> data/fingerprints_2pt/<set>.parquet   2-point statistics reduced by PCA to latent_dim

Both tables have the same schema, one row per VE, in shard order:

==============  ========  ==================================================================
column          type      meaning
==============  ========  ==================================================================
``ve_id``       int64     index of the VE within its set (``ve_index`` of the shard)
``set``         string    set name (the folder under data/ves)
``z_0..z_{k-1}`` float32  the fingerprint, k = ``latent_dim``
``esd_mean``    float64   mean equivalent sphere diameter of the VE's grains, measured from its
                          grain map (length units)
``n_grains``    int64     number of grains
``texture``     string    texture label of the set (random, brass, copper, cube, goss)
``esd_target``  float64   ESD mean the VE was drawn from (length units)
``crystal``     string    cubic or hexagonal
==============  ========  ==================================================================

2-point baseline (what PyMKS does for orientation fields, with a symmetry-aware local state): each
voxel's orientation is described by crystal-symmetry-invariant harmonic tensors, so that symmetry-
equivalent orientations give the same local state and the fundamental-zone boundary is no
discontinuity (normalised Euler angles are not). Cubic (432): the l = 4 harmonic part of
``sum_i g_i (x) g_i (x) g_i (x) g_i`` over the three crystal axes ``g_i`` (9 channels); hexagonal (622):
the l = 2 part of ``c (x) c`` (5 channels) and ``Re (a + i b)^(x)6`` (l = 6, 13 channels). These are the
lowest-order symmetrised generalised spherical harmonics, written as tensors. The periodic
autocorrelation of every channel, ``f (*) f (r) = IFFT(|FFT f|^2) / n^3`` (raw, not mean-subtracted, so it
also holds the texture), is cropped to ``|r_i| <= evaluate.twopoint_cutoff`` length units and the
concatenation is reduced with a PCA fitted on (up to ``evaluate.twopoint_max_fit``) training VEs to
``latent_dim`` components.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import numpy as np
import torch
import typer

from microfp import ood
from microfp.config import Params, load_params
from microfp.errors import MicrofpError
from microfp.harmonics import local_state
from microfp.model import load_vae
from microfp.runtime import pick_device
from microfp.setdata import DEFAULT_DATA, SetBatch, find_sets, iter_set_batches
from microfp.tables import DESCRIPTOR_COLUMNS, latent_columns, make_table, read_fingerprints, write_table
from microfp.volumes import grain_esd

__all__ = [
    "DESCRIPTOR_COLUMNS",
    "TwoPointPCA",
    "autocorrelations",
    "fingerprint",
    "fingerprint_command",
    "latent_columns",
    "local_state",
    "read_fingerprints",
    "twopoint_features",
    "write_table",
]

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Symmetry-aware local state and 2-point statistics


def window_voxels(params: Params) -> int:
    """Half-width of the correlation window in voxels, at most (n - 1) // 2."""
    w = int(round(params.evaluate.twopoint_cutoff / params.resolution))
    return max(1, min(w, (params.ve_size - 1) // 2))


def autocorrelations(fields: torch.Tensor, window: int) -> torch.Tensor:
    """Periodic autocorrelation of each channel, cropped to ``|r_i| <= window``.

    ``fields`` ``(B, C, n, n, n)`` -> ``(B, C, 2w+1, 2w+1, 2w+1)`` with ``r = 0`` at the centre:
    ``A(r) = (1/n^3) sum_x f(x) f(x + r)`` (FFT, any device).
    """
    n = fields.shape[-3:]
    spec = torch.fft.rfftn(fields, dim=(-3, -2, -1))
    corr = torch.fft.irfftn(spec.real.square() + spec.imag.square(), s=n, dim=(-3, -2, -1)) / float(np.prod(n))
    for d, size in zip((-3, -2, -1), n):
        idx = torch.arange(-window, window + 1, device=fields.device) % size
        corr = corr.index_select(d, idx)
    return corr


def twopoint_features(batch: SetBatch, params: Params, device: torch.device) -> np.ndarray:
    """``(B, F)`` float32 2-point statistics of a batch of VEs (before PCA)."""
    fields = []
    for gids, euler in zip(batch.grain_ids, batch.euler):
        state = local_state(euler, batch.crystal).astype(np.float32)  # per grain, then expanded
        fields.append(np.moveaxis(state[gids], -1, 0))
    x = torch.from_numpy(np.stack(fields)).to(device)
    return autocorrelations(x, window_voxels(params)).flatten(1).cpu().numpy()


class TwoPointPCA:
    """PCA of the 2-point features to ``k`` components, fitted on training VEs; with fewer VEs (or
    features) than ``k``, the missing components are 0 (and the stage says so)."""

    def __init__(self, k: int, seed: int) -> None:
        self.k, self.seed = k, seed
        self.pca: Any = None

    def fit(self, features: np.ndarray) -> "TwoPointPCA":
        from sklearn.decomposition import PCA

        n_comp = min(self.k, features.shape[0], features.shape[1])
        solver = "full" if max(features.shape) <= 5000 else "randomized"
        self.pca = PCA(n_components=n_comp, svd_solver=solver, random_state=self.seed).fit(features)
        return self

    def transform(self, features: np.ndarray) -> np.ndarray:
        z = np.zeros((features.shape[0], self.k), dtype=np.float32)
        z[:, : self.pca.n_components_] = self.pca.transform(features)
        return z


# ---------------------------------------------------------------------------------------------
# Tables


def descriptors(batch: SetBatch) -> dict[str, np.ndarray]:
    """Generator descriptors of a batch: measured mean ESD, grain count, texture, target ESD, crystal."""
    b = len(batch.ve_id)
    esd = [float(e[e > 0].mean()) for e in (grain_esd(g, batch.resolution) for g in batch.grain_ids)]
    return {
        "esd_mean": np.asarray(esd, dtype=np.float64),
        "n_grains": batch.n_grains.astype(np.int64),
        "texture": np.full(b, batch.texture, dtype=object),
        "esd_target": batch.esd_target.astype(np.float64),
        "crystal": np.full(b, batch.crystal, dtype=object),
    }


def _set_crystal(set_dir: Path) -> str:
    from microfp.shards import read_attrs, shard_paths

    return str(read_attrs(shard_paths(set_dir)[0]).get("crystal", "cubic"))


# ---------------------------------------------------------------------------------------------
# The stage


@torch.no_grad()
def fingerprint(
    params: Params,
    checkpoint: str | Path = "models/vae/best.ckpt",
    data: str | Path = DEFAULT_DATA,
    out: str | Path = "data/fingerprints",
    out_2pt: str | Path = "data/fingerprints_2pt",
    ood_out: str | Path | None = None,
    val_set: str = "val",
) -> dict[str, int]:
    """Write the VAE and 2-point fingerprint tables of every set; returns VEs per set.

    With ``ood_out``, also the OOD calibration of the VAE (:mod:`microfp.ood`): its two checks (the
    fingerprints, and microstructure descriptors of the orientation fields) fitted on
    ``evaluate.train_set``, calibrated on ``val_set`` (which must be among the sets), with the crystal
    family, resolution and ve_size the model expects.
    """
    t0 = time.time()
    ev = params.evaluate
    device = pick_device(ev.device)
    data, out, out_2pt = Path(data), Path(out), Path(out_2pt)
    sets = find_sets(data, ev.sets)
    if ev.train_set not in sets:
        find_sets(data, [ev.train_set])  # one-line error naming the missing training shards
        sets = [ev.train_set] + sets
    if ood_out is not None and val_set not in sets:
        find_sets(data, [val_set])
        sets = sets + [val_set]
    vae = load_vae(checkpoint, expect=params, device=device)
    k = params.latent_dim

    # 2-point PCA per crystal family (the local state differs): fitted on the first twopoint_max_fit
    # training VEs; a family that the training set does not have (hcp) gets a PCA of its own first set.
    pcas: dict[str, TwoPointPCA] = {}
    # The features of the fit VEs, kept to be projected in the table loop below rather than computed
    # twice: set name -> (ve_id, features) per batch (the fit reads the same batches in the same order).
    fitted: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}

    def pca_for(family: str, set_name: str) -> TwoPointPCA:
        if family not in pcas:
            fitted[set_name] = [(b.ve_id, twopoint_features(b, params, device))
                                for b in iter_set_batches(data / set_name, ev.batch_size, ev.twopoint_max_fit, params.ve_size)]
            fit = np.concatenate([f for _, f in fitted[set_name]])
            pcas[family] = pca = TwoPointPCA(k, params.seed).fit(fit)
            log.info(f"2-point baseline ({family}): {fit.shape[1]} features per VE (window +-{window_voxels(params)} "
                 f"voxels), PCA on {fit.shape[0]} {set_name} VEs, {pca.pca.n_components_} of {k} components"
                 + ("" if pca.pca.n_components_ == k else " (the rest are 0: fewer fit VEs than latent_dim)"))
        return pcas[family]

    pca_for(_set_crystal(data / ev.train_set), ev.train_set)

    counts: dict[str, int] = {}
    vae_z: dict[str, np.ndarray] = {}
    micro: dict[str, np.ndarray] = {}  # input-space descriptors of the OOD check (microfp.ood)
    for name in sets:
        ids, zs, z2s, descs, ms = [], [], [], [], []
        for i, batch in enumerate(iter_set_batches(data / name, ev.batch_size, None, params.ve_size)):
            mu = vae.encode(batch.x.to(device))[0]
            zs.append(mu.float().cpu().numpy())
            if ood_out is not None:
                ms.append(ood.microstructure_descriptor(batch.x.numpy(), batch.crystal))
            pca = pca_for(batch.crystal, name)
            kept = fitted.get(name, [])
            if i < len(kept) and np.array_equal(kept[i][0], batch.ve_id):
                feats = kept[i][1]
            else:
                feats = twopoint_features(batch, params, device)
            z2s.append(pca.transform(feats))
            ids.append(batch.ve_id)
            descs.append(descriptors(batch))
        ve_id = np.concatenate(ids)
        desc = {key: np.concatenate([d[key] for d in descs]) for key in DESCRIPTOR_COLUMNS}
        write_table(make_table(name, ve_id, np.concatenate(zs), desc), out / f"{name}.parquet")
        write_table(make_table(name, ve_id, np.concatenate(z2s), desc), out_2pt / f"{name}.parquet")
        counts[name] = len(ve_id)
        fitted.pop(name, None)  # (B, F) float32 per batch: free it once the set is written
        vae_z[name] = np.concatenate(zs)
        if ms:
            micro[name] = np.concatenate(ms)
        log.info(f"{name}: {len(ve_id)} VEs")
    if ood_out is not None:
        write_ood(ood_out, vae_z, micro, params, ev.train_set, val_set, _set_crystal(data / ev.train_set), checkpoint)
    log.info(f"{sum(counts.values())} VEs of {len(counts)} sets in {time.time() - t0:.1f} s on {device}; "
         f"wrote {out}/ and {out_2pt}/")
    return counts


def write_ood(path: str | Path, z: dict[str, np.ndarray], micro: dict[str, np.ndarray], params: Params,
              train_set: str, val_set: str, crystal: str, checkpoint: str | Path) -> None:
    """Fit the OOD calibration (both checks, :mod:`microfp.ood`) on the ``train_set`` fingerprints ``z``
    and microstructure descriptors ``micro``, calibrate on ``val_set``; write it, log the share of
    every set flagged per check and combined."""
    def both(name: str) -> dict[str, np.ndarray]:
        return {"fingerprint": z[name], "microstructure": micro[name]}

    cal = ood.fit(both(train_set), both(val_set), {
        "crystal": crystal, "resolution": params.resolution, "ve_size": params.ve_size,
        "latent_dim": params.latent_dim, "train_set": train_set, "val_set": val_set, "checkpoint": str(checkpoint),
    })
    ood.save(path, cal)
    shares = []
    for name in z:
        s = cal.score_descriptors(both(name))
        shares.append(f"{name} {s['ood_flag'].mean():.0%} ({s['ood_fingerprint_flag'].mean():.0%}/"
                      f"{s['ood_microstructure_flag'].mean():.0%})")
    log.info(f"OOD calibration ({train_set} -> {val_set}, threshold {cal.threshold:.3g}) written to {path}; flagged "
         "(fingerprint/microstructure check): " + ", ".join(shares))


def fingerprint_command(
    params: Annotated[Path, typer.Option("--params", "-p", help="parameter file (params.yaml or configs/paper.yaml)")] = Path("params.yaml"),
    checkpoint: Annotated[Path, typer.Option(help="trained VAE checkpoint")] = Path("models/vae/best.ckpt"),
    data: Annotated[Path, typer.Option(help="directory of the sets, each a folder of shard-*.h5")] = DEFAULT_DATA,
    out: Annotated[Path, typer.Option(help="directory of the VAE fingerprint tables <set>.parquet")] = Path("data/fingerprints"),
    out_2pt: Annotated[Path, typer.Option("--out-2pt", help="directory of the 2-point baseline tables")] = Path("data/fingerprints_2pt"),
    sets: Annotated[Optional[list[str]], typer.Option("--sets", help="sets to fingerprint (repeat) (default: evaluate.sets)")] = None,
    train_set: Annotated[Optional[str], typer.Option(help="set the 2-point PCA is fitted on (default: evaluate.train_set)")] = None,
    ood_out: Annotated[Optional[Path], typer.Option(help="also write the VAE's OOD calibration JSON here (fitted on the train set)")] = None,
    val_set: Annotated[str, typer.Option(help="set the OOD calibration is calibrated on (not trained on)")] = "val",
) -> None:
    """Fingerprint every VE of every set: the encoder's mu, and a 2-point-statistics baseline.

    Writes data/fingerprints/<set>.parquet (ve_id, set, z_0..z_{latent_dim-1}, esd_mean measured from
    the grain map, n_grains, texture, esd_target, crystal) and data/fingerprints_2pt/<set>.parquet with
    the same columns, where z_* are the symmetry-aware periodic 2-point autocorrelations of the
    orientation field reduced by a PCA fitted on the train set to latent_dim components. With
    --ood-out, also the out-of-distribution calibration of the VAE (models/vae_ood.json), which
    `microfp fingerprint-volume` and `microfp predict` use.
    """
    p = load_params(params)
    overrides = {k: v for k, v in (("sets", sets), ("train_set", train_set)) if v}
    if overrides:  # e.g. the hexagonal VAE fingerprints only the hcp sets, its PCA fitted on hcp
        p = p.model_copy(update={"evaluate": p.evaluate.model_copy(update=overrides)})
    fingerprint(p, checkpoint=checkpoint, data=data, out=out, out_2pt=out_2pt, ood_out=ood_out, val_set=val_set)
