"""Latent-space analysis (paper section 3.3): PCA, spectral clustering, linear paths (``analyse`` stage).

Stage ``analyse`` (``microfp analyse``)::

    data/fingerprints/<set>.parquet, data/fingerprints_2pt/<set>.parquet, models/vae/best.ckpt,
    data/ves/<interpolation_set>, params.yaml
        -> metrics/latent.json                   {vae: {...}, twopoint: {...}, interpolation: {...}}
        -> plots/latent/explained_variance.{csv,png}
        -> plots/latent/pca_<method>.{csv,png}   edge-case sets over the training cloud (Figs. 8-10)
        -> plots/latent/interpolation.png        decoded linear path between two VEs (eq. 6, Fig. 9)

For each method (``vae`` = the encoder's mu, ``twopoint`` = the 2-point baseline of
:mod:`microfp.fingerprints`):

* a PCA is fitted on up to ``evaluate.pca_max_fit`` training fingerprints (random subset, ``seed``);
  ``pc2_explained`` / ``pc3_explained`` and ``n_components_90`` (components for 90 % of the variance)
  summarise its curve;
* every clustering problem of ``evaluate.cluster_groups`` (set -> class) is clustered with scikit-learn's
  spectral clustering (k-NN affinity, k = number of sets) on the first three principal components,
  and scored with the best one-to-one matching of clusters to classes (Hungarian algorithm,
  :func:`matched_accuracy`): ``<group>_accuracy``, per class ``<group>_recall_<set>`` and
  ``<group>_chance``, the mean matched accuracy of random labellings with the same class sizes (what
  "no structure" scores; it is above 1/k for small sets).

The paper reports 96.5 % for the four textures, 100 % recall of small grains in the three-class
morphology problem and 53 % (chance) for large vs elongated.
"""

from __future__ import annotations

import io
import logging
import time
import warnings
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import pandas as pd
import torch
import typer

from microfp.atomic import save_figure, write_json, write_text
from microfp.config import Params, load_params
from microfp.errors import MicrofpError
from microfp.model import load_vae
from microfp.rotations import euler_to_quaternion, phi4
from microfp.runtime import pick_device
from microfp.setdata import DEFAULT_DATA, iter_set_batches
from microfp.shards import EULER_SCALE
from microfp.tables import latent_columns, read_fingerprints
from microfp.tracking import log_mlflow

__all__ = [
    "METHODS",
    "analyse",
    "analyse_command",
    "chance_accuracy",
    "cluster_problem",
    "fit_pca",
    "interpolate",
    "matched_accuracy",
    "spectral_labels",
]

METHODS = {"vae": "data/fingerprints", "twopoint": "data/fingerprints_2pt"}


log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Clustering and its scoring


def matched_accuracy(true: np.ndarray, pred: np.ndarray) -> tuple[float, dict[Any, float]]:
    """Accuracy of cluster labels ``pred`` against classes ``true`` under the one-to-one matching of
    clusters to classes that maximises it (Hungarian algorithm, ``linear_sum_assignment``).

    Works for any label values and for different numbers of clusters and classes (unmatched samples
    count as wrong). Returns (accuracy, recall per true class).
    """
    from scipy.optimize import linear_sum_assignment
    from sklearn.metrics.cluster import contingency_matrix

    true, pred = np.asarray(true), np.asarray(pred)
    if true.shape != pred.shape or true.ndim != 1 or len(true) == 0:
        raise MicrofpError(f"labels must be two non-empty 1-D arrays of equal length, got {true.shape} and {pred.shape}")
    c = contingency_matrix(true, pred)  # C[i, j]: samples of class classes[i] in cluster j (sorted labels)
    classes = np.unique(true)
    rows, cols = linear_sum_assignment(c, maximize=True)
    hits = np.zeros(len(classes))
    hits[rows] = c[rows, cols]
    recall = {cls: float(hits[i] / c[i].sum()) for i, cls in enumerate(classes)}
    return float(hits.sum() / len(true)), recall


def chance_accuracy(true: np.ndarray, n_clusters: int, seed: int = 0, trials: int = 200) -> float:
    """Mean matched accuracy of random cluster labellings (with the class sizes of ``true``, shuffled):
    the score of a clustering that has found no structure."""
    rng = np.random.default_rng(seed)
    true = np.asarray(true)
    _, sizes = np.unique(true, return_counts=True)
    base = np.repeat(np.arange(len(sizes)) % n_clusters, sizes)
    return float(np.mean([matched_accuracy(true, rng.permutation(base))[0] for _ in range(trials)]))


def spectral_labels(x: np.ndarray, k: int, seed: int, n_neighbors: int = 10) -> np.ndarray:
    """Spectral clustering (scikit-learn) of the rows of ``x`` into ``k`` clusters, k-NN affinity."""
    from sklearn.cluster import SpectralClustering

    n = len(x)
    if n <= k:
        raise MicrofpError(f"spectral clustering needs more samples ({n}) than clusters ({k})")
    model = SpectralClustering(
        n_clusters=k, affinity="nearest_neighbors", n_neighbors=max(2, min(n_neighbors, n - 1)),
        assign_labels="cluster_qr", random_state=seed,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "graph is not fully connected": expected for separated clusters
        return model.fit_predict(np.asarray(x, dtype=np.float64))


def cluster_problem(x: np.ndarray, labels: np.ndarray, seed: int, n_neighbors: int = 10) -> dict[str, float]:
    """Cluster ``x`` into as many clusters as ``labels`` has classes and score it: ``accuracy``,
    ``chance`` and ``recall_<class>``."""
    k = len(np.unique(labels))
    pred = spectral_labels(x, k, seed, n_neighbors)
    acc, recall = matched_accuracy(labels, pred)
    out = {"accuracy": acc, "chance": chance_accuracy(labels, k, seed)}
    out.update({f"recall_{cls}": r for cls, r in recall.items()})
    return out


def fit_pca(z: np.ndarray, max_fit: int, seed: int) -> Any:
    """PCA (all components) fitted on at most ``max_fit`` random rows of ``z``."""
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(seed)
    rows = rng.choice(len(z), size=min(max_fit, len(z)), replace=False) if len(z) > max_fit else np.arange(len(z))
    if len(rows) < 3:
        raise MicrofpError(f"the PCA needs at least 3 training fingerprints, got {len(rows)}")
    return PCA(n_components=min(len(rows), z.shape[1]), random_state=seed).fit(z[rows])


# ---------------------------------------------------------------------------------------------
# Linear paths in the latent space (eq. 6)


def interpolate(z1: torch.Tensor, z2: torch.Tensor, steps: int) -> torch.Tensor:
    """Eq. 6: ``z_n = z1 + (n - 1) / (N - 1) (z2 - z1)``, n = 1..N -> ``(N, k)``."""
    t = torch.linspace(0.0, 1.0, steps, dtype=z1.dtype, device=z1.device).unsqueeze(1)
    return z1.unsqueeze(0) + t * (z2 - z1).unsqueeze(0)


@torch.no_grad()
def interpolation_path(params: Params, checkpoint: str | Path, data: str | Path) -> dict[str, Any]:
    """Decode the linear path between two VEs of ``evaluate.interpolation_set``; mid-slices and the phi4
    between consecutive decoded steps (how smooth the path is)."""
    ev = params.evaluate
    device = pick_device(ev.device)
    i, j = ev.interpolation_pair
    need = max(i, j) + 1
    xs, ids = [], []
    for batch in iter_set_batches(Path(data) / ev.interpolation_set, ev.batch_size, need, params.ve_size):
        xs.append(batch.x)
        ids.append(batch.ve_id)
    x_all = torch.cat(xs)
    if len(x_all) < need:
        raise MicrofpError(
            f"evaluate.interpolation_pair {list(ev.interpolation_pair)}: set {ev.interpolation_set!r} has only {len(x_all)} VEs"
        )
    vae = load_vae(checkpoint, expect=params, device=device)
    x = x_all[[i, j]].to(device)
    mu = vae.encode(x)[0]
    path = interpolate(mu[0], mu[1], ev.interpolation_steps)
    decoded = vae.decode(path).float()
    scale = decoded.new_tensor(EULER_SCALE).view(1, 3, 1, 1, 1)
    q = euler_to_quaternion((decoded.double() * scale.double()).movedim(1, -1))
    steps = phi4(q[1:], q[:-1]).mean(dim=(1, 2, 3)).cpu().numpy()
    mid = params.ve_size // 2
    ve_ids = np.concatenate(ids)
    return {
        "inputs": x[:, :, :, :, mid].cpu().numpy(),
        "decoded": decoded[:, :, :, :, mid].cpu().numpy(),
        "ve_ids": (int(ve_ids[i]), int(ve_ids[j])),
        "step_phi4": steps,
    }


# ---------------------------------------------------------------------------------------------
# Plots


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _rgb(field: np.ndarray) -> np.ndarray:
    return np.clip(np.moveaxis(field, 0, -1), 0, 1).transpose(1, 0, 2)


def plot_interpolation(path: Path, result: dict[str, Any], set_name: str) -> None:
    plt = _plt()
    dec, inp = result["decoded"], result["inputs"]
    n = len(dec)
    fig, axes = plt.subplots(1, n + 2, figsize=(1.6 * (n + 2), 2.2))
    panels = [(inp[0], f"input {result['ve_ids'][0]}")] + [(dec[k], f"n={k + 1}") for k in range(n)]
    panels.append((inp[1], f"input {result['ve_ids'][1]}"))
    for ax, (img, title) in zip(axes, panels):
        ax.imshow(_rgb(img), origin="lower", interpolation="nearest")
        ax.set_title(title, fontsize=8)
        ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(f"{set_name}: decoded linear latent path z_n = z_1 + (n-1)/(N-1) (z_2 - z_1), N = {n}, "
                 "mid-slices z = n/2, RGB = normalised Euler", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def plot_explained(path: Path, curves: dict[str, np.ndarray]) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, cum in curves.items():
        ax.plot(np.arange(1, len(cum) + 1), cum, label=name)
    ax.set_xlabel("principal components")
    ax.set_ylabel("cumulative explained variance")
    ax.set_ylim(0, 1.01)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def plot_scatter(path: Path, method: str, train: np.ndarray, groups: dict[str, dict[str, np.ndarray]]) -> None:
    """Panel (a): the training cloud; one panel per group with its sets over the cloud (Figs. 8-10)."""
    plt = _plt()
    panels = [("train", {})] + list(groups.items())
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.4), squeeze=False)
    for ax, (title, sets) in zip(axes[0], panels):
        ax.scatter(train[:, 0], train[:, 1], s=4, c="0.75", label="train", rasterized=True)
        for name, pcs in sets.items():
            ax.scatter(pcs[:, 0], pcs[:, 1], s=10, label=name)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
        ax.legend(fontsize=6, markerscale=1.5)
    fig.suptitle(f"{method} fingerprints, PCA fitted on the training set", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def _write_csv(path: Path, df: pd.DataFrame) -> None:
    buf = io.StringIO()
    df.to_csv(buf, index=False, float_format="%.6g", lineterminator="\n")
    write_text(path, buf.getvalue())


# ---------------------------------------------------------------------------------------------
# The stage


def _z(df: pd.DataFrame, k: int, path: str) -> np.ndarray:
    cols = latent_columns(k)
    missing = [c for c in cols if c not in df.columns]
    if missing or f"z_{k}" in df.columns:
        have = sum(c.startswith("z_") for c in df.columns)
        raise MicrofpError(f"{path}: fingerprints have {have} dimensions but params.yaml has latent_dim={k} "
                           "(rerun `microfp fingerprint`)")
    return df[cols].to_numpy(np.float64)


def analyse_method(params: Params, method: str, directory: Path) -> tuple[dict[str, float], np.ndarray, pd.DataFrame]:
    """PCA and clustering of one method's fingerprints: (metrics, cumulative explained variance, PCs table)."""
    ev = params.evaluate
    k = params.latent_dim
    train = read_fingerprints(directory, ev.train_set)
    pca = fit_pca(_z(train, k, str(directory)), ev.pca_max_fit, params.seed)
    cum = np.cumsum(pca.explained_variance_ratio_)
    metrics: dict[str, float] = {
        "pca_fit_ves": int(pca.n_samples_),
        "pc2_explained": float(cum[min(1, len(cum) - 1)]),
        "pc3_explained": float(cum[min(2, len(cum) - 1)]),
        "n_components_90": int(np.searchsorted(cum, 0.9) + 1),
    }
    names = sorted({s for sets in ev.cluster_groups.values() for s in sets} | {ev.train_set})
    pcs: dict[str, pd.DataFrame] = {}
    for name in names:
        path = directory / f"{name}.parquet"
        if not path.is_file():
            continue
        df = train if name == ev.train_set else read_fingerprints(directory, name)
        p = pca.transform(_z(df, k, str(directory)))
        p = np.pad(p, ((0, 0), (0, max(0, 3 - p.shape[1]))))[:, :3]
        pcs[name] = pd.DataFrame({"set": name, "ve_id": df["ve_id"].to_numpy(), "pc1": p[:, 0], "pc2": p[:, 1], "pc3": p[:, 2]})
    for group, sets in ev.cluster_groups.items():
        missing = [s for s in sets if s not in pcs]
        if missing:
            log.info(f"{method}: skipping clustering {group!r} (no fingerprints of {', '.join(missing)})")
            continue
        x = np.concatenate([pcs[s][["pc1", "pc2", "pc3"]].to_numpy() for s in sets])
        y = np.concatenate([np.full(len(pcs[s]), s, dtype=object) for s in sets]).astype(str)
        if len(y) <= len(sets):
            log.info(f"{method}: skipping clustering {group!r} (only {len(y)} VEs)")
            continue
        for key, value in cluster_problem(x, y, params.seed, ev.cluster_neighbors).items():
            metrics[f"{group}_{key}"] = value
        log.info(f"{method}: {group} accuracy {metrics[f'{group}_accuracy']:.3f} (chance {metrics[f'{group}_chance']:.3f})")
    table = pd.concat(
        [df.assign(group=g) for g, sets in [("train", [ev.train_set])] + list(ev.cluster_groups.items())
         for s in sets if (df := pcs.get(s)) is not None],
        ignore_index=True,
    )
    return metrics, cum, table


def analyse(
    params: Params,
    fingerprints: str | Path = METHODS["vae"],
    fingerprints_2pt: str | Path | None = METHODS["twopoint"],
    checkpoint: str | Path | None = "models/vae/best.ckpt",
    data: str | Path = DEFAULT_DATA,
    metrics: str | Path = "metrics/latent.json",
    plots: str | Path = "plots/latent",
) -> dict[str, dict[str, float]]:
    """Run the whole analysis and write metrics and plots; ``fingerprints_2pt``/``checkpoint`` None skip
    the baseline/the interpolation."""
    t0 = time.time()
    plots = Path(plots)
    dirs = {"vae": Path(fingerprints)}
    if fingerprints_2pt is not None:
        dirs["twopoint"] = Path(fingerprints_2pt)
    results: dict[str, dict[str, float]] = {}
    curves: dict[str, np.ndarray] = {}
    for method, directory in dirs.items():
        results[method], curves[method], table = analyse_method(params, method, directory)
        _write_csv(plots / f"pca_{method}.csv", table)
        train = table[table.group == "train"][["pc1", "pc2"]].to_numpy()
        groups = {
            g: {s: table[(table.group == g) & (table.set == s)][["pc1", "pc2"]].to_numpy()
                for s in sets if ((table.group == g) & (table.set == s)).any()}
            for g, sets in params.evaluate.cluster_groups.items()
            if g != "morphology_large_elongated"
        }
        plot_scatter(plots / f"pca_{method}.png", method, train, {g: s for g, s in groups.items() if s})
    n = max(len(c) for c in curves.values())
    ev_table = pd.DataFrame({"component": np.arange(1, n + 1)})
    for method, cum in curves.items():
        ev_table[method] = np.pad(cum, (0, n - len(cum)), constant_values=np.nan)
    _write_csv(plots / "explained_variance.csv", ev_table)
    plot_explained(plots / "explained_variance.png", curves)
    if checkpoint is not None:
        path = interpolation_path(params, checkpoint, data)
        plot_interpolation(plots / "interpolation.png", path, params.evaluate.interpolation_set)
        results["interpolation"] = {
            "steps": int(params.evaluate.interpolation_steps),
            "step_phi4_mean": float(path["step_phi4"].mean()),
            "step_phi4_max": float(path["step_phi4"].max()),
        }
    write_json(metrics, results)
    log_mlflow("analyse", params, results, checkpoint)
    log.info(f"done in {time.time() - t0:.1f} s; wrote {metrics} and {plots}/")
    return results


def analyse_command(
    params: Annotated[Path, typer.Option("--params", "-p", help="parameter file (params.yaml or configs/paper.yaml)")] = Path("params.yaml"),
    fingerprints: Annotated[Path, typer.Option(help="VAE fingerprint tables <set>.parquet")] = Path(METHODS["vae"]),
    fingerprints_2pt: Annotated[Path, typer.Option("--fingerprints-2pt", help="2-point baseline tables")] = Path(METHODS["twopoint"]),
    checkpoint: Annotated[Path, typer.Option(help="trained VAE checkpoint (for the decoded latent path)")] = Path("models/vae/best.ckpt"),
    data: Annotated[Path, typer.Option(help="directory of the sets (for the two VEs of the latent path)")] = DEFAULT_DATA,
    metrics: Annotated[Path, typer.Option(help="metrics JSON")] = Path("metrics/latent.json"),
    plots: Annotated[Path, typer.Option(help="directory of the plots and their CSV data")] = Path("plots/latent"),
) -> None:
    """Latent-space analysis: PCA, spectral clustering, decoded linear paths (paper section 3.3).

    Fits a PCA on up to evaluate.pca_max_fit training fingerprints (VAE and 2-point baseline), plots
    the edge-case sets over the training cloud (plots/latent/pca_<method>.png/.csv) and the explained
    variance, clusters each evaluate.cluster_groups problem (textures, morphologies) with spectral
    clustering on the first 3 principal components and scores it with the best cluster-to-class
    matching (metrics/latent.json: vae.texture_accuracy, twopoint.texture_accuracy, ...), and decodes
    the linear latent path (eq. 6) between two VEs into plots/latent/interpolation.png.
    """
    analyse(load_params(params), fingerprints=fingerprints, fingerprints_2pt=fingerprints_2pt,
            checkpoint=checkpoint, data=data, metrics=metrics, plots=plots)
