"""The ``simulate`` stage: crystal-plasticity stress-strain curves of the VEs of a set (paper section 2.3).

Uniaxial tension along x to ``simulate.strain`` (1 %) at ``simulate.strain_rate`` (1e-3 /s) in
``simulate.increments`` (20) increments, HCP Mg phenomenological power law (:mod:`microfp.cp`).
Backends:

* ``spectral`` (default): our Galerkin-FFT Newton-CG solver in torch (:func:`microfp.cp.solve`),
  batched over ``simulate.batch_size`` VEs per task, CPU or GPU.
* ``damask``: writes ``grid.vti``, ``material.yaml`` and ``load.yaml`` per VE with the ``damask``
  library and runs ``DAMASK_grid`` (when on PATH), reading the volume-averaged Cauchy stress with
  ``damask.Result``.

Fan-out: tasks of a few VEs run on Dask ``distributed`` (a ``LocalCluster`` sized to the machine,
or an existing scheduler by address, e.g. a dask-jobqueue ``SLURMCluster``). Each VE's result is
written on its own, atomically, as ``<out>.parts/ve-<index>-<key>.json`` as soon as its task
finishes; ``key`` hashes the set, the VE's content and every parameter that changes results, so a
killed run resumes with the VEs still missing and a parameter change recomputes everything. The
parts are then merged into ``data/curves/<set>.parquet``: one row per VE with ``converged``,
``reason``, iterations, wall time, and ``sigma_xx_pa_00..NN`` / ``sigma_xx_mpa_00..NN`` (the
volume-averaged sigma_xx at each of the ``increments + 1`` points, NaN where not converged).
Non-converged VEs are rows with ``converged = False`` and a reason, never an error; downstream
stages use :func:`read_curves` with ``converged_only=True``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import numpy as np
import typer

from microfp import shards
from microfp.atomic import atomic_output, save_figure, write_json, write_text
from microfp.config import Params, SimulateParams, load_params
from microfp.errors import MicrofpError
from microfp.volumes import relabel_contiguous

SOLVER_VERSION = "galerkin-newton-cg-v6"  # v6: float32 CG and FFTs with float64 residual and local update, local tolerance 1e-9, tangent kernel only for VEs still iterating (curves within 5e-8 of v5); v5: consistent tangent for CG, local Newton predictor, second-order first guess (curves within 5e-6 of v4); v4: Nyquist frequencies as DAMASK (reduced wave vector), sigma_xx reported as DAMASK's Cauchy stress (first order); v3: twin hardening by slip as DAMASK v3.0.2
"""Change when the results of the spectral solver change (part of the resume key)."""

DAMASK_VERSION = "DAMASK_grid v3.0.2, zero mean shear stress"
"""The damask backend's part of the resume key (its load case changed: shear stresses, not strains, held)."""

BACKENDS = ("spectral", "damask")
WALL_KEY, CPU_KEY = "_wall_s", "_cpu_s"
"""Key of a task record's wall time: logged (and sent to MLflow), never written to a part or the curves,
so that the stage's outputs are the same on every machine (bit-reproducible ``dvc repro``)."""


class SimulateError(MicrofpError):
    """Bad input to the simulate stage; the message is one line."""


# --------------------------------------------------------------------------------------------------
# configuration and keys


def sim_config(sp: SimulateParams) -> dict[str, Any]:
    """Everything that changes a VE's curve (hashed into the resume key), down to the last bit: the
    device type and the local update's implementation (numba or torch agree to round-off, not bits)."""
    import torch

    from microfp import cp

    device = resolve_device(sp.device)
    dtype = torch.float64 if sp.dtype == "float64" else torch.float32
    return {
        "backend": sp.backend,
        "solver": SOLVER_VERSION if sp.backend == "spectral" else DAMASK_VERSION,
        "device": torch.device(device).type,
        "kernel": cp.choose_kernel("auto", torch.device(device), dtype) if sp.backend == "spectral" else None,
        "strain": sp.strain,
        "strain_rate": sp.strain_rate,
        "increments": sp.increments,
        "twinning": sp.twinning,
        "tolerance": sp.tolerance,
        "dtype": sp.dtype,
        "material": asdict(cp.MG),
    }


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def ve_digest(grain_ids: np.ndarray, euler: np.ndarray, resolution: float) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(grain_ids, dtype=np.uint16).tobytes())
    h.update(np.ascontiguousarray(euler, dtype=np.float32).tobytes())
    h.update(repr(float(resolution)).encode())
    return h.hexdigest()


def part_key(config: dict[str, Any], set_name: str, digest: str) -> str:
    return _digest({"config": config, "set": set_name, "ve": digest})[:12]


def part_path(parts_dir: Path, ve_index: int, key: str) -> Path:
    return parts_dir / f"ve-{ve_index:06d}-{key}.json"


def parts_dir_for(out: Path) -> Path:
    """``data/curves/hcp.parquet`` -> ``data/curves/hcp.parts``."""
    return out.with_suffix(".parts")


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise SimulateError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    return backend


# --------------------------------------------------------------------------------------------------
# input


def coarsen(grain_ids: np.ndarray, euler: np.ndarray, resolution: float, grid: int) -> tuple[np.ndarray, np.ndarray, float]:
    """The VE on a coarser ``grid``^3 by taking every f-th voxel (f = n / grid), grains relabelled.

    ``grain_ids`` (n, n, n), ``euler`` (G, 3); returns ids (grid, grid, grid), the Euler angles of the
    grains that remain, and the new resolution (f times larger). ``grid`` 0 or n: unchanged.
    """
    n = grain_ids.shape[0]
    if grid in (0, n):
        return grain_ids, euler, resolution
    if grid > n or n % grid:
        raise SimulateError(f"simulate.grid {grid} must divide the VEs' {n} voxels per edge")
    f = n // grid
    sub = grain_ids[::f, ::f, ::f]
    ids, kept = relabel_contiguous(sub.astype(np.int64), len(euler))
    return ids, euler[kept], resolution * f


def load_ves(set_dir: Path, max_ves: int, set_name: str, grid: int = 0) -> list[dict[str, Any]]:
    """The first ``max_ves`` VEs of a set as jobs (on the CP ``grid``, see :func:`coarsen`); refuses sets
    that are not hexagonal (Mg)."""
    set_dir = Path(set_dir)
    if not set_dir.is_dir():
        raise shards.ShardError(f"{set_dir}: no such set directory (run `microfp generate {set_name}` or `dvc repro` first)")
    jobs: list[dict[str, Any]] = []
    for path in shards.shard_paths(set_dir):
        ves = shards.read_shard(path)
        if ves.crystal != "hexagonal":
            raise SimulateError(
                f"{set_dir}: set {set_name!r} is {ves.crystal}, but the crystal-plasticity model is HCP "
                "magnesium; simulate a hexagonal set (generate.sets.<name>.crystal: hexagonal)"
            )
        for i in range(len(ves)):
            if len(jobs) >= max_ves:
                return jobs
            grain_ids, euler, resolution = coarsen(ves.grain_ids[i], ves.grain_euler(i), ves.resolution, grid)
            jobs.append(
                {
                    "ve_index": int(ves.ve_index[i]),
                    "grain_ids": grain_ids,
                    "euler": euler.astype(np.float64),
                    "resolution": float(resolution),
                    "digest": ve_digest(grain_ids, euler, resolution),
                }
            )
    return jobs


# --------------------------------------------------------------------------------------------------
# tasks (run on Dask workers; top-level functions so they pickle)


def resolve_device(device: str) -> str:
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def run_spectral(jobs: list[dict[str, Any]], sp_dict: dict[str, Any]) -> list[dict[str, Any]]:
    """Solve a batch of VEs in one batched torch solve; one record per VE (failures are records)."""
    import torch

    from microfp import cp

    sp = SimulateParams(**sp_dict)
    torch.set_num_threads(sp.threads_per_worker)
    settings = cp.SolverSettings(
        tolerance=sp.tolerance,
        max_newton=sp.max_newton,
        max_cg=sp.max_cg,
        max_cutbacks=sp.max_cutbacks,
        twinning=sp.twinning,
        dtype=sp.dtype,
        device=resolve_device(sp.device),
        voxel_chunk=sp.voxel_chunk,
    )
    load = cp.Load(strain=sp.strain, rate=sp.strain_rate, increments=sp.increments)
    records = []
    # one batched solve per grid size (a set has one size; imported sets might not)
    by_size: dict[int, list[dict[str, Any]]] = {}
    for job in jobs:
        by_size.setdefault(job["grain_ids"].shape[0], []).append(job)
    for group in by_size.values():
        start, cpu0 = time.perf_counter(), time.process_time()
        try:
            results = cp.solve(np.stack([j["grain_ids"] for j in group]), [j["euler"] for j in group], load, settings)
        except Exception as err:  # noqa: BLE001 - any solver failure is a per-VE result, never fatal
            wall = (time.perf_counter() - start) / len(group)
            results = [
                cp.VEResult(
                    strain=load.strains,
                    stress_xx=np.full(load.increments + 1, np.nan),
                    converged=False,
                    reason=f"solver error: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}",
                    wall_s=wall,
                )
                for _ in group
            ]
        cpu = (time.process_time() - cpu0) / len(group)  # this worker's CPU seconds per VE (all its threads)
        for job, res in zip(group, results):
            records.append(_record(job, res, "spectral", len(group)) | {WALL_KEY: float(res.wall_s), CPU_KEY: cpu})
    return records


def _record(job: dict[str, Any], res: Any, backend: str, batch: int) -> dict[str, Any]:
    return {
        "ve_index": job["ve_index"],
        "n_grains": int(len(job["euler"])),
        "ve_size": int(job["grain_ids"].shape[0]),
        "backend": backend,
        "converged": bool(res.converged),
        "reason": res.reason,
        "newton_iterations": int(res.newton_iterations),
        "cg_iterations": int(res.cg_iterations),
        "cutbacks": int(res.cutbacks),
        "max_residual": float(res.max_residual),
        "batch": int(batch),
        "strain": [float(x) for x in res.strain],
        "sigma_xx_pa": [None if not np.isfinite(x) else float(x) for x in res.stress_xx],
    }


# --------------------------------------------------------------------------------------------------
# the stage


def simulate_set(
    params: Params,
    set_name: str,
    set_dir: Path,
    out: Path,
    *,
    plot: Path | None = None,
    plot_csv: Path | None = None,
    metrics: Path | None = None,
    scheduler: str | None = None,
    progress: bool = True,
    stop_after: int | None = None,
    damask_dir: Path | None = None,
) -> dict[str, Any]:
    """Simulate the first ``simulate.max_ves`` VEs of ``set_dir``; write curves, plot and metrics.

    ``scheduler``: ``None`` starts a ``LocalCluster`` (``simulate.workers`` processes of
    ``simulate.threads_per_worker`` torch threads; 0 workers = cores / threads), ``"inline"`` runs
    the tasks in this process without Dask, anything else is the address of a running Dask
    scheduler (``tcp://host:8786``). ``stop_after`` (tests) raises after that many parts were written,
    as a crash would. Returns the metrics dict.
    """
    sp = params.simulate
    check_backend(sp.backend)
    out = Path(out)
    parts_dir = parts_dir_for(out)
    jobs = load_ves(set_dir, sp.max_ves, set_name, sp.grid)
    config = sim_config(sp)
    for job in jobs:
        job["key"] = part_key(config, set_name, job["digest"])
        job["part"] = part_path(parts_dir, job["ve_index"], job["key"])
    parts_dir.mkdir(parents=True, exist_ok=True)
    _clean_parts(parts_dir, {j["part"].name for j in jobs})
    todo = [j for j in jobs if _read_part(j["part"]) is None]
    errors: list[str] = []
    walls: list[float] = []
    cpus: list[float] = []
    start = time.perf_counter()
    if todo:
        if sp.backend == "damask":
            damask_dir = damask_dir or out.with_suffix(".damask")
            _check_damask(todo, damask_dir, sp)
            batches = [[j] for j in todo]
            task, task_args = run_damask, (sp.model_dump(), str(damask_dir))
        else:
            batches = [todo[i : i + sp.batch_size] for i in range(0, len(todo), sp.batch_size)]
            task, task_args = run_spectral, (sp.model_dump(),)
        written = 0
        lines = progress and not sys.stderr.isatty()  # a log (dvc repro, CI): one line per finished VE

        def on_done(batch: list[dict[str, Any]], records: list[dict[str, Any]]) -> None:
            nonlocal written
            for job, rec in zip(batch, records):
                walls.append(float(rec.pop(WALL_KEY, float("nan"))))
                cpus.append(float(rec.pop(CPU_KEY, float("nan"))))
                rec.update({"set": set_name, "key": job["key"], "digest": job["digest"]})
                write_text(job["part"], json.dumps(rec, sort_keys=True) + "\n")
                written += 1
                advance()
                if lines:
                    print(progress_line(set_name, rec, written, len(todo), time.perf_counter() - start),
                          file=sys.stderr, flush=True)
                if stop_after is not None and written >= stop_after:
                    raise RuntimeError(f"injected failure after {written} VEs")

        from microfp.console import ProgressBar

        with ProgressBar(progress and not lines, f"simulate {set_name} ({sp.backend})", len(todo)) as advance:
            errors = _fan_out(batches, task, task_args, on_done, scheduler, sp)
    summary = merge_parts(jobs, out, config, set_name)
    if plot is not None or plot_csv is not None:
        plot_curves(out, plot, plot_csv, set_name)
    if metrics is not None:
        write_json(metrics, summary)
    summary = summary | {"timing": timing(walls, cpus, time.perf_counter() - start, sp, len(todo))}
    if errors:
        raise SimulateError(
            f"{len(errors)} task(s) failed ({errors[0]}); finished VEs were kept in {parts_dir}, rerun to retry the rest"
        )
    return summary


def progress_line(set_name: str, rec: dict[str, Any], done: int, total: int, elapsed_s: float) -> str:
    """One log line for a finished VE: its final sigma_xx (or why it failed), count and elapsed time."""
    final = rec["sigma_xx_pa"][-1]
    what = f"sigma_xx {final / 1e6:.1f} MPa" if rec["converged"] and final is not None else f"failed: {rec['reason']}"
    return f"simulate {set_name}: VE {rec['ve_index']} {what} ({done}/{total}, {elapsed_s:.0f} s)"


def timing(walls: list[float], cpus: list[float], elapsed_s: float, sp: SimulateParams, n_new: int) -> dict[str, float]:
    """Wall-clock facts of this run (for the log and MLflow, never for DVC-tracked files): the stage's
    wall seconds, its seconds per newly simulated VE, and the solver's own wall and CPU seconds per VE
    (wall >> CPU / threads: the worker waited for a core, i.e. the machine was oversubscribed)."""
    solver = [w for w in walls if np.isfinite(w)]
    cpu = [c for c in cpus if np.isfinite(c)]
    return {
        "solver_cpu_s_per_ve": float(np.mean(cpu)) if cpu else float("nan"),
        "n_simulated_now": float(n_new),
        "stage_wall_s": float(elapsed_s),
        "stage_s_per_ve": float(elapsed_s / n_new) if n_new else float("nan"),
        "solver_s_per_ve": float(np.mean(solver)) if solver else float("nan"),
        "batch_size": float(sp.batch_size),
        "threads_per_worker": float(sp.threads_per_worker),
    }


def local_workers(sp: SimulateParams) -> int:
    """Worker processes of a LocalCluster: ``simulate.workers``, or cores / threads_per_worker when 0."""
    from microfp.runtime import resolve_workers

    return sp.workers or max(1, resolve_workers(0) // sp.threads_per_worker)


def worker_environ(threads: int) -> dict[str, Any]:
    """Dask config for the environment of local worker processes.

    Dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536`` (give freed memory back to the OS
    at once), while the solver frees and reallocates tens of MB of temporaries per voxel update; a 1 GiB
    threshold keeps them. The thread variables are set to the torch threads of a worker. (Measured on a
    loaded 2-core machine, 8 VEs at 16^3: 21.8 CPU s per VE in a Dask worker before, 20.0 after, against
    6.0 in the main process: most of the worker's excess is still unexplained, see :func:`_fan_out`.)
    """
    env = {"MALLOC_TRIM_THRESHOLD_": str(2**30), "OMP_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads)}
    return {f"distributed.nanny.pre-spawn-environ.{k}": v for k, v in env.items()}


def _fan_out(
    batches: list[list[dict[str, Any]]],
    task: Callable,
    task_args: tuple,
    on_done: Callable,
    scheduler: str | None,
    sp: SimulateParams,
) -> list[str]:
    """Run ``task(batch, *task_args)`` for every batch; call ``on_done`` as each finishes (in this process)."""
    errors: list[str] = []
    if scheduler is None and local_workers(sp) == 1:
        # one worker: solve in this process (no cluster start-up, and on the loaded 2-core machine the same
        # 16^3 VEs cost 6 CPU s each here, 20-22 in a Dask worker process; cause not found)
        scheduler = "inline"
    if scheduler == "inline":
        for batch in batches:
            on_done(batch, task(_payload(batch), *task_args))
        return errors
    import logging

    from distributed import Client, LocalCluster, as_completed

    for name in ("distributed", "distributed.scheduler", "distributed.nanny", "distributed.core", "distributed.http"):
        logging.getLogger(name).setLevel(logging.WARNING)
    cluster = None
    if scheduler is None:
        import dask

        threads = sp.threads_per_worker
        workers = min(local_workers(sp), len(batches))
        with dask.config.set(worker_environ(threads)):
            cluster = LocalCluster(
                n_workers=workers,
                threads_per_worker=1,  # one task at a time per process; torch uses threads_per_worker threads
                processes=True,
                dashboard_address=":0",
                memory_limit=0,
                silence_logs=40,
            )
        client = Client(cluster)
    else:
        try:
            client = Client(scheduler, timeout="30s")
        except OSError as err:
            raise SimulateError(f"cannot reach the Dask scheduler at {scheduler} ({err})") from None
    try:
        futures = {}
        for batch in batches:
            fut = client.submit(task, _payload(batch), *task_args, pure=False)
            futures[fut] = batch
        for fut in as_completed(futures):
            batch = futures[fut]
            try:
                records = fut.result()
            except Exception as err:  # noqa: BLE001 - a dead worker: report, keep the others
                errors.append(f"VEs {[j['ve_index'] for j in batch]}: {type(err).__name__}: {str(err)[:200]}")
                continue
            on_done(batch, records)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    return errors


def _payload(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What a worker needs of each job (no paths)."""
    return [{k: j[k] for k in ("ve_index", "grain_ids", "euler", "resolution")} for j in batch]


def _read_part(path: Path) -> dict[str, Any] | None:
    try:
        rec = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return rec if isinstance(rec, dict) and "sigma_xx_pa" in rec else None


def _clean_parts(parts_dir: Path, keep: set[str]) -> None:
    """Remove temp files of killed runs and parts of other parameters or other VEs."""
    for path in parts_dir.iterdir():
        if path.name.startswith(".") and ".tmp" in path.name:
            path.unlink(missing_ok=True)
        elif path.suffix == ".json" and path.name.startswith("ve-") and path.name not in keep:
            path.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------
# output


def curve_columns(n_points: int, unit: str = "mpa") -> list[str]:
    return [f"sigma_xx_{unit}_{i:02d}" for i in range(n_points)]


def merge_parts(jobs: list[dict[str, Any]], out: Path, config: dict[str, Any], set_name: str) -> dict[str, Any]:
    """Merge the parts of ``jobs`` into ``out`` (parquet); returns summary metrics."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    strain = None
    for job in jobs:
        rec = _read_part(job["part"])
        if rec is None:
            continue
        strain = rec["strain"]
        pa_vals = np.array([np.nan if v is None else v for v in rec["sigma_xx_pa"]], dtype=np.float64)
        row = {k: rec[k] for k in ("ve_index", "n_grains", "ve_size", "backend", "converged", "reason",
                                   "newton_iterations", "cg_iterations", "cutbacks", "max_residual")}
        row["set"] = set_name
        row.update(dict(zip(curve_columns(len(pa_vals), "pa"), pa_vals)))
        row.update(dict(zip(curve_columns(len(pa_vals), "mpa"), pa_vals / 1e6)))
        rows.append(row)
    n_points = config["increments"] + 1
    columns = ["set", "ve_index", "converged", "reason", "backend", "n_grains", "ve_size", "newton_iterations",
               "cg_iterations", "cutbacks", "max_residual"] + curve_columns(n_points, "pa") + curve_columns(n_points, "mpa")
    df = pd.DataFrame(rows, columns=columns).sort_values("ve_index").reset_index(drop=True)
    if strain is None:
        strain = list(np.linspace(0, config["strain"], n_points))
    table = pa.Table.from_pandas(df, preserve_index=False)
    meta = dict(table.schema.metadata or {})
    meta[b"microfp"] = json.dumps({"strain": strain, "config": config, "set": set_name}).encode()
    table = table.replace_schema_metadata(meta)
    with atomic_output(out) as tmp:
        pq.write_table(table, tmp)
    conv = df[df["converged"]]
    mpa = conv[curve_columns(n_points, "mpa")].to_numpy()
    # headline numbers only (DVC metrics); per-VE detail is in the parquet and the plots
    summary = {
        "n_converged": int(len(conv)),
        "converged_fraction": float(len(conv) / len(jobs)) if jobs else 0.0,
        "final_stress_mpa_mean": float(mpa[:, -1].mean()) if len(mpa) else float("nan"),
        "final_stress_mpa_std": float(mpa[:, -1].std()) if len(mpa) else float("nan"),
    }
    return summary


def read_curves(path: str | Path, converged_only: bool = True):
    """``(table, strain (P,), stress_mpa (N, P))`` of a curves parquet; failed VEs dropped by default."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise SimulateError(f"{path}: no such curves file (run `microfp simulate` first)")
    table = pq.read_table(path)
    meta = json.loads((table.schema.metadata or {}).get(b"microfp", b"{}"))
    df = table.to_pandas()
    if converged_only:
        df = df[df["converged"]].reset_index(drop=True)
    strain = np.asarray(meta.get("strain", []), dtype=np.float64)
    cols = [c for c in df.columns if c.startswith("sigma_xx_mpa_")]
    return df, strain, df[cols].to_numpy(dtype=np.float64)


def plot_curves(curves: Path, png: Path | None, csv: Path | None, title: str) -> None:
    """Stress-strain curves (MPa vs strain) as PNG, and mean/std/min/max per point as CSV (DVC plots)."""
    df, strain, mpa = read_curves(curves)
    if csv is not None:
        lines = ["strain,mean_mpa,std_mpa,min_mpa,max_mpa"]
        for i, e in enumerate(strain):
            col = mpa[:, i] if len(mpa) else np.array([np.nan])
            lines.append(f"{e:.6g},{np.mean(col):.6g},{np.std(col):.6g},{np.min(col):.6g},{np.max(col):.6g}")
        write_text(csv, "\n".join(lines) + "\n")
    if png is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5.5, 4))
        for row in mpa:
            ax.plot(strain * 100, row, color="0.6", lw=0.7)
        if len(mpa):
            ax.plot(strain * 100, mpa.mean(0), color="C0", lw=2, label="mean")
            ax.legend(loc="lower right")
        total = len(read_curves(curves, converged_only=False)[0])
        ax.set_xlabel("strain eps_xx (%)")
        ax.set_ylabel("sigma_xx (MPa)")
        ax.set_title(f"{title}: {len(mpa)} of {total} VEs converged", fontsize=9)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        save_figure(fig, png)


# --------------------------------------------------------------------------------------------------
# DAMASK backend


def damask_phase(twinning: bool = True) -> dict[str, Any]:
    """The ``Mg`` phase of material.yaml: Hooke + phenopowerlaw with the reference values (cp.MG)."""
    from microfp import cp

    p = cp.MG
    slip = {k: [] for k in ("xi_0", "xi_inf")}
    fam = iter(p.slip)
    for n in p.N_slip_damask:
        if n:
            _, _, x0, xinf = next(fam)
        else:
            x0 = xinf = 0.0
        slip["xi_0"].append(x0)
        slip["xi_inf"].append(xinf)
    plastic: dict[str, Any] = {
        "type": "phenopowerlaw",
        "references": ["F. Wang et al., Acta Materialia 80:77-93, 2014, https://doi.org/10.1016/j.actamat.2014.07.048"],
        "output": ["xi_sl", "gamma_sl"],
        "N_sl": list(p.N_slip_damask),
        "xi_0_sl": slip["xi_0"],
        "xi_inf_sl": slip["xi_inf"],
        "dot_gamma_0_sl": p.dot_gamma_0,
        "n_sl": p.n,
        "a_sl": p.a_sl,
        "h_0_sl-sl": p.h_0_sl_sl,
        # interaction coefficients: all 1 (reference file); as many entries as DAMASK's Mg example
        "h_sl-sl": [1.0] * 69,
    }
    if twinning:
        tw = iter(p.twin)
        xi0_tw = [next(tw)[2] if n else 0.0 for n in p.N_twin_damask[:3]]
        plastic.update(
            {
                "output": ["xi_sl", "gamma_sl", "xi_tw", "gamma_tw"],
                "N_tw": list(p.N_twin_damask[:3]),
                "xi_0_tw": xi0_tw,
                "dot_gamma_0_tw": p.dot_gamma_0,
                "n_tw": p.n,
                "f_sat_sl-tw": p.f_sat_sl_tw,
                "h_0_tw-tw": p.h_0_tw_tw,
                "h_0_tw-sl": p.h_0_tw_sl,
                "h_tw-tw": [1.0] * 12,
                "h_tw-sl": [1.0] * 20,
                "h_sl-tw": [1.0] * 19,
            }
        )
    return {
        "lattice": "hP",
        "c/a": p.c_over_a,
        "mechanical": {
            "output": ["F", "P"],
            "elastic": {"type": "Hooke", "C_11": p.C11, "C_12": p.C12, "C_13": p.C13, "C_33": p.C33, "C_44": p.C44},
            "plastic": plastic,
        },
    }


def damask_load(sp: SimulateParams, shear: str = "stress") -> dict[str, Any]:
    """Load case of uniaxial tension along x: dot_F_xx prescribed, P_yy = P_zz = 0, no rotation.

    ``shear="stress"`` (default): the spectral backend's (and the paper's) load, zero mean shear
    stresses: P_xy = P_xz = P_yz = 0 with the lower off-diagonal rates dot_F_yx = dot_F_zx = dot_F_zy = 0
    (which suppress the rigid rotation; then the Cauchy shear stresses are exactly zero as well).
    ``shear="strain"``: DAMASK's usual tensionX, all off-diagonal rates zero (shear strains held).
    """
    x = "x"
    if shear == "stress":
        dot_F = [[sp.strain_rate, x, x], [0, x, x], [0, 0, x]]
        P = [[x, 0, 0], [x, 0, 0], [x, x, 0]]
    elif shear == "strain":
        dot_F = [[sp.strain_rate, 0, 0], [0, x, 0], [0, 0, x]]
        P = [[x, x, x], [x, 0, x], [x, x, 0]]
    else:
        raise SimulateError(f"shear must be 'stress' or 'strain', got {shear!r}")
    return {
        "solver": {"mechanical": "spectral_basic"},
        "loadstep": [
            {
                "boundary_conditions": {"mechanical": {"dot_F": dot_F, "P": P}},
                "discretization": {"t": sp.strain / sp.strain_rate, "N": sp.increments},
                "f_out": 1,
            }
        ],
    }


def write_damask_job(job_dir: Path, job: dict[str, Any], sp: SimulateParams, shear: str = "stress") -> dict[str, Path]:
    """Write ``grid.vti``, ``material.yaml`` (phase Mg) and ``load.yaml`` of one VE into ``job_dir``."""
    import damask

    from microfp import formats

    job_dir = Path(job_dir)
    ves = shards.VESet.from_ves([(job["grain_ids"], job["euler"].astype(np.float32))], crystal="hexagonal",
                                resolution=job["resolution"], ve_index=[job["ve_index"]])
    vti, material = formats.write_damask(job_dir, ves, 0, phase_name="Mg", name="grid", overwrite=True)
    config = damask.ConfigMaterial.load(material)
    config["phase"]["Mg"] = damask_phase(sp.twinning)
    config["homogenization"]["SX"] = {"N_constituents": 1, "mechanical": {"type": "pass"}}
    with atomic_output(material) as tmp:
        config.save(tmp)
    load_path = job_dir / "load.yaml"
    with atomic_output(load_path) as tmp:
        damask.LoadcaseGrid(damask_load(sp, shear)).save(tmp)
    return {"grid": vti, "material": material, "load": load_path}


def _check_damask(todo: list[dict[str, Any]], damask_dir: Path, sp: SimulateParams) -> None:
    """Write the DAMASK inputs; stop with one line if DAMASK_grid is not installed."""
    if shutil.which("DAMASK_grid") is None:
        for job in todo:
            write_damask_job(damask_dir / f"ve-{job['ve_index']:06d}", job, sp)
        raise SimulateError(
            f"DAMASK_grid not found on PATH; wrote the DAMASK inputs of {len(todo)} VEs to {damask_dir} "
            "(run them with DAMASK_grid, or use simulate.backend: spectral)"
        )


def run_damask(jobs: list[dict[str, Any]], sp_dict: dict[str, Any], damask_dir: str, shear: str = "stress") -> list[dict[str, Any]]:
    """Run DAMASK_grid on each VE; read the volume-averaged sigma_xx per increment (``shear``: see
    :func:`damask_load`)."""
    from microfp import cp

    sp = SimulateParams(**sp_dict)
    load = cp.Load(strain=sp.strain, rate=sp.strain_rate, increments=sp.increments)
    records = []
    for job in jobs:
        job_dir = Path(damask_dir) / f"ve-{job['ve_index']:06d}"
        start = time.perf_counter()
        res = cp.VEResult(strain=load.strains, stress_xx=np.full(load.increments + 1, np.nan), converged=False)
        try:
            files = write_damask_job(job_dir, job, sp, shear)
            env = {**os.environ, "OMP_NUM_THREADS": str(sp.threads_per_worker)}
            proc = subprocess.run(
                ["DAMASK_grid", "--load", files["load"].name, "--geom", files["grid"].name,
                 "--material", files["material"].name, "--jobname", "result"],
                cwd=job_dir, env=env, capture_output=True, text=True,
            )
            (job_dir / "DAMASK_grid.log").write_text(proc.stdout + proc.stderr)
            result = job_dir / "result.hdf5"
            if not result.exists():
                found = sorted(job_dir.glob("*.hdf5"))
                result = found[0] if found else result
            if result.exists():
                sigma = read_damask_stress(result)
                n = min(len(sigma), load.increments + 1)
                res.stress_xx[:n] = sigma[:n]
            res.converged = proc.returncode == 0 and bool(np.isfinite(res.stress_xx).all())
            if not res.converged:
                res.reason = f"DAMASK_grid exit code {proc.returncode}" + (
                    f", {np.isfinite(res.stress_xx).sum()} of {load.increments + 1} increments" if result.exists() else ", no result file"
                )
        except Exception as err:  # noqa: BLE001 - per-VE failure record
            res.reason = f"DAMASK error: {type(err).__name__}: {str(err)[:200]}"
        res.wall_s = time.perf_counter() - start
        if not res.converged:
            res.stress_xx[:] = np.nan
        records.append(_record(job, res, "damask", 1) | {WALL_KEY: float(res.wall_s)})
    return records


def read_damask_stress(result: Path) -> np.ndarray:
    """Volume-averaged Cauchy sigma_xx (Pa) at every written increment of a DAMASK result file."""
    import damask

    r = damask.Result(str(result))
    r.add_stress_Cauchy()
    data = r.get("sigma")
    if isinstance(data, dict) and data and all(isinstance(v, dict) for v in data.values()):
        data = {k: next(iter(v.values())) for k, v in data.items()}
    if not isinstance(data, dict):
        data = {"increment_0": data}
    keys = sorted(data, key=lambda k: int(str(k).split("_")[-1]))
    return np.array([float(np.mean(np.asarray(data[k])[..., 0, 0])) for k in keys])


# --------------------------------------------------------------------------------------------------
# the command


def simulate_command(
    set_name: Annotated[str, typer.Argument(metavar="SET", help="Set to simulate (hexagonal), e.g. hcp.")],
    params: Annotated[Path, typer.Option("--params", "-p", help="Parameter file.")] = Path("params.yaml"),
    ves: Annotated[Optional[Path], typer.Option(help="Shard directory (default: data/ves/SET).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Curves parquet (default: data/curves/SET.parquet); parts go to OUT.parts/.")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="Stress-strain PNG (default: plots/curves/SET.png).")] = None,
    plot_csv: Annotated[Optional[Path], typer.Option(help="Curve statistics CSV for DVC plots (default: plots/curves/SET.csv).")] = None,
    metrics: Annotated[Optional[Path], typer.Option(help="Summary JSON (default: metrics/simulate/SET.json).")] = None,
    scheduler: Annotated[Optional[str], typer.Option(help="Dask scheduler address (tcp://host:8786) or 'inline' (default: a LocalCluster).")] = None,
    backend: Annotated[Optional[str], typer.Option(help="spectral | damask (default: simulate.backend).")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Simulate uniaxial tension of the VEs of a set with HCP Mg crystal plasticity (paper 2.3).

    Strain 0.01 at 1e-3 /s in 20 increments along x, zero mean stress otherwise; the first
    simulate.max_ves VEs. Writes one row per VE (21 volume-averaged sigma_xx, convergence, iterations,
    wall time) to data/curves/SET.parquet, the curves to plots/curves/SET.png and .csv, and a summary
    to metrics/simulate/SET.json. Finished VEs are kept in data/curves/SET.parts/, so a killed run
    resumes; VEs that do not converge are recorded with the reason, not fatal.
    """
    p = load_params(params)
    if backend is not None:
        check_backend(backend)
        p = p.model_copy(update={"simulate": p.simulate.model_copy(update={"backend": backend})})
    out = out or Path("data/curves") / f"{set_name}.parquet"
    summary = simulate_set(
        p,
        set_name,
        ves or Path("data/ves") / set_name,
        out,
        plot=plot or Path("plots/curves") / f"{set_name}.png",
        plot_csv=plot_csv or Path("plots/curves") / f"{set_name}.csv",
        metrics=metrics or Path("metrics/simulate") / f"{set_name}.json",
        scheduler=scheduler,
        progress=progress,
    )
    t = summary["timing"]
    typer.echo(
        f"{set_name}: {summary['n_converged']} of {p.simulate.max_ves} VEs converged ({p.simulate.backend}), "
        f"sigma_xx at {p.simulate.strain:g} strain {summary['final_stress_mpa_mean']:.1f} +- "
        f"{summary['final_stress_mpa_std']:.1f} MPa; {out}"
    )
    if t["n_simulated_now"]:
        typer.echo(f"{set_name}: {t['n_simulated_now']:.0f} VEs simulated in {t['stage_wall_s']:.0f} s, "
                   f"{t['stage_s_per_ve']:.2f} s/VE (solver {t['solver_s_per_ve']:.2f} s wall, "
                   f"{t['solver_cpu_s_per_ve']:.2f} s CPU per VE in its worker)", err=True)
        _log_mlflow(p, set_name, summary)


def _log_mlflow(params: Params, set_name: str, summary: dict[str, Any]) -> None:
    """The run's headline metrics and its timings (which stay out of the DVC-tracked files) to MLflow."""
    from microfp.tracking import log_finished_run

    try:
        log_finished_run("microfp-simulate", "simulate", {"set": set_name, **params.simulate.model_dump()}, summary)
    except Exception as err:  # noqa: BLE001 - tracking is a convenience, never a reason to fail the stage
        typer.echo(f"simulate: MLflow logging failed ({type(err).__name__}: {str(err)[:120]})", err=True)
