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
training starts afresh; so it does when the checkpoint was trained by other code (a digest of the training,
model and representation modules is kept in it: :func:`training_code_digest`), as `dvc repro` reruns a
stage whose code changed. ``train.resume: false`` always starts afresh. A checkpoint given explicitly to
:func:`microfp.model.load_vae` (fingerprint/evaluate) must match, or it is an error.

All files are written atomically (temporary file, then rename), so a stage killed midway leaves the
previous complete files.
"""

from __future__ import annotations

import csv
import io
import logging
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

from microfp.atomic import write_json, write_text
from microfp.config import Params, TrainParams, load_params
from microfp.determinism import source_digest
from microfp.errors import MicrofpError
from microfp.model import (
    VAE,
    CheckpointError,
    VAEConfig,
    architecture_of_params,
    beta_at,
    block_means,
    loss_terms,
    model_config,
    model_of_checkpoint,
    param_count,
    read_checkpoint,
    vae_loss,
    weights_only_checkpoint,
    write_checkpoint,
)
from microfp.runtime import quiet_lightning
from microfp.shards import ShardError, euler_field, read_attrs, read_shard, shard_paths, shard_shape
from microfp.tracking import flatten, run_tags, tracking_uri

MLFLOW_EXPERIMENT = "microfp-train"
BEST = "best.ckpt"


log = logging.getLogger(__name__)


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
        families = {str(read_attrs(p).get("crystal", "cubic")) for p in self.paths}
        if len(families) != 1:
            raise ShardError(f"{self.directory}: shards of several crystal families ({', '.join(sorted(families))})")
        self.crystal = families.pop()

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


def lr_factor(step: int, total: int, schedule: str, warmup_fraction: float) -> float:
    """Multiplier of ``train.lr`` at optimizer step ``step`` (0-based) of ``total``: 1 for ``constant``;
    for ``cosine`` a linear warm-up from 1/warm-up steps to 1 over ``warmup_fraction * total`` steps,
    then a half cosine down to 0 at ``total``."""
    if schedule == "constant" or total <= 0:
        return 1.0
    warm = int(round(warmup_fraction * total))
    if step < warm:
        return (step + 1) / warm
    progress = min(1.0, (step - warm) / max(1, total - warm))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class VAEModule(L.LightningModule):
    """The VAE with its loss and optimizer. The architecture is one dict, ``model`` (the fields of
    :class:`VAEConfig`), saved once in every checkpoint; the other hyperparameters are the training's."""

    def __init__(
        self,
        model: dict[str, Any],
        lr: float = 1e-5,
        weight_decay: float = 1e-5,
        alpha: float = 0.999,
        beta: float = 1.0,
        beta_warmup_epochs: int = 0,
        lr_schedule: str = "constant",
        warmup_fraction: float = 0.05,
        channels_last: bool = False,
        compile: bool = False,
        training_code: str = "",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.vae = VAE(VAEConfig(**model))
        self.memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
        if channels_last:
            self.vae.to(memory_format=torch.channels_last_3d)
        if compile:
            self.vae.compile()  # in place: the state_dict keys stay those of the eager model

    @classmethod
    def from_params(cls, params: Params, crystal: str = "cubic") -> "VAEModule":
        t = params.train
        return cls(
            model=model_config(params, crystal).as_dict(),
            lr=t.lr,
            weight_decay=t.weight_decay,
            alpha=t.alpha,
            beta=t.beta,
            beta_warmup_epochs=t.beta_warmup_epochs,
            lr_schedule=t.lr_schedule,
            warmup_fraction=t.warmup_fraction,
            channels_last=t.channels_last,
            compile=t.compile,
            training_code=training_code_digest(),
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalised Euler batch -> (target in the representation, reconstruction, mu, logvar)."""
        r = self.vae.represent(x).contiguous(memory_format=self.memory_format)
        return (r, *self.vae(r))

    @property
    def beta_now(self) -> float:
        hp = self.hparams
        return beta_at(self.current_epoch, hp.beta, hp.beta_warmup_epochs)

    def _step(self, x: torch.Tensor, split: str, beta: float) -> torch.Tensor:
        r, r_hat, mu, logvar = self(x)
        cfg = self.vae.cfg
        terms = vae_loss(r_hat, r, mu, logvar, alpha=self.hparams.alpha, beta=beta,
                         representation=cfg.representation, crystal=cfg.crystal)
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

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        opt = torch.optim.Adam(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.lr_schedule == "constant":
            return opt
        total = int(self.trainer.estimated_stepping_batches)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: lr_factor(step, total, hp.lr_schedule, hp.warmup_fraction)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Lightning restores the optimizer after this hook: make the continued epochs use the current
        # lr and weight decay rather than those stored with the optimizer state.
        for state in checkpoint.get("optimizer_states", []):
            for group in state.get("param_groups", []):
                group["lr"] = self.hparams.lr
                group["initial_lr"] = self.hparams.lr
                group["weight_decay"] = self.hparams.weight_decay
        for state in checkpoint.get("lr_schedulers", []):
            if "base_lrs" in state:
                state["base_lrs"] = [self.hparams.lr] * len(state["base_lrs"])


def training_code_digest() -> str:
    """Digest of the modules that define a training step (this one, the model, the representations,
    the shard reader), kept in the checkpoint's hyperparameters: a checkpoint of other code is not
    resumed from, so a code change retrains as `dvc repro` expects of a changed dependency."""
    from microfp import harmonics, model, rotations, shards

    return source_digest(sys.modules[__name__], model, harmonics, rotations, shards)


def _mismatch(path: Path, have: dict[str, Any], want: dict[str, Any], source: str) -> str | None:
    """'<path>: trained with latent_dim=64, params.yaml has 512' for the first differing key
    (keys of ``want`` only: the crystal family comes from the data, not from the parameters)."""
    for key in want:
        if have.get(key) != want.get(key):
            return f"{path}: trained with {key}={have.get(key)}, {source} has {want.get(key)}"
    return None


# ---------------------------------------------------------------------------------------------
# Outputs: atomic files, curves, MLflow


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary sibling and renamed, never half-written. ``best.ckpt`` (the
    reader's file, a DVC output) gets the weights and the model config only
    (:func:`microfp.model.weights_only_checkpoint`); ``last.ckpt`` keeps the whole training state."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if Path(path).name == BEST:
            checkpoint = weights_only_checkpoint(checkpoint)
        write_checkpoint(checkpoint, path)


class RelocatableCheckpoint(ModelCheckpoint):
    """:class:`ModelCheckpoint` whose state in ``last.ckpt`` holds file names relative to its
    directory, not absolute paths: the same training in another clone writes the same bytes."""

    def state_dict(self) -> dict[str, Any]:
        return _map_paths(super().state_dict(), str(self.dirpath), "")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(_map_paths(state_dict, "", str(self.dirpath)))


def _map_paths(state: dict[str, Any], old: str, new: str) -> dict[str, Any]:
    """``state`` with the directory prefix ``old`` of path strings (and keys of ``best_k_models``)
    replaced by ``new``; "" stands for "relative to the checkpoint directory"."""

    def conv(v: Any) -> Any:
        if not isinstance(v, str) or not v:
            return v
        if old == "":
            return v if v.startswith(("/", "<")) else (new if v == "." else os.path.join(new, v))
        if v == old:
            return "."
        return os.path.relpath(v, old) if v.startswith(old + os.sep) else v

    out = {k: conv(v) for k, v in state.items() if k != "best_k_models"}
    if "best_k_models" in state:
        out["best_k_models"] = {conv(k): v for k, v in state["best_k_models"].items()}
    return out


class History(Callback):
    """One row of losses per epoch; kept in the checkpoint (so a resumed run has the whole curve) and
    written to ``<plots>/loss.csv`` after every epoch."""

    def __init__(self, csv_path: Path, columns: list[str]) -> None:
        self.csv_path, self.columns = csv_path, columns
        self.rows: list[dict[str, float]] = []
        self.t0 = time.time()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        m = trainer.callback_metrics
        beta = float(pl_module.beta_now)  # type: ignore[attr-defined]
        row = {"epoch": float(trainer.current_epoch + 1), "beta": beta}
        for col in self.columns[2:]:
            row[col] = float(m[col]) if col in m else float("nan")
        self.rows = [r for r in self.rows if r["epoch"] < row["epoch"]] + [row]
        if trainer.is_global_zero:
            write_curves(self.csv_path, self.rows, self.columns)
            terms = ", ".join(f"{c[4:]} {row[c]:.4g}" for c in self.columns if c.startswith("val_") and c not in ("val_loss", "val_recon"))
            log.info(
                f"epoch {int(row['epoch'])}/{trainer.max_epochs}: train_loss {row['train_loss']:.5g}, "
                f"val_loss {row['val_loss']:.5g} ({terms}), {time.time() - self.t0:.1f} s"
            )

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.t0 = time.time()

    def state_dict(self) -> dict[str, Any]:
        return {"rows": self.rows}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = list(state_dict.get("rows", []))


def curve_columns(representation: str) -> list[str]:
    """Columns of loss.csv: epoch, beta, then train_/val_ of each loss term of the representation."""
    return ["epoch", "beta"] + [f"{split}_{t}" for split in ("train", "val") for t in loss_terms(representation)]


def write_curves(path: Path, rows: list[dict[str, float]], columns: list[str]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (int(v) if k == "epoch" else f"{v:.8g}") for k, v in row.items()})
    write_text(path, buf.getvalue())


class MLflowTracking(Callback):
    """Params, tags and per-epoch metrics of the run to MLflow (global rank 0 only).

    A resumed training continues the latest run of the same checkpoint directory (tag
    ``checkpoint_dir``) when it is still in the tracking store. The run id is not kept in the
    checkpoint: a random id there would make the bytes of identical trainings differ.

    Not Lightning's ``MLFlowLogger`` (checked with Lightning 2.6): as a Trainer logger it logs the
    module's hyperparameters at the start of every ``fit``, and MLflow refuses a changed value of a
    logged param, so continuing a run with another ``lr``/``beta`` (allowed here) would fail; it
    logs metrics at the global step (``loss.csv`` and this run use the epoch) and truncates param
    values to 250 characters. Finding the run to continue (tag ``checkpoint_dir``) would stay ours.
    """

    def __init__(self, params: Params, counts: dict[str, int], out: Path, resuming: bool = False) -> None:
        self.params, self.counts, self.out, self.resuming = params, counts, out, resuming
        self.run_id: str | None = None
        self.client: Any = None
        self.uri = tracking_uri()

    def _previous_run(self) -> str | None:
        """Id of the latest run logged for this checkpoint directory, if any."""
        where = str(self.out.resolve())
        exp = self.client.get_experiment_by_name(MLFLOW_EXPERIMENT)
        if exp is None or "'" in where:
            return None
        runs = self.client.search_runs([exp.experiment_id], filter_string=f"tags.checkpoint_dir = '{where}'",
                                       order_by=["attributes.start_time DESC"], max_results=1)
        return runs[0].info.run_id if runs else None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        from mlflow import MlflowClient
        from mlflow.entities import Metric, Param, RunTag

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # no database-setup chatter in the stage log
        self.client = MlflowClient(tracking_uri=self.uri)
        if self.resuming:
            try:
                self.run_id = self._previous_run()
            except Exception:  # noqa: BLE001 - tracking is secondary: start a new run
                self.run_id = None
        if self.run_id:
            try:
                self.client.get_run(self.run_id)
                self.client.update_run(self.run_id, status="RUNNING")
                log.info(f"MLflow: continuing run {self.run_id} at {self.uri}")
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
        log.info(f"MLflow: run {self.run_id} at {self.uri}")

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

    def log_seconds(self, seconds: float) -> None:
        """The wall time of the stage (kept out of the DVC-tracked metrics, which must reproduce)."""
        if self.client is None or self.run_id is None:
            return
        self.client.log_metric(self.run_id, "seconds", round(seconds, 3))

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
        log.info(f"{last}: the training data are newer than the checkpoint; starting afresh")
        _remove_stale(last.parent)
        return None, 0
    if not params.train.resume:
        log.info(f"{last}: train.resume is false; starting afresh")
        _remove_stale(last.parent)
        return None, 0
    try:
        ckpt = read_checkpoint(last)
    except CheckpointError as err:
        log.warning(f"warning: {err}; starting afresh")
        _remove_stale(last.parent)
        return None, 0
    msg = _mismatch(last, model_of_checkpoint(ckpt)[0], architecture_of_params(params), "params.yaml")
    if not msg and ckpt.get("hyper_parameters", {}).get("training_code") != training_code_digest():
        msg = f"{last}: trained by other microfp code (training, model or representation modules changed)"
    if msg:
        log.warning(f"warning: {msg}; starting afresh (old best.ckpt and last.ckpt removed)")
        _remove_stale(last.parent)
        return None, 0
    return last, int(ckpt.get("epoch", -1)) + 1


def _remove_stale(out: Path) -> None:
    for name in ("best.ckpt", "last.ckpt"):
        (out / name).unlink(missing_ok=True)


@torch.no_grad()
def training_block_means(vae: VAE, dataset: Dataset, batch: int = 32) -> torch.Tensor:
    """(N, C * linear_grid^3) block means of every training VE in the VAE's representation, in float64
    (what :meth:`microfp.model.VAE.init_linear_path` fits)."""
    grid = vae.cfg.linear_grid
    rows = []
    for start in range(0, len(dataset), batch):
        x = torch.stack([dataset[i] for i in range(start, min(start + batch, len(dataset)))])
        rows.append(block_means(vae.represent(x).double(), grid))
    return torch.cat(rows)


def train(
    params: Params,
    data: str | Path = "data/ves",
    out: str | Path = "models/vae",
    metrics: str | Path = "metrics/train.json",
    plots: str | Path = "plots/train",
    callbacks: list[Callback] | None = None,
) -> dict[str, float]:
    """Train (or continue training) the VAE; returns the metrics written to ``metrics``.
    ``callbacks``: more Lightning callbacks (e.g. the learning-curve benchmark's evaluation)."""
    t0 = time.time()
    out, metrics, plots = Path(out), Path(metrics), Path(plots)
    t = params.train
    if t.threads:
        torch.set_num_threads(t.threads)  # CPU results depend on the thread count: fix it for bit-reproducibility
    accelerator, precision = resolve_hardware(t)
    quiet_lightning()
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    datamodule = ShardDataModule(data, params, pin_memory=on_gpu)
    datamodule.setup("fit")  # fail early, in this process, on missing/corrupt shards or wrong ve_size
    assert datamodule.train_set is not None and datamodule.val_set is not None

    ckpt_path, start_epoch = _resume_from(out / "last.ckpt", params, Path(data))
    # Offset by the epoch so that a resumed run does not replay the shuffling of the first epochs.
    L.seed_everything(params.seed + start_epoch, workers=True, verbose=False)

    module = VAEModule.from_params(params, crystal=datamodule.train_set.crystal)
    if t.linear_grid and ckpt_path is None:
        k = module.vae.init_linear_path(training_block_means(module.vae, datamodule.train_set))
        log.info(f"linear path: {k} principal components of the training VEs' {t.linear_grid}^3 block means")
    counts = param_count(module.vae)
    log.info(
        f"{params.encoder} VAE ({t.representation}, {datamodule.train_set.crystal}), {params.ve_size}^3, "
        f"latent {params.latent_dim}, hidden {t.hidden_dim}: "
        + ", ".join(f"{k} {v:,}" for k, v in counts.items())
        + " parameters"
    )
    log.info(
        f"{len(datamodule.train_set)} train / {len(datamodule.val_set)} val VEs"
        f" ({'in memory' if datamodule.train_set.cached else 'read lazily'}), precision {precision}, "
        + (f"resuming from {ckpt_path} (epoch {start_epoch})" if ckpt_path else "starting afresh")
    )

    columns = curve_columns(t.representation)
    history = History(plots / "loss.csv", columns)
    # Two checkpoint callbacks: with save_last=True, Lightning 2.6 rewrites last.ckpt only in epochs
    # where best.ckpt improved, so last.ckpt would lag behind. Both save at the end of the training
    # epoch (after validation, and after History has recorded the epoch, so it is in the file).
    ckpt_opts = dict(dirpath=out, save_top_k=1, save_on_train_epoch_end=True, enable_version_counter=False,
                     auto_insert_metric_name=False)
    best = RelocatableCheckpoint(filename="best", monitor="val_loss", mode="min", **ckpt_opts)  # type: ignore[arg-type]
    last = RelocatableCheckpoint(filename="last", monitor=None, **ckpt_opts)  # type: ignore[arg-type]
    extra = list(callbacks or [])
    callbacks = [history, best, last]
    tracker = MLflowTracking(params, counts, out, resuming=ckpt_path is not None) if t.mlflow else None
    if tracker:
        callbacks.append(tracker)
    callbacks += extra
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
        deterministic=True,  # torch.use_deterministic_algorithms(True): same params + machine -> same bits
    )
    try:
        with warnings.catch_warnings():
            # expected on resume / from Lightning 2.6 with torch 2.13
            for pattern in (".*exists and is not empty", ".*LeafSpec.* is deprecated", ".*deprecated.*",
                            ".*does not have many workers.*", ".*number of training batches.*"):
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
        write_curves(plots / "loss.csv", rows, columns)  # also when resumed at train.epochs
    # Only results in the tracked metrics (bit-reproducible); the wall time goes to the log and MLflow.
    result: dict[str, float] = {
        "epochs": float(rows[-1]["epoch"]) if rows else 0.0,
        "steps": float(trainer.global_step),
        "param_count": float(counts["total"]),
    }
    for k, v in counts.items():
        if k != "total":
            result[f"param_count_{k}"] = float(v)
    if rows:
        for col in columns[2:]:
            result[col] = rows[-1][col]
        result["val_recon_first"] = rows[0]["val_recon"]
        result["val_loss_best"] = min(r["val_loss"] for r in rows)
    result = {k: v for k, v in result.items() if math.isfinite(v)}  # flat, numeric, valid JSON
    if trainer.is_global_zero:
        write_json(metrics, result)
        if tracker:
            tracker.log_seconds(time.time() - t0)
            tracker.finish("FINISHED", {"checkpoint": str((out / "best.ckpt").resolve()),
                                        "last_checkpoint": str((out / "last.ckpt").resolve())})
    val = result.get("val_recon", float("nan"))
    log.info(f"done: {result.get('epochs', 0):.0f} epochs, {result['steps']:.0f} steps, val_recon {val:.5g}, "
         f"{time.time() - t0:.1f} s")
    return result


def train_command(
    params: Annotated[Path, typer.Option(help="parameter file (params.yaml or configs/paper.yaml)")] = Path(
        "params.yaml"
    ),
    data: Annotated[Path, typer.Option(help="directory of the sets, each a folder of shard-*.h5")] = Path("data/ves"),
    out: Annotated[Path, typer.Option(help="checkpoint directory: best.ckpt, last.ckpt")] = Path("models/vae"),
    metrics: Annotated[Path, typer.Option(help="final losses as flat JSON")] = Path("metrics/train.json"),
    plots: Annotated[Path, typer.Option(help="directory of the per-epoch loss curve loss.csv")] = Path("plots/train"),
    train_set: Annotated[Optional[str], typer.Option(help="set to train on (default: train.train_set)")] = None,
    val_set: Annotated[Optional[str], typer.Option(help="set to validate on (default: train.val_set)")] = None,
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
