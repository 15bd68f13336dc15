"""Fingerprint tables: one parquet file per set, one row per VE (schema in :mod:`microfp.fingerprints`),
written by ``fingerprint`` and ``fingerprint-volume``, read by ``analyse``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from microfp.atomic import atomic_output
from microfp.errors import MicrofpError

__all__ = ["DESCRIPTOR_COLUMNS", "latent_columns", "make_table", "read_fingerprints", "write_table"]

DESCRIPTOR_COLUMNS = ("esd_mean", "n_grains", "texture", "esd_target", "crystal")


def latent_columns(k: int) -> list[str]:
    return [f"z_{i}" for i in range(k)]


def make_table(set_name: str, ve_id: np.ndarray, z: np.ndarray, desc: dict[str, np.ndarray]) -> pd.DataFrame:
    cols: dict[str, Any] = {"ve_id": ve_id.astype(np.int64), "set": np.full(len(ve_id), set_name, dtype=object)}
    cols.update({name: z[:, i].astype(np.float32) for i, name in enumerate(latent_columns(z.shape[1]))})
    cols.update(desc)
    df = pd.DataFrame(cols)
    for col in ("set", "texture", "crystal"):
        df[col] = df[col].astype("string")
    return df


def write_table(df: pd.DataFrame, path: str | Path) -> None:
    """Parquet, atomically (temporary sibling, then rename)."""
    with atomic_output(path) as tmp:
        df.to_parquet(tmp, engine="pyarrow", index=False)


def read_fingerprints(directory: str | Path, set_name: str) -> pd.DataFrame:
    """One set's table; one-line :class:`MicrofpError` when missing or unreadable."""
    path = Path(directory) / f"{set_name}.parquet"
    if not path.is_file():
        raise MicrofpError(f"{path}: no fingerprints (run `microfp fingerprint` or `dvc repro` first)")
    try:
        df = pd.read_parquet(path)
    except Exception as err:  # noqa: BLE001 - pyarrow raises several types for damaged files
        raise MicrofpError(f"{path}: not a readable parquet file ({str(err).splitlines()[0][:200]})") from None
    if "z_0" not in df.columns or "set" not in df.columns:
        raise MicrofpError(f"{path}: not a microfp fingerprint table (no z_0/set columns)")
    return df
