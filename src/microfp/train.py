"""Training of the VAE with Lightning: data from HDF5 shards, checkpoints, curves, metrics, MLflow.

Stage ``train`` (``microfp train``)::

    data/ves/<train_set>/shard-*.h5, data/ves/<val_set>/shard-*.h5, params.yaml
        -> models/vae/best.ckpt (lowest val_loss), models/vae/last.ckpt (end of the latest epoch)
        -> plots/train/loss.csv (one row per epoch), metrics/train.json (flat numbers)
        -> an MLflow run (MLFLOW_TRACKING_URI, default sqlite:///mlflow.db in the working directory)

Resuming: ``models/vae`` is a persistent DVC output. When ``last.ckpt`` exists and was trained with the
same architecture (encoder, ve_size, latent_dim, hidden_dim, base_channels, bottleneck_channels, all
stored in the checkpoint), training continues from it up to ``train.epochs`` (weights, optimizer, epoch
counter, best score, curves and the MLflow run). The current ``lr``/``weight_decay``/``alpha``/``beta``
apply to the continued epochs. When the architecture differs, the parameters were changed on purpose
(``dvc exp run -S latent_dim=512``): the old ``best.ckpt``/``last.ckpt`` are removed with a warning and
training starts afresh. ``train.resume: false`` always starts afresh. A checkpoint given explicitly to
:func:`load_vae` (fingerprint/evaluate) must match, or it is an error.

All files are written atomically (temporary file, then rename), so a stage killed midway leaves the
previous complete files.
"""

from __future__ import annotations

import csv
import io
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Annotated, Any, Optional

import h5py
import lightning as L
import numpy as np
import torch
import typer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch.utils.data import DataLoader, Dataset

from microfp.atomic import atomic_output, write_json, write_text
from microfp.config import Params, TrainParams, load_params
from microfp.errors import MicrofpError
from microfp.model import VAE, VAEConfig, beta_at, param_count, vae_loss
from microfp.shards import ShardError, euler_field, read_shard, shard_paths, shard_shape
from microfp.tracking import flatten, run_tags, tracking_uri

ARCH_KEYS = ("encoder", "ve_size", "latent_dim", "hidden_dim", "base_channels", "bottleneck_channels")
TERMS = ("loss", "recon", "bce", "fft", "kl")
CURVE_COLUMNS = ["epoch", "beta"] + [f"{split}_{t}" for split in ("train", "val") for t in TERMS]
MLFLOW_EXPERIMENT = "microfp-train"


class CheckpointError(MicrofpError):
    """A checkpoint that is missing, unreadable or of another architecture (one line)."""


def _say(msg: str) -> None:
    print(f"[microfp train] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Data


class ShardDataset(Dataset):
    """The VEs of one set directory (``shard-*.h5``) as normalised (3, n, n, n) float32 tensors.

    Small sets (compact size below ``cache_mb``) are read and validated at once and held in memory as
    grain-ID maps (the 100x smaller form). Larger sets are read lazily, one VE per item, through an
    h5py handle per shard and per worker process (handles are reopened after a fork), and each VE is
    checked as it is read (ids within n_grains, finite angles). The expansion to Euler fields happens
    per item in ``__getitem__`` (``euler[grain_ids]``).
    """

    def __init__(self, directory: str | Path, ve_size: int, cache_mb: float = 1024) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise ShardError(f"{self.directory}: no such set directory (run `microfp generate` or `dvc repro` first)")
        self.paths = shard_paths(self.directory)
        counts = [self._inspect(p, ve_size) for p in self.paths]
        self.ve_size = ve_size
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        compact_mb = int(self.offsets[-1]) * ve_size**3 * 2 / 2**20
        self.cached = compact_mb <= cache_mb
        self._sets = [read_shard(p) for p in self.paths] if self.cached else None
        self._files: dict[int, h5py.File] = {}
        self._pid = os.getpid()

    @staticmethod
    def _inspect(path: Path, ve_size: int) -> int:
        """Number of VEs of a shard, checking format and VE size without reading the voxels."""
        shape = shard_shape(path)
        if len(shape) != 4 or len(set(shape[1:])) != 1:
            raise ShardError(f"{path}: grain_ids must have shape (N, n, n, n), got {shape}")
        if shape[1] != ve_size:
            raise ShardError(
                f"{path}: VEs are {shape[1]}^3 voxels but params.yaml has ve_size={ve_size} "
                "(regenerate the data or change ve_size)"
            )
        return int(shape[0])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_files"] = {}
        return state

    def _locate(self, i: int) -> tuple[int, int]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        shard = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return shard, i - int(self.offsets[shard])

    def _read(self, shard: int, j: int) -> tuple[np.ndarray, np.ndarray]:
        if self._sets is not None:
            ves = self._sets[shard]
            return ves.grain_ids[j], ves.grain_euler(j)
        if self._pid != os.getpid():  # a forked worker must not share the parent's HDF5 handles
            self._files, self._pid = {}, os.getpid()
        path = self.paths[shard]
        try:
            f = self._files.get(shard)
            if f is None:
                f = self._files[shard] = h5py.File(path, "r")
            n = int(f["n_grains"][j])
            gids = f["grain_ids"][j]
            euler = f["euler"][j, :n]
        except (OSError, KeyError, ValueError, TypeError) as err:
            raise ShardError(f"{path}: corrupt or truncated shard ({str(err).splitlines()[0][:200]})") from None
        if n < 1 or int(gids.max()) >= n or not np.all(np.isfinite(euler)):
            raise ShardError(f"{path}: VE {j} is invalid (grain id >= n_grains or non-finite Euler angles)")
        return gids, euler

    def __getitem__(self, i: int) -> torch.Tensor:
        gids, euler = self._read(*self._locate(int(i)))
        return torch.from_numpy(euler_field(gids, euler))


def auto_workers(requested: int) -> int:
    """DataLoader workers: ``requested``, or for -1 none on <= 2 cores, else half the cores (max 8)."""
    if requested >= 0:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 0 if cores <= 2 else min(8, cores // 2)


class ShardDataModule(L.LightningDataModule):
    """Train and validation sets from ``<data>/<train_set>`` and ``<data>/<val_set>``."""

    def __init__(self, data: str | Path, params: Params, pin_memory: bool = False) -> None:
        super().__init__()
        self.data, self.params, self.pin_memory = Path(data), params, pin_memory
        self.train_set: ShardDataset | None = None
        self.val_set: ShardDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        t = self.params.train
        if self.train_set is None:
            self.train_set = ShardDataset(self.data / t.train_set, self.params.ve_size, t.cache_mb)
            self.val_set = ShardDataset(self.data / t.val_set, self.params.ve_size, t.cache_mb)

    def _loader(self, ds: Dataset, train: bool) -> DataLoader:
        t = self.params.train
        workers = auto_workers(t.num_workers)
        return DataLoader(
            ds,
            batch_size=t.batch_size,
            shuffle=train,
            # BatchNorm needs > 1 value per channel: never end a training epoch on a batch of one.
            drop_last=train and len(ds) > t.batch_size,  # type: ignore[arg-type]
            num_workers=workers,
            pin_memory=self.pin_memory,
            persistent_workers=workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None
        return self._loader(self.train_set, True)

    def val_dataloader(self) -> DataLoader:
        assert self.val_set is not None
        return self._loader(self.val_set, False)


# ---------------------------------------------------------------------------------------------
# Model


class VAEModule(L.LightningModule):
    """The VAE with its loss and optimizer. Hyperparameters (architecture included) are saved in
    every checkpoint under ``hyper_parameters``."""

    def __init__(
        self,
        encoder: str = "resnet18",
        ve_size: int = 64,
        latent_dim: int = 256,
        hidden_dim: int = 8192,
        base_channels: int = 64,
        bottleneck_channels: int = 32,
        lr: float = 1e-5,
        weight_decay: float = 1e-5,
        alpha: float = 0.999,
        beta: float = 1.0,
        beta_warmup_epochs: int = 0,
        channels_last: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        cfg = VAEConfig(encoder, ve_size, latent_dim, hidden_dim, base_channels, bottleneck_channels)
        self.vae = VAE(cfg)
        self.memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
        if channels_last:
            self.vae.to(memory_format=torch.channels_last_3d)
        if compile:
            self.vae.compile()  # in place: the state_dict keys stay those of the eager model

    @classmethod
    def from_params(cls, params: Params) -> "VAEModule":
        t = params.train
        return cls(
            encoder=params.encoder,
            ve_size=params.ve_size,
            latent_dim=params.latent_dim,
            hidden_dim=t.hidden_dim,
            base_channels=t.base_channels,
            bottleneck_channels=t.bottleneck_channels,
            lr=t.lr,
            weight_decay=t.weight_decay,
            alpha=t.alpha,
            beta=t.beta,
            beta_warmup_epochs=t.beta_warmup_epochs,
            channels_last=t.channels_last,
            compile=t.compile,
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.vae(x.contiguous(memory_format=self.memory_format))

    @property
    def beta_now(self) -> float:
        hp = self.hparams
        return beta_at(self.current_epoch, hp.beta, hp.beta_warmup_epochs)

    def _step(self, x: torch.Tensor, split: str, beta: float) -> torch.Tensor:
        x_hat, mu, logvar = self(x)
        terms = vae_loss(x_hat, x, mu, logvar, alpha=self.hparams.alpha, beta=beta)
        for name, value in terms.items():
            self.log(f"{split}_{name}", value.detach(), on_step=False, on_epoch=True,
                     batch_size=x.shape[0], sync_dist=True)
        return terms["loss"]

    def training_step(self, x: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self._step(x, "train", self.beta_now)

    def validation_step(self, x: torch.Tensor, batch_idx: int) -> None:
        # Full beta, not the warmed-up one, so that val_loss (which picks best.ckpt) is comparable
        # across epochs.
        self._step(x, "val", self.hparams.beta)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Lightning restores the optimizer after this hook: make the continued epochs use the current
        # lr and weight decay rather than those stored with the optimizer state.
        for state in checkpoint.get("optimizer_states", []):
            for group in state.get("param_groups", []):
                group["lr"] = self.hparams.lr
                group["weight_decay"] = self.hparams.weight_decay


def arch_of(hparams: dict[str, Any]) -> dict[str, Any]:
    return {k: hparams.get(k) for k in ARCH_KEYS}


def arch_of_params(params: Params) -> dict[str, Any]:
    t = params.train
    return {
        "encoder": params.encoder,
        "ve_size": params.ve_size,
        "latent_dim": params.latent_dim,
        "hidden_dim": t.hidden_dim,
        "base_channels": t.base_channels,
        "bottleneck_channels": t.bottleneck_channels,
    }


def _mismatch(path: Path, have: dict[str, Any], want: dict[str, Any], source: str) -> str | None:
    """'<path>: trained with latent_dim=64, params.yaml has 512' for the first differing key."""
    for key in ARCH_KEYS:
        if have.get(key) != want.get(key):
            return f"{path}: trained with {key}={have.get(key)}, {source} has {want.get(key)}"
    return None


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint dict on the CPU; :class:`CheckpointError` (one line) when missing or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint (run `microfp train` or `dvc pull models/vae`)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for a damaged file
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise CheckpointError(f"{path}: not a readable checkpoint ({reason})") from None
    hp = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if not isinstance(hp, dict) or "state_dict" not in ckpt or any(k not in hp for k in ARCH_KEYS):
        raise CheckpointError(f"{path}: not a microfp VAE checkpoint (no architecture hyperparameters)")
    return ckpt


def load_vae(checkpoint_path: str | Path, expect: Params | None = None) -> VAE:
    """The trained :class:`VAE` of a checkpoint, on the CPU in eval mode (``encode(x)[0]`` = fingerprint).

    With ``expect``, the architecture stored in the checkpoint must equal that of the parameters, or
    :class:`CheckpointError` names the first difference, e.g.
    ``models/vae/best.ckpt: trained with latent_dim=64, params.yaml has 512``.
    """
    path = Path(checkpoint_path)
    ckpt = read_checkpoint(path)
    arch = arch_of(ckpt["hyper_parameters"])
    if expect is not None:
        msg = _mismatch(path, arch, arch_of_params(expect), "params.yaml")
        if msg:
            raise CheckpointError(msg)
    try:
        vae = VAE(VAEConfig(**arch))
        state = {k[len("vae.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("vae.")}
        vae.load_state_dict(state)
    except (ValueError, RuntimeError, TypeError) as err:
        reason = str(err).splitlines()[0][:200]
        raise CheckpointError(f"{path}: weights do not fit the stored architecture ({reason})") from None
    return vae.eval()


# ---------------------------------------------------------------------------------------------
# Outputs: atomic files, curves, MLflow


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary sibling and renamed, never half-written."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        with atomic_output(path) as tmp:
            torch.save(checkpoint, tmp)


class History(Callback):
    """One row of losses per epoch; kept in the checkpoint (so a resumed run has the whole curve) and
    written to ``<plots>/loss.csv`` after every epoch."""

    def __init__(self, csv_path: Path) -> None:
        self.csv_path = csv_path
        self.rows: list[dict[str, float]] = []
        self.t0 = time.time()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        m = trainer.callback_metrics
        beta = float(pl_module.beta_now)  # type: ignore[attr-defined]
        row = {"epoch": float(trainer.current_epoch + 1), "beta": beta}
        for col in CURVE_COLUMNS[2:]:
            row[col] = float(m[col]) if col in m else float("nan")
        self.rows = [r for r in self.rows if r["epoch"] < row["epoch"]] + [row]
        if trainer.is_global_zero:
            write_curves(self.csv_path, self.rows)
            _say(
                f"epoch {int(row['epoch'])}/{trainer.max_epochs}: train_loss {row['train_loss']:.5g}, "
                f"val_loss {row['val_loss']:.5g} (bce {row['val_bce']:.4g}, fft {row['val_fft']:.4g}, "
                f"kl {row['val_kl']:.3g}), {time.time() - self.t0:.1f} s"
            )

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.t0 = time.time()

    def state_dict(self) -> dict[str, Any]:
        return {"rows": self.rows}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = list(state_dict.get("rows", []))


def write_curves(path: Path, rows: list[dict[str, float]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CURVE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (int(v) if k == "epoch" else f"{v:.8g}") for k, v in row.items()})
    write_text(path, buf.getvalue())


class MLflowTracking(Callback):
    """Params, tags and per-epoch metrics of the run to MLflow (global rank 0 only).

    The run id is stored in the checkpoint, so a resumed training continues the same MLflow run when
    it is still in the tracking store.
    """

    def __init__(self, params: Params, counts: dict[str, int], out: Path) -> None:
        self.params, self.counts, self.out = params, counts, out
        self.run_id: str | None = None
        self.client: Any = None
        self.uri = tracking_uri()

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id or "", "uri": self.uri}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("uri") == self.uri and state_dict.get("run_id"):
            self.run_id = state_dict["run_id"]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        from mlflow import MlflowClient
        from mlflow.entities import Metric, Param, RunTag

        self.client = MlflowClient(tracking_uri=self.uri)
        if self.run_id:
            try:
                self.client.get_run(self.run_id)
                self.client.update_run(self.run_id, status="RUNNING")
                _say(f"MLflow: continuing run {self.run_id} at {self.uri}")
                return
            except Exception:  # noqa: BLE001 - gone from the store: start a new run
                self.run_id = None
        exp = self.client.get_experiment_by_name(MLFLOW_EXPERIMENT)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(MLFLOW_EXPERIMENT)
        run = self.client.create_run(exp_id, run_name=os.environ.get("DVC_EXP_NAME") or None, tags=run_tags("train"))
        self.run_id = run.info.run_id
        flat = flatten(self.params.model_dump(mode="json"))
        flat.update({f"param_count.{k}": v for k, v in self.counts.items()})
        params = [Param(k, str(v)[:6000]) for k, v in sorted(flat.items())]
        now = int(time.time() * 1000)
        metrics = [Metric(f"param_count_{k}", float(v), now, 0) for k, v in self.counts.items()]
        tags_ckpt = [RunTag("checkpoint_dir", str(self.out.resolve()))]
        for i in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[i : i + 100])
        self.client.log_batch(self.run_id, metrics=metrics, tags=tags_ckpt)
        _say(f"MLflow: run {self.run_id} at {self.uri}")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.client is None or self.run_id is None:
            return
        from mlflow.entities import Metric

        now, step = int(time.time() * 1000), trainer.current_epoch + 1
        metrics = [
            Metric(k, float(v), now, step)
            for k, v in trainer.callback_metrics.items()
            if k.startswith(("train_", "val_")) and torch.isfinite(torch.as_tensor(v)).all()
        ]
        metrics.append(Metric("beta", float(pl_module.beta_now), now, step))  # type: ignore[attr-defined]
        self.client.log_batch(self.run_id, metrics=metrics)

    def finish(self, status: str, tags: dict[str, str] | None = None) -> None:
        if self.client is None or self.run_id is None:
            return
        from mlflow.entities import RunTag

        if tags:
            self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        self.client.set_terminated(self.run_id, status=status)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        try:
            self.finish("KILLED" if isinstance(exception, KeyboardInterrupt) else "FAILED")
        except Exception:  # noqa: BLE001 - never hide the original error
            pass


# ---------------------------------------------------------------------------------------------
# Running


def resolve_hardware(t: TrainParams) -> tuple[str, str]:
    """(accelerator, precision): ``auto`` precision is bf16-mixed on a CUDA GPU with bf16, else 32-true."""
    accelerator = t.accelerator
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    precision = t.precision
    if precision == "auto":
        bf16 = on_gpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        precision = "bf16-mixed" if bf16 else "32-true"
    return accelerator, precision


def _newest_shard_mtime(data: Path, params: Params) -> float:
    t = params.train
    return max(p.stat().st_mtime for name in (t.train_set, t.val_set) for p in shard_paths(data / name))


def _resume_from(last: Path, params: Params, data: Path) -> tuple[Path | None, int]:
    """(``last``, its next epoch) if training can continue from it; (None, 0) (after removing stale
    checkpoints) if not: another architecture, an unreadable file, or training data written after
    the checkpoint (regenerated sets: continuing would fine-tune a model of other data)."""
    if not last.exists():
        return None, 0
    if _newest_shard_mtime(data, params) > last.stat().st_mtime:
        _say(f"{last}: the training data are newer than the checkpoint; starting afresh")
        _remove_stale(last.parent)
        return None, 0
    if not params.train.resume:
        _say(f"{last}: train.resume is false; starting afresh")
        _remove_stale(last.parent)
        return None, 0
    try:
        ckpt = read_checkpoint(last)
    except CheckpointError as err:
        _say(f"warning: {err}; starting afresh")
        _remove_stale(last.parent)
        return None, 0
    msg = _mismatch(last, arch_of(ckpt["hyper_parameters"]), arch_of_params(params), "params.yaml")
    if msg:
        _say(f"warning: {msg}; starting afresh (old best.ckpt and last.ckpt removed)")
        _remove_stale(last.parent)
        return None, 0
    return last, int(ckpt.get("epoch", -1)) + 1


def _remove_stale(out: Path) -> None:
    for name in ("best.ckpt", "last.ckpt"):
        (out / name).unlink(missing_ok=True)


def train(
    params: Params,
    data: str | Path = "data/ves",
    out: str | Path = "models/vae",
    metrics: str | Path = "metrics/train.json",
    plots: str | Path = "plots/train",
) -> dict[str, float]:
    """Train (or continue training) the VAE; returns the metrics written to ``metrics``."""
    t0 = time.time()
    out, metrics, plots = Path(out), Path(metrics), Path(plots)
    t = params.train
    if t.threads:
        torch.set_num_threads(t.threads)
    accelerator, precision = resolve_hardware(t)
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    datamodule = ShardDataModule(data, params, pin_memory=on_gpu)
    datamodule.setup("fit")  # fail early, in this process, on missing/corrupt shards or wrong ve_size
    assert datamodule.train_set is not None and datamodule.val_set is not None

    ckpt_path, start_epoch = _resume_from(out / "last.ckpt", params, Path(data))
    # Offset by the epoch so that a resumed run does not replay the shuffling of the first epochs.
    L.seed_everything(params.seed + start_epoch, workers=True, verbose=False)

    module = VAEModule.from_params(params)
    counts = param_count(module.vae)
    _say(
        f"{params.encoder} VAE, {params.ve_size}^3, latent {params.latent_dim}, hidden {t.hidden_dim}: "
        + ", ".join(f"{k} {v:,}" for k, v in counts.items())
        + " parameters"
    )
    _say(
        f"{len(datamodule.train_set)} train / {len(datamodule.val_set)} val VEs"
        f" ({'in memory' if datamodule.train_set.cached else 'read lazily'}), precision {precision}, "
        + (f"resuming from {ckpt_path} (epoch {start_epoch})" if ckpt_path else "starting afresh")
    )

    history = History(plots / "loss.csv")
    # Two checkpoint callbacks: with save_last=True, Lightning 2.6 rewrites last.ckpt only in epochs
    # where best.ckpt improved, so last.ckpt would lag behind. Both save at the end of the training
    # epoch (after validation, and after History has recorded the epoch, so it is in the file).
    ckpt_opts = dict(dirpath=out, save_top_k=1, save_on_train_epoch_end=True, enable_version_counter=False,
                     auto_insert_metric_name=False)
    best = ModelCheckpoint(filename="best", monitor="val_loss", mode="min", **ckpt_opts)  # type: ignore[arg-type]
    last = ModelCheckpoint(filename="last", monitor=None, **ckpt_opts)  # type: ignore[arg-type]
    callbacks: list[Callback] = [history, best, last]
    tracker = MLflowTracking(params, counts, out) if t.mlflow else None
    if tracker:
        callbacks.append(tracker)
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision=precision,  # type: ignore[arg-type]
        max_epochs=t.epochs,
        limit_train_batches=t.limit_train_batches or None,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
        logger=False,
        default_root_dir=out,
        num_sanity_val_steps=0,
        enable_model_summary=False,
        enable_progress_bar=sys.stderr.isatty(),
        log_every_n_steps=1,
    )
    try:
        with warnings.catch_warnings():
            # expected on resume / from Lightning 2.6 with torch 2.13
            for pattern in (".*exists and is not empty", ".*LeafSpec.* is deprecated"):
                warnings.filterwarnings("ignore", message=pattern)
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except MicrofpError as err:
        # Re-raised from a DataLoader worker, the message carries the worker's traceback; its last
        # line is "microfp.shards.ShardError: <the one-line message>".
        text = str(err).strip()
        if "\n" in text:
            raise type(err)(text.splitlines()[-1].split(": ", 1)[-1]) from None
        raise

    rows = history.rows
    if rows and trainer.is_global_zero:
        write_curves(plots / "loss.csv", rows)  # also when resumed at train.epochs: nothing new was trained
    result: dict[str, float] = {
        "epochs": float(rows[-1]["epoch"]) if rows else 0.0,
        "steps": float(trainer.global_step),
        "seconds": round(time.time() - t0, 3),
        "param_count": float(counts["total"]),
    }
    for k, v in counts.items():
        if k != "total":
            result[f"param_count_{k}"] = float(v)
    if rows:
        for col in CURVE_COLUMNS[2:]:
            result[col] = rows[-1][col]
        result["val_recon_first"] = rows[0]["val_recon"]
        result["val_loss_best"] = min(r["val_loss"] for r in rows)
    result = {k: v for k, v in result.items() if math.isfinite(v)}  # flat, numeric, valid JSON
    if trainer.is_global_zero:
        write_json(metrics, result)
        if tracker:
            tracker.finish("FINISHED", {"checkpoint": str((out / "best.ckpt").resolve()),
                                        "last_checkpoint": str((out / "last.ckpt").resolve())})
    val = result.get("val_recon", float("nan"))
    _say(f"done: {result.get('epochs', 0):.0f} epochs, val_recon {val:.5g}, {result['seconds']:.1f} s")
    return result


def train_command(
    params: Annotated[Path, typer.Option(help="parameter file (params.yaml or configs/paper.yaml)")] = Path(
        "params.yaml"
    ),
    data: Annotated[Path, typer.Option(help="directory of the sets, each a folder of shard-*.h5")] = Path("data/ves"),
    out: Annotated[Path, typer.Option(help="checkpoint directory: best.ckpt, last.ckpt")] = Path("models/vae"),
    metrics: Annotated[Path, typer.Option(help="final losses as flat JSON")] = Path("metrics/train.json"),
    plots: Annotated[Path, typer.Option(help="directory of the per-epoch loss curve loss.csv")] = Path("plots/train"),
    train_set: Annotated[Optional[str], typer.Option(help="set to train on [default: train.train_set]")] = None,
    val_set: Annotated[Optional[str], typer.Option(help="set to validate on [default: train.val_set]")] = None,
) -> None:
    """Train the 3D ResNet VAE on the train set's VEs, validating on the val set.

    Reads data/ves/<train.train_set>/ and data/ves/<train.val_set>/ shards; writes models/vae/best.ckpt
    (lowest validation loss) and last.ckpt, plots/train/loss.csv and metrics/train.json, and logs the run
    to MLflow (MLFLOW_TRACKING_URI, default sqlite:///mlflow.db). If models/vae/last.ckpt exists with the
    same architecture, training continues from it up to train.epochs; with another architecture it
    starts afresh. Parameters: encoder, latent_dim, ve_size, seed and the train block of params.yaml.
    """
    p = load_params(params)
    overrides = {k: v for k, v in (("train_set", train_set), ("val_set", val_set)) if v}
    if overrides:  # e.g. the hexagonal VAE of the CP surrogate: --train-set hcp --val-set hcp_val
        p = p.model_copy(update={"train": p.train.model_copy(update=overrides)})
    train(p, data=data, out=out, metrics=metrics, plots=plots)
