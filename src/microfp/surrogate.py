"""The surrogate: microstructure fingerprint -> 21-point stress-strain curve (paper section 2.4).

Stage ``surrogate`` (``microfp surrogate``)::

    data/fingerprints/<set>.parquet      VAE fingerprints (mu), one row per VE
    data/fingerprints_2pt/<set>.parquet  2-point-statistics fingerprints (baseline)
    data/ves/<set>/                      the VEs (texture-only baseline descriptor)
    data/curves/<set>.parquet            simulated sigma_xx at 21 strain points (converged VEs only)
        -> models/surrogate.ckpt         the VAE-fingerprint surrogate, normalisation included
        -> metrics/surrogate.json        MSE, MPa error, R^2, per-increment error, latency, speed-up
        -> plots/surrogate/              predicted vs simulated curves (Fig. 11), parity (Fig. 12)

The network is the paper's: Linear(|z|, 512) -> LeakyReLU -> Linear(512, 21) -> sigmoid, trained with
MSE on min-max normalised stresses (constants of the training split, saved in the checkpoint), Adam,
batch 128. The same network is trained on two baselines with the same split, so the metrics show what
the VAE fingerprint buys: the 2-point statistics fingerprint, and a texture-only descriptor that knows
the orientations but not the grain morphology (:func:`texture_descriptor`).

The train/test split is by VE (a VE is in one part only), seeded by ``seed``.
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
from torch import Tensor, nn

from microfp.atomic import atomic_output, save_figure, write_json
from microfp.config import Params, SurrogateParams, load_params
from microfp.cp import Load, MgParameters
from microfp.errors import MicrofpError
from microfp.model import write_checkpoint

N_POINTS = 21
"""Stress points per curve: 0 to 1% strain in 20 increments (paper section 2.3)."""
MPA = 1e6


class SurrogateError(MicrofpError):
    """Bad input to the surrogate (missing or inconsistent tables, wrong latent size)."""


# ---------------------------------------------------------------------------------------------
# Data: fingerprints joined with curves


def fingerprint_columns(frame: pd.DataFrame) -> list[str]:
    """The feature columns ``z_0 .. z_{d-1}`` of a fingerprint table, in order."""
    cols = [c for c in frame.columns if c.startswith("z_") and c[2:].isdigit()]
    return sorted(cols, key=lambda c: int(c[2:]))


def stress_columns(frame: pd.DataFrame) -> list[str]:
    """The sigma_xx columns (Pa) of a curve table (``microfp.simulate``), in strain order (21 in the paper)."""
    cols = sorted(c for c in frame.columns if c.startswith("sigma_xx_pa_"))
    if len(cols) < 2:
        raise SurrogateError(f"curve table has {len(cols)} sigma_xx_pa_* columns, expected one per strain point")
    return cols


def read_table(path: Path, what: str) -> pd.DataFrame:
    """A parquet table, or a one-line :class:`SurrogateError`."""
    if not path.is_file():
        raise SurrogateError(f"{path}: no {what} table (run `dvc repro` for the stage that makes it)")
    try:
        return pd.read_parquet(path)
    except Exception as err:  # noqa: BLE001 - pyarrow raises many types for a bad file
        raise SurrogateError(f"{path}: unreadable {what} table ({str(err).splitlines()[0][:160]})") from None


def join(fingerprints: pd.DataFrame, curves: pd.DataFrame, source: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of VEs that have both a fingerprint and a converged curve.

    Fingerprints are keyed by ``ve_id``, curves by ``ve_index`` (the same index of the VE in its set).
    Returns ``ve_ids`` (N,) int64, ``X`` (N, d) float32 fingerprints, ``Y`` (N, 21) float64 sigma_xx in Pa.
    VEs whose simulation did not converge are left out; VEs without a fingerprint are an error (the
    tables come from different stages and must describe the same VEs).
    """
    converged = curves[curves["converged"].astype(bool)] if "converged" in curves else curves
    zcols = fingerprint_columns(fingerprints)
    if not zcols:
        raise SurrogateError(f"{source}: fingerprint table has no z_0.. columns")
    fp = fingerprints.set_index("ve_id")
    missing = sorted(set(converged["ve_index"]) - set(fp.index))
    if missing:
        raise SurrogateError(
            f"{source}: {len(missing)} simulated VEs have no fingerprint (e.g. ve_id {missing[0]}); "
            "rerun `microfp fingerprint` for this set"
        )
    ids = converged["ve_index"].to_numpy(np.int64)
    x = fp.loc[ids, zcols].to_numpy(np.float32)
    y = converged[stress_columns(converged)].to_numpy(np.float64)
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise SurrogateError(f"{source}: NaN or infinite values among the fingerprints or curves")
    return ids, x, y


def split_by_ve(ve_ids: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of the train and test parts; each VE id lands in exactly one part.

    The assignment depends only on the set of ids and the seed (not on row order).
    """
    unique = np.unique(ve_ids)
    if unique.size < 2:
        raise SurrogateError(f"need at least 2 VEs with converged curves to split, got {unique.size}")
    n_test = min(max(1, round(test_fraction * unique.size)), unique.size - 1)
    test_ids = np.random.default_rng(seed).permutation(unique)[:n_test]
    is_test = np.isin(ve_ids, test_ids)
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)


@dataclass(frozen=True)
class MinMax:
    """Min-max scaling of each stress point to [0, 1] (paper section 2.3), Pa.

    ``lo`` and ``hi`` are (21,) arrays from the training split. A point with no spread (the zero
    strain point, where every stress is 0) maps to 0.
    """

    lo: np.ndarray
    hi: np.ndarray

    @classmethod
    def fit(cls, y: np.ndarray) -> "MinMax":
        return cls(y.min(axis=0), y.max(axis=0))

    @property
    def span(self) -> np.ndarray:
        return np.where(self.hi > self.lo, self.hi - self.lo, 1.0)

    def transform(self, y: np.ndarray) -> np.ndarray:
        return (y - self.lo) / self.span

    def inverse(self, y01: np.ndarray) -> np.ndarray:
        return y01 * self.span + self.lo


# ---------------------------------------------------------------------------------------------
# The network and its training


class SurrogateNet(nn.Module):
    """Linear(d, hidden) -> LeakyReLU -> Linear(hidden, 21) -> sigmoid: normalised sigma_xx."""

    def __init__(self, in_dim: int, hidden: int = 512, out_dim: int = N_POINTS) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.LeakyReLU(), nn.Linear(hidden, out_dim), nn.Sigmoid())

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def _lightning_module(net: SurrogateNet, s: SurrogateParams):  # noqa: ANN202 - local LightningModule
    import lightning as L

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net
            self.losses: list[float] = []

        def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
            x, y = batch
            loss = nn.functional.mse_loss(self.net(x), y)
            self.log("train_mse", loss, on_epoch=True, on_step=False, batch_size=len(x))
            return loss

        def on_train_epoch_end(self) -> None:
            self.losses.append(float(self.trainer.callback_metrics["train_mse"]))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=s.lr, weight_decay=s.weight_decay)

    return Module()


def fit(x: np.ndarray, y01: np.ndarray, s: SurrogateParams, seed: int) -> tuple[SurrogateNet, list[float]]:
    """Train a :class:`SurrogateNet` on fingerprints ``x`` (N, d) and normalised curves ``y01`` (N, P).

    Returns the network (eval mode) and the training MSE of every epoch.
    """
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from microfp.runtime import quiet_lightning

    quiet_lightning()  # no hardware lines or tips in the stage log
    L.seed_everything(seed, verbose=False)
    net = SurrogateNet(x.shape[1], s.hidden, y01.shape[1])
    module = _lightning_module(net, s)
    data = TensorDataset(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y01, dtype=torch.float32))
    loader = DataLoader(data, batch_size=s.batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
    trainer = L.Trainer(
        max_epochs=s.epochs,
        accelerator="cpu",  # a 512-unit MLP: the GPU's launch overhead would dominate
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    trainer.fit(module, loader)
    return net.eval(), module.losses


@torch.no_grad()
def predict01(net: SurrogateNet, x: np.ndarray) -> np.ndarray:
    """Normalised predictions (N, 21) for fingerprints ``x`` (N, d)."""
    return net(torch.tensor(x, dtype=torch.float32)).numpy().astype(np.float64)


# ---------------------------------------------------------------------------------------------
# Metrics


def curve_metrics(y_true: np.ndarray, y_pred: np.ndarray, norm: MinMax) -> dict[str, float]:
    """Errors of predicted curves, ``y_true``/``y_pred`` (N, 21) in Pa.

    ``mse_norm``: MSE of the min-max normalised stresses (the paper's 2.9e-4 train / 9.3e-4 test);
    ``mae_mpa`` and ``mae_mpa_std``: mean absolute error per VE (averaged over its 21 points) in MPa,
    mean and std over VEs (the paper's 2.75 +- 0.46 MPa); ``r2``: coefficient of determination over
    all points; ``mae_mpa_inc_k``: mean absolute error at strain increment k.
    """
    err_norm = norm.transform(y_pred) - norm.transform(y_true)
    abs_mpa = np.abs(y_pred - y_true) / MPA
    per_ve = abs_mpa.mean(axis=1)
    ss_res = float(np.sum((y_pred - y_true) ** 2))
    ss_tot = float(np.sum((y_true - y_true.mean()) ** 2))
    out = {
        "mse_norm": float(np.mean(err_norm**2)),
        "mae_mpa": float(per_ve.mean()),
        "mae_mpa_std": float(per_ve.std()),
        "max_abs_error_mpa": float(abs_mpa.max()),
        "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan"),
        "n_ves": float(len(y_true)),
    }
    out.update({f"mae_mpa_inc_{k:02d}": float(v) for k, v in enumerate(abs_mpa.mean(axis=0))})
    return out


def per_ve_mae_mpa(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """(N,) mean absolute error of each VE's curve over its points, MPa; ``y_*`` (N, P) in Pa."""
    return (np.abs(y_pred - y_true) / MPA).mean(axis=1)


def paired_bootstrap(mae_a: np.ndarray, mae_b: np.ndarray, seed: int, n_boot: int = 10_000) -> dict[str, float]:
    """Paired comparison of two predictors on the same test VEs: mean of ``mae_a - mae_b`` (N,) (MPa;
    negative = a is better) and its bootstrap 95 % interval (VEs resampled with replacement)."""
    d = np.asarray(mae_a, dtype=np.float64) - np.asarray(mae_b, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), (n_boot, len(d)))].mean(axis=1)
    lo, hi = np.quantile(means, [0.025, 0.975])
    return {"mae_diff_mpa": float(d.mean()), "mae_diff_ci95_lo": float(lo), "mae_diff_ci95_hi": float(hi)}


def constant_prediction(y_train: np.ndarray, n: int) -> np.ndarray:
    """The mean training curve for ``n`` VEs, (n, P): the baseline a fingerprint has to beat."""
    return np.broadcast_to(y_train.mean(axis=0), (n, y_train.shape[1])).copy()


# ---------------------------------------------------------------------------------------------
# Texture-only baseline descriptor


HCP_SLIP_FAMILIES = {"basal": slice(0, 3), "prismatic": slice(3, 6), "pyramidal_ca": slice(24, 30)}
"""Rows of damask's hP slip systems (``Schmid(N_slip='*')``: 3 basal, 3 prismatic, 6 pyramidal <a>,
12 first- and 6 second-order pyramidal <c+a>) for the Schmid-factor features."""


def texture_descriptor(grain_ids: np.ndarray, euler: np.ndarray, crystal: str) -> np.ndarray:
    """Orientation-only features of one hexagonal VE: (9,) float32.

    Volume-weighted mean of the outer product c (x) c of the crystal c axis in the sample frame (6
    independent components; sign-free, so invariant under the crystal symmetry) and the
    volume-weighted mean of the largest Schmid factor for uniaxial load along x in the basal,
    prismatic and pyramidal <c+a> families. It knows the texture but not grain size or shape, so it
    is the natural baseline for what the morphology in a fingerprint adds.
    """
    import damask

    if crystal != "hexagonal":
        raise SurrogateError(f"the texture-only baseline is defined for hexagonal VEs, got {crystal}")
    counts = np.bincount(grain_ids.ravel().astype(np.int64), minlength=len(euler)).astype(np.float64)
    w = counts / counts.sum()
    ori = damask.Orientation.from_Euler_angles(phi=euler.astype(np.float64), family="hexagonal", lattice="hP", c=MgParameters.c_over_a)
    c_axis = ori.to_frame(uvw=[0, 0, 1]).reshape(-1, 3)  # sample frame, unit length
    cc = np.einsum("g,gi,gj->ij", w, c_axis, c_axis)[np.triu_indices(3)]
    resolved = np.abs(ori.Schmid(N_slip="*")[..., 0, 0]).reshape(30, -1)  # (systems, G): P_xx
    schmid = [float(w @ resolved[rows].max(axis=0)) for rows in HCP_SLIP_FAMILIES.values()]
    return np.concatenate([cc, schmid]).astype(np.float32)


def texture_table(set_dir: Path) -> pd.DataFrame:
    """The texture-only descriptor of every VE of a set, in the fingerprint-table schema (z_0..z_8)."""
    from microfp import shards

    rows, ids = [], []
    for path in shards.shard_paths(set_dir):
        ves = shards.read_shard(path)
        for i in range(len(ves)):
            rows.append(texture_descriptor(ves.grain_ids[i], ves.grain_euler(i), ves.crystal))
            ids.append(int(ves.ve_index[i]))
    frame = pd.DataFrame(np.stack(rows), columns=[f"z_{k}" for k in range(len(rows[0]))])
    frame.insert(0, "ve_id", np.asarray(ids, dtype=np.int64))
    return frame


# ---------------------------------------------------------------------------------------------
# Checkpoint


def save_checkpoint(path: Path, net: SurrogateNet, norm: MinMax, meta: dict[str, Any]) -> None:
    """Weights, normalisation constants (Pa) and provenance, written atomically."""
    payload = {
        "format": "microfp-surrogate-1",
        "state_dict": net.state_dict(),
        "in_dim": net.net[0].in_features,
        "hidden": net.net[0].out_features,
        "out_dim": net.net[2].out_features,
        "norm_lo": norm.lo.tolist(),
        "norm_hi": norm.hi.tolist(),
        **meta,
    }
    write_checkpoint(payload, path)


def load_checkpoint(path: Path) -> tuple[SurrogateNet, MinMax, dict[str, Any]]:
    """The network, its normalisation and the stored metadata; one-line error for a bad file."""
    if not path.is_file():
        raise SurrogateError(f"{path}: no surrogate checkpoint (run `dvc repro surrogate` or `dvc pull`)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
        if payload.get("format") != "microfp-surrogate-1":
            raise KeyError("format")
        net = SurrogateNet(int(payload["in_dim"]), int(payload["hidden"]), int(payload["out_dim"]))
        net.load_state_dict(payload["state_dict"])
        norm = MinMax(np.asarray(payload["norm_lo"]), np.asarray(payload["norm_hi"]))
    except SurrogateError:
        raise
    except Exception as err:  # noqa: BLE001 - torch.load raises many types on a bad file
        raise SurrogateError(f"{path}: not a microfp surrogate checkpoint ({type(err).__name__})") from None
    return net.eval(), norm, payload


# ---------------------------------------------------------------------------------------------
# Plots


def strains(params: Params) -> np.ndarray:
    """The 21 applied strains eps_xx (0 .. simulate.strain) of the simulated load (:class:`microfp.cp.Load`)."""
    return Load(strain=params.simulate.strain, increments=params.simulate.increments).strains


def plot_curves(path: Path, eps: np.ndarray, y_true: np.ndarray, y_pred: np.ndarray, ids: np.ndarray, n: int = 6) -> None:
    """Predicted vs simulated curves of a few test VEs (paper Fig. 11), MPa."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for k in range(min(n, len(y_true))):
        line = ax.plot(eps * 100, y_true[k] / MPA, "-", lw=1.5, label=f"VE {ids[k]} simulated")[0]
        ax.plot(eps * 100, y_pred[k] / MPA, "--", lw=1.5, color=line.get_color(), label=f"VE {ids[k]} surrogate")
    ax.set_xlabel("strain eps_xx (%)")
    ax.set_ylabel("sigma_xx (MPa)")
    ax.set_title("Surrogate (dashed) vs crystal-plasticity simulation (solid), test VEs")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    save_figure(fig, path)


def plot_parity(path: Path, results: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """Parity plot of every test point (paper Fig. 12), one panel per fingerprint kind, MPa."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 4), squeeze=False)
    for ax, (kind, (y_true, y_pred)) in zip(axes[0], results.items()):
        t, p = y_true.ravel() / MPA, y_pred.ravel() / MPA
        lim = [min(t.min(), p.min()), max(t.max(), p.max())]
        ax.plot(lim, lim, "k-", lw=0.8)
        ax.scatter(t, p, s=4, alpha=0.5)
        ax.set_title(f"{kind}: test points")
        ax.set_xlabel("simulated sigma_xx (MPa)")
        ax.set_ylabel("predicted sigma_xx (MPa)")
    fig.tight_layout()
    save_figure(fig, path)


def write_parity_csv(path: Path, results: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """Every test point as DVC plot data: kind, simulated_mpa, predicted_mpa."""
    frames = [
        pd.DataFrame({"kind": kind, "simulated_mpa": t.ravel() / MPA, "predicted_mpa": p.ravel() / MPA})
        for kind, (t, p) in results.items()
    ]
    with atomic_output(path) as tmp:
        pd.concat(frames).to_csv(tmp, index=False, float_format="%.6g")


# ---------------------------------------------------------------------------------------------
# Latency


def _median_seconds(fn, repeats: int) -> float:  # noqa: ANN001 - any callable
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def measure_latency(net: SurrogateNet, x: np.ndarray, repeats: int = 50) -> dict[str, float]:
    """Seconds per VE of the surrogate alone: one VE at a time, and a batch of all ``x``."""
    single = _median_seconds(lambda: predict01(net, x[:1]), repeats)
    batched = _median_seconds(lambda: predict01(net, x), repeats) / len(x)
    return {"surrogate_single_s": single, "surrogate_batched_s_per_ve": batched}


# ---------------------------------------------------------------------------------------------
# Prediction for a new VE (microfp predict)


@dataclass
class Predictor:
    """A loaded surrogate with the VAE whose fingerprints it was trained on."""

    net: SurrogateNet
    norm: MinMax
    x_mean: np.ndarray
    x_std: np.ndarray
    vae: Any
    strains: np.ndarray
    crystal: str
    ood: Any = None  # microfp.ood.OODCalibration of the VAE's fingerprints, when the checkpoint has one

    @classmethod
    def load(cls, checkpoint: Path, vae_checkpoint: Path | None = None) -> "Predictor":
        from microfp.model import load_vae

        net, norm, meta = load_checkpoint(checkpoint)
        vae_path = Path(vae_checkpoint or meta.get("vae_checkpoint", ""))
        vae = load_vae(vae_path)
        if vae.cfg.latent_dim != net.net[0].in_features:
            raise SurrogateError(
                f"{vae_path}: latent_dim {vae.cfg.latent_dim}, but {checkpoint} takes fingerprints of size "
                f"{net.net[0].in_features}"
            )
        from microfp import ood

        calibration = ood.from_dict(meta["ood"], f"{checkpoint} (embedded OOD calibration)") if meta.get("ood") else None
        return cls(net, norm, np.asarray(meta["x_mean"]), np.asarray(meta["x_std"]), vae,
                   np.asarray(meta["strains"]), str(meta.get("crystal", "hexagonal")), calibration)

    @torch.no_grad()
    def fingerprint(self, field: np.ndarray) -> np.ndarray:
        """mu of the encoder for normalised Euler fields (B, 3, n, n, n) -> (B, latent_dim)."""
        n = self.vae.cfg.ve_size
        if field.shape[-3:] != (n, n, n):
            raise SurrogateError(f"VE is {field.shape[-1]}^3 voxels, the VAE was trained on {n}^3")
        return self.vae.encode(torch.as_tensor(field))[0].numpy()

    def curve_pa(self, z: np.ndarray) -> np.ndarray:
        """sigma_xx (B, 21) in Pa for fingerprints (B, d)."""
        return self.norm.inverse(predict01(self.net, (z - self.x_mean) / self.x_std))

    def predict_file(self, path: Path, crystal: str | None = None) -> np.ndarray:
        """Predicted curves (N, 21) in Pa of every VE in a shard, Dream3D or DAMASK file."""
        return self.curve_pa(self.fingerprint_file(path, crystal))

    def fingerprint_file(self, path: Path, crystal: str | None = None) -> np.ndarray:
        """Fingerprints (N, latent_dim) of every VE in a shard, Dream3D or DAMASK file."""
        return self.fingerprint(self.read_fields(path, crystal))

    def read_fields(self, path: Path, crystal: str | None = None) -> np.ndarray:
        """Normalised Euler fields (N, 3, n, n, n) of every VE in a shard, Dream3D or DAMASK file."""
        from microfp.formats import read_ve_file

        ves = read_ve_file(path, crystal=crystal)
        if ves.crystal != self.crystal:
            raise SurrogateError(
                f"{path}: {ves.crystal} VE, but the surrogate was trained on {self.crystal} VEs "
                "(the crystal-plasticity model is HCP Mg)"
            )
        return np.stack([ves.orientation_field(i) for i in range(len(ves))])


# ---------------------------------------------------------------------------------------------
# The stage


def _standardiser(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean, std = x.mean(axis=0), x.std(axis=0)
    return mean, np.where(std > 0, std, 1.0)


def run(
    params: Params,
    set_name: str,
    fingerprints: Path,
    twopoint: Path,
    ves: Path,
    curves: Path,
    vae_checkpoint: Path,
    out: Path,
    metrics: Path,
    plots: Path,
) -> dict[str, Any]:
    """Train the VAE-fingerprint surrogate and both baselines on one split; write all outputs."""
    s = params.surrogate
    curve_table = read_table(curves / f"{set_name}.parquet", "curve")
    tables = {
        "vae": read_table(fingerprints / f"{set_name}.parquet", "fingerprint"),
        "twopoint": read_table(twopoint / f"{set_name}.parquet", "2-point fingerprint"),
        "texture": texture_table(ves / set_name),
    }
    ids, _, y = join(tables["vae"], curve_table, str(fingerprints / f"{set_name}.parquet"))
    train_rows, test_rows = split_by_ve(ids, s.test_fraction, params.seed)
    norm = MinMax.fit(y[train_rows])
    eps = strains(params)
    if len(eps) != y.shape[1]:
        raise SurrogateError(
            f"{curves / f'{set_name}.parquet'}: {y.shape[1]} stress points per curve, params.yaml gives "
            f"{len(eps)} (simulate.increments + 1); rerun `microfp simulate`"
        )
    report: dict[str, Any] = {}
    detail: dict[str, dict[str, float]] = {}  # every metric, for the detail file and MLflow
    timings: dict[str, float] = {}  # wall-clock facts: the log and MLflow only (bit-reproducible metrics)
    test_mae: dict[str, np.ndarray] = {}
    parity: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    fitted: dict[str, tuple[SurrogateNet, dict[str, Any], np.ndarray]] = {}
    for kind, table in tables.items():
        kind_ids, x, _ = join(table, curve_table, kind)
        assert np.array_equal(kind_ids, ids), "fingerprint tables are joined in curve order"
        x_mean, x_std = _standardiser(x[train_rows])
        xs = (x - x_mean) / x_std
        t0 = time.perf_counter()
        net, losses = fit(xs[train_rows], norm.transform(y[train_rows]), s, params.seed)
        timings[f"{kind}_fit_s"] = time.perf_counter() - t0
        pred = norm.inverse(predict01(net, xs))
        train_m = curve_metrics(y[train_rows], pred[train_rows], norm)
        test_m = curve_metrics(y[test_rows], pred[test_rows], norm)
        detail[kind] = {
            "in_dim": float(x.shape[1]),
            "final_train_loss": losses[-1] if losses else float("nan"),
            **{f"train_{k}": v for k, v in train_m.items() if not k.startswith("mae_mpa_inc")},
            **{f"test_{k}": v for k, v in test_m.items()},
        }
        test_mae[kind] = per_ve_mae_mpa(y[test_rows], pred[test_rows])
        parity[kind] = (y[test_rows], pred[test_rows])
        fitted[kind] = (net, {"x_mean": x_mean.tolist(), "x_std": x_std.tolist()}, pred)
    const = constant_prediction(y[train_rows], len(test_rows))
    detail["constant"] = {f"test_{k}": v for k, v in curve_metrics(y[test_rows], const, norm).items()}
    test_mae["constant"] = per_ve_mae_mpa(y[test_rows], const)
    report.update(headline_metrics(detail, test_mae, params.seed))
    vae_net, vae_meta, vae_pred = fitted["vae"]
    plot_curves(plots / "curves.png", eps, y[test_rows], vae_pred[test_rows], ids[test_rows])
    save_checkpoint(
        out,
        vae_net,
        norm,
        {
            **vae_meta,
            "fingerprint": "vae",
            "set": set_name,
            "crystal": _set_crystal(ves / set_name),
            "latent_dim": params.latent_dim,
            "vae_checkpoint": str(vae_checkpoint),
            "strains": eps.tolist(),
            "train_ve_ids": ids[train_rows].tolist(),
            "test_ve_ids": ids[test_rows].tolist(),
            "ood": _embedded_ood(vae_checkpoint),
        },
    )
    timings.update(latency_report(out, vae_checkpoint, ves / set_name, tables["vae"], vae_net, ids))
    report["data"] = {"n_train": len(train_rows), "n_test": len(test_rows),
                      "n_simulated": len(curve_table), "n_converged": len(ids)}
    plot_parity(plots / "parity.png", parity)
    write_parity_csv(plots / "parity.csv", parity)
    write_detail_csv(plots / "per_increment.csv", eps, detail)
    write_json(metrics, report)
    _log_mlflow(params, set_name, {**report, "detail": detail, "timing": timings}, out)
    return {**report, "detail": detail, "latency": timings}


def headline_metrics(detail: dict[str, dict[str, float]], test_mae: dict[str, np.ndarray], seed: int) -> dict[str, Any]:
    """The few numbers of metrics/surrogate.json per predictor: test MAE +- std (MPa, over test VEs), R^2,
    and for the fingerprints the paired comparison with the texture-only descriptor on the same VEs."""
    out: dict[str, Any] = {}
    for kind, d in detail.items():
        out[kind] = {"test_mae_mpa": d["test_mae_mpa"], "test_mae_mpa_std": d["test_mae_mpa_std"], "test_r2": d["test_r2"]}
        if kind != "texture" and "texture" in test_mae:
            out[kind]["vs_texture"] = paired_bootstrap(test_mae[kind], test_mae["texture"], seed)
    return out


def write_detail_csv(path: Path, eps: np.ndarray, detail: dict[str, dict[str, float]]) -> None:
    """Test MAE (MPa) at each strain point per predictor: the per-increment detail as DVC plot data."""
    frame = pd.DataFrame({"strain": eps})
    for kind, d in detail.items():
        frame[kind] = [d[f"test_mae_mpa_inc_{k:02d}"] for k in range(len(eps))]
    with atomic_output(path) as tmp:
        frame.to_csv(tmp, index=False, float_format="%.6g")


def _embedded_ood(vae_checkpoint: Path) -> dict[str, Any] | None:
    """The VAE's OOD calibration (``models/vae_hcp_ood.json`` beside ``models/vae_hcp/``) for
    ``microfp predict``; None when the fingerprint stage did not write one."""
    from microfp import ood

    path = ood.default_path(vae_checkpoint)
    return ood.to_dict(ood.load(path)) if path.is_file() else None


def _set_crystal(set_dir: Path) -> str:
    from microfp import shards

    return str(shards.read_attrs(shards.shard_paths(set_dir)[0])["crystal"])


def latency_report(
    checkpoint: Path, vae_checkpoint: Path, set_dir: Path, fp: pd.DataFrame, net: SurrogateNet, ids: np.ndarray,
) -> dict[str, float]:
    """Measured seconds per VE: surrogate alone (single, batched) and end to end from a one-VE file
    (load + encode + predict). Wall-clock facts: logged and sent to MLflow, not written to metrics."""
    import tempfile

    from microfp import shards

    predictor = Predictor.load(checkpoint, vae_checkpoint)
    x = fp.set_index("ve_id").loc[ids, fingerprint_columns(fp)].to_numpy(np.float32)
    out = measure_latency(net, ((x - predictor.x_mean) / predictor.x_std).astype(np.float32))
    first = shards.read_shard(shards.shard_paths(set_dir)[0])
    with tempfile.TemporaryDirectory() as tmp:
        one = Path(tmp) / "one_ve.h5"
        shards.write_shard(one, first.select(0))
        predictor.predict_file(one)  # warm-up (imports, allocator)
        out["end_to_end_s"] = _median_seconds(lambda: predictor.predict_file(one), 5)
    return out


def _log_mlflow(params: Params, set_name: str, report: dict[str, Any], checkpoint: Path) -> None:
    from microfp.tracking import log_finished_run

    log_finished_run(
        "microfp-surrogate",
        "surrogate",
        {"set": set_name, "seed": params.seed, "latent_dim": params.latent_dim, **params.surrogate.model_dump()},
        report,
        {"checkpoint": str(checkpoint.resolve())},
    )


# ---------------------------------------------------------------------------------------------
# Commands


def surrogate_command(
    params: Annotated[Path, typer.Option(help="Parameter file.")] = Path("params.yaml"),
    set_name: Annotated[str, typer.Option("--set", help="Set whose VEs were simulated.")] = "hcp",
    fingerprints: Annotated[Path, typer.Option(help="Directory of VAE fingerprint tables.")] = Path("data/fingerprints"),
    twopoint: Annotated[Path, typer.Option(help="Directory of 2-point fingerprint tables.")] = Path("data/fingerprints_2pt"),
    ves: Annotated[Path, typer.Option(help="Directory of the sets' shards.")] = Path("data/ves"),
    curves: Annotated[Path, typer.Option(help="Directory of simulated curve tables.")] = Path("data/curves"),
    vae: Annotated[Path, typer.Option(help="VAE checkpoint the fingerprints came from.")] = Path("models/vae_hcp/best.ckpt"),
    out: Annotated[Path, typer.Option(help="Surrogate checkpoint to write.")] = Path("models/surrogate.ckpt"),
    metrics: Annotated[Path, typer.Option(help="Metrics JSON.")] = Path("metrics/surrogate.json"),
    plots: Annotated[Path, typer.Option(help="Plot directory.")] = Path("plots/surrogate"),
) -> None:
    """Train the fingerprint -> stress-strain surrogate (paper section 2.4) and its baselines.

    Fits Linear(|z|, 512) -> LeakyReLU -> Linear(512, 21) -> sigmoid on min-max normalised sigma_xx
    of the converged simulations, split by VE (surrogate.test_fraction), once on the VAE
    fingerprints and once each on the 2-point-statistics fingerprints and a texture-only descriptor.
    Writes the VAE surrogate checkpoint, metrics (MSE, MPa error, R^2, per-increment error, latency,
    speed-up over simulation) and plots.
    """
    p = load_params(params)
    report = run(p, set_name, fingerprints, twopoint, ves, curves, vae, out, metrics, plots)
    typer.echo(f"{report['data']['n_test']} test VEs, {report['data']['n_train']} training VEs")
    for kind in ("vae", "twopoint", "texture", "constant"):
        r = report[kind]
        line = f"{kind:9s} test MAE {r['test_mae_mpa']:.2f} +- {r['test_mae_mpa_std']:.2f} MPa, R^2 {r['test_r2']:.3f}"
        if "vs_texture" in r:
            c = r["vs_texture"]
            line += f"; minus texture-only {c['mae_diff_mpa']:+.2f} MPa [{c['mae_diff_ci95_lo']:+.2f}, {c['mae_diff_ci95_hi']:+.2f}]"
        typer.echo(line)
    lat = report["latency"]
    typer.echo(f"latency: surrogate {lat['surrogate_single_s']*1e3:.3f} ms/VE single, "
               f"end to end {lat['end_to_end_s']*1e3:.0f} ms/VE")


def predict_command(
    ve_file: Annotated[Path, typer.Argument(help="A VE: microfp shard (.h5), Dream3D (.dream3d) or DAMASK grid (.vti).")],
    checkpoint: Annotated[Path, typer.Option(help="Surrogate checkpoint.")] = Path("models/surrogate.ckpt"),
    vae: Annotated[Optional[Path], typer.Option(help="VAE checkpoint (default: the one the surrogate was trained with).")] = None,
    crystal: Annotated[Optional[str], typer.Option(help="Crystal family of a Dream3D/DAMASK file (default: from the file).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Write the curve(s) as CSV instead of printing.")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="Also plot the curve(s) to this PNG.")] = None,
) -> None:
    """Predict the uniaxial stress-strain curve (sigma_xx in MPa at 21 strains) of a VE.

    Encodes the VE with the VAE (fingerprint = mu) and evaluates the surrogate; no simulation.
    Also says, on stderr, how far each VE lies from the training VEs, by its fingerprint and by its
    texture and grain-boundary density (distance, percentile among the validation VEs), and warns
    when either lies beyond what 99% of the validation VEs reach: the curve is an extrapolation.
    """
    predictor = Predictor.load(checkpoint, vae)
    fields = predictor.read_fields(ve_file, crystal)
    z = predictor.fingerprint(fields)
    curves = predictor.curve_pa(z) / MPA
    _report_ood(predictor, z, fields, checkpoint)
    eps = predictor.strains
    table = pd.DataFrame({"strain": eps, **{f"ve_{i}_sigma_xx_mpa": c for i, c in enumerate(curves)}})
    if out is not None:
        with atomic_output(out) as tmp:
            table.to_csv(tmp, index=False, float_format="%.6g")
        typer.echo(f"wrote {out}")
    else:
        typer.echo(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    if plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 4))
        for i, c in enumerate(curves):
            ax.plot(eps * 100, c, label=f"VE {i}")
        ax.set_xlabel("strain eps_xx (%)")
        ax.set_ylabel("predicted sigma_xx (MPa)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        save_figure(fig, plot)


def _report_ood(predictor: Predictor, z: np.ndarray, fields: np.ndarray, checkpoint: Path) -> None:
    """One stderr line per VE: per OOD check the distance and percentile among the validation VEs,
    and a warning naming the checks that fire."""
    import sys

    if predictor.ood is None:
        print(f"microfp: note: {checkpoint} has no OOD calibration (rerun `dvc repro surrogate`); "
              "no out-of-distribution check", file=sys.stderr)
        return
    checks = list(predictor.ood.checks)
    if "microstructure" not in checks:
        print(f"microfp: note: the OOD calibration in {checkpoint} checks the fingerprint only (rerun `dvc repro` "
              "for the texture and grain-boundary check)", file=sys.stderr)
    scores = predictor.ood.score(z, fields)
    for i in range(len(z)):
        parts = [f"{name} distance {scores[f'ood_{name}_distance'][i]:.3g} (percentile {scores[f'ood_{name}_percentile'][i]:.0f})"
                 for name in checks]
        fired = [name for name in checks if scores[f"ood_{name}_flag"][i]]
        verdict = (f"WARNING: outside the training distribution ({' and '.join(fired)} check), the curve is an extrapolation"
                   if scores["ood_flag"][i] else "within the training distribution")
        print(f"VE {i}: OOD {', '.join(parts)} among the validation VEs: {verdict}", file=sys.stderr)
