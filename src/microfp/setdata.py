"""The sets of VEs as the torch stages read them: which sets a data directory holds, and their VEs in
batches of normalised orientation fields (evaluate, fingerprint, analyse)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from microfp.shards import ShardError, read_shard, shard_paths

__all__ = ["DEFAULT_DATA", "SetBatch", "find_sets", "iter_set_batches"]

DEFAULT_DATA = Path("data/ves")


def find_sets(data: str | Path, names: list[str] | None = None) -> list[str]:
    """Set names to process: ``names`` (each must have shards), or every folder of ``data`` with shards,
    in the order train, val, then alphabetical. :class:`ShardError` when there is nothing to read."""
    data = Path(data)
    if names is not None:
        for name in names:
            shard_paths(data / name)  # one-line ShardError when missing
        return list(names)
    if not data.is_dir():
        raise ShardError(f"{data}: no such data directory (run `microfp generate` or `dvc repro` first)")
    found = sorted(p.name for p in data.iterdir() if p.is_dir() and any(p.glob("shard-*.h5")))
    if not found:
        raise ShardError(f"{data}: no sets with shards found (run `microfp generate` or `dvc repro` first)")
    first = [s for s in ("train", "val") if s in found]
    return first + [s for s in found if s not in first]


@dataclass
class SetBatch:
    """A batch of VEs of one set: normalised fields and what the shards say about them."""

    x: torch.Tensor  # (B, 3, n, n, n) float32 in [0, 1]
    ve_id: np.ndarray  # (B,) int64
    grain_ids: list[np.ndarray]  # (n, n, n) per VE
    euler: list[np.ndarray]  # (G_i, 3) Bunge radians per VE
    n_grains: np.ndarray
    esd_target: np.ndarray
    crystal: str
    texture: str
    resolution: float


def iter_set_batches(
    set_dir: str | Path, batch_size: int, limit: int | None = None, ve_size: int | None = None
) -> Iterator[SetBatch]:
    """Batches of the first ``limit`` VEs (all when None) of a set directory, shard by shard.

    Shards are read and validated one at a time (one-line :class:`ShardError` when bad); with
    ``ve_size`` a VE of another size is an error that says so.
    """
    seen = 0
    for path in shard_paths(set_dir):
        if limit is not None and seen >= limit:
            return
        ves = read_shard(path)
        if ve_size is not None and ves.ve_size != ve_size:
            raise ShardError(
                f"{path}: VEs are {ves.ve_size}^3 voxels but params.yaml has ve_size={ve_size} "
                "(regenerate the data or change ve_size)"
            )
        n = len(ves) if limit is None else min(len(ves), limit - seen)
        texture = str(ves.attrs.get("texture", "unknown"))
        for start in range(0, n, batch_size):
            idx = range(start, min(start + batch_size, n))
            x = torch.from_numpy(np.stack([ves.orientation_field(i) for i in idx]))
            yield SetBatch(
                x=x,
                ve_id=ves.ve_index[list(idx)].astype(np.int64),
                grain_ids=[ves.grain_ids[i] for i in idx],
                euler=[ves.grain_euler(i) for i in idx],
                n_grains=ves.n_grains[list(idx)].astype(np.int64),
                esd_target=ves.esd_target[list(idx)].astype(np.float64),
                crystal=ves.crystal,
                texture=texture,
                resolution=float(ves.resolution),
            )
        seen += n
