"""The spectral solver against the real DAMASK_grid: the same HCP Mg VEs, twinning on and off.

For ``--n`` VEs at 16^3 (and ``--n32`` at 32^3) of the paper's morphology (random texture), both
backends simulate uniaxial tension along x to 1 % in 20 increments, with twinning on and off. Reports
per increment the relative difference of the volume-averaged Cauchy sigma_xx (spectral / DAMASK - 1;
max over VEs of |diff| and mean over VEs of diff), and the wall time of each backend on the same
number of threads (``--threads``, OMP_NUM_THREADS for DAMASK, torch threads for the spectral solver).

DAMASK costs ~80 s per 16^3 VE and ~12 min per 32^3 VE on one thread, so its results are kept in
``--work`` (one folder per VE and twin setting, ``sigma.json`` with the curve and its wall time) and
reused by later runs; ``--retime K`` reruns DAMASK on the first K 16^3 VEs (twinning off and on) in
this run, so the speed ratio is always measured in one run on the same machine state. Needs
DAMASK_grid on PATH (scripts/build-damask.sh).

    nice -n 10 python benchmarks/bench_vs_damask.py --json benchmarks/results/vs-damask.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_simulate import make_ves  # noqa: E402

from microfp import cp, simulate  # noqa: E402
from microfp.config import SimulateParams  # noqa: E402


LAST_CPU_S_PER_VE = float("nan")
"""CPU seconds per VE of the last spectral run (this process; robust to a loaded machine)."""


def rel_diff(spectral: np.ndarray, damask: np.ndarray) -> np.ndarray:
    """(..., P-1) spectral / DAMASK - 1 at every increment after the first point (sigma = 0 there)."""
    return spectral[..., 1:] / damask[..., 1:] - 1.0


def case_dir(work: Path, job: dict, twinning: bool, shear: str) -> Path:
    """Cache folder of one DAMASK run (``shear="strain"``: DAMASK's usual tensionX load)."""
    return work / (f"{job['name']}-tw{int(twinning)}" + ("" if shear == "strain" else "-shear-stress"))


def run_damask_case(job: dict, twinning: bool, threads: int, work: Path, fresh: bool, shear: str) -> dict:
    """DAMASK's curve (Pa, 21 points) and wall time of one VE, from the cache unless ``fresh``."""
    case = case_dir(work, job, twinning, shear)
    cached = case / "sigma.json"
    if cached.exists() and not fresh:
        return json.loads(cached.read_text()) | {"cached": True}
    if case.exists():
        shutil.rmtree(case)
    sp = SimulateParams(backend="damask", twinning=twinning, threads_per_worker=threads)
    start = time.perf_counter()
    rec = simulate.run_damask([job], sp.model_dump(), str(case), shear=shear)[0]
    wall = time.perf_counter() - start
    if not rec["converged"]:
        raise RuntimeError(f"DAMASK failed on {job['name']} (twinning {twinning}): {rec['reason']}")
    out = {"sigma_xx_pa": rec["sigma_xx_pa"], "wall_s": wall, "threads": threads}
    for h5 in case.rglob("*.hdf5"):
        h5.unlink()  # ~90 MB each; the curve is what is kept
    cached.write_text(json.dumps(out) + "\n")
    return out | {"cached": False}


def cached_damask(job: dict, twinning: bool, work: Path, shear: str, n_points: int = 21) -> dict | None:
    """DAMASK's cached curve of one VE, or the increments written so far by a run still going (or
    killed): read from a copy of its result file, NaN after the last written increment. None if neither."""
    case = case_dir(work, job, twinning, shear)
    if (case / "sigma.json").exists():
        return json.loads((case / "sigma.json").read_text()) | {"cached": True, "partial": False}
    found = sorted(case.rglob("result.hdf5"))
    if not found:
        return None
    copy = case / "partial-copy.hdf5"
    try:
        shutil.copyfile(found[0], copy)
        sigma = simulate.read_damask_stress(copy)
    except Exception:  # noqa: BLE001 - an increment half written: nothing usable
        return None
    finally:
        copy.unlink(missing_ok=True)
    curve = np.full(n_points, np.nan)
    curve[: min(len(sigma), n_points)] = sigma[:n_points]
    return {"sigma_xx_pa": curve.tolist(), "wall_s": float("nan"), "cached": True, "partial": True}


def run_spectral_case(jobs: list[dict], twinning: bool, threads: int, batched: bool,
                      shear: str = "stress") -> tuple[np.ndarray, float]:
    """(B, 21) sigma_xx (Pa) and wall seconds per VE; one VE at a time unless ``batched``."""
    torch.set_num_threads(threads)
    load = cp.Load(strain=0.01, rate=1e-3, increments=20, shear=shear)
    settings = cp.SolverSettings(twinning=twinning)
    groups = [jobs] if batched else [[j] for j in jobs]
    curves, start = [], time.perf_counter()
    global LAST_CPU_S_PER_VE
    cpu0 = time.process_time()
    for group in groups:
        res = cp.solve(np.stack([j["grain_ids"] for j in group]), [j["euler"] for j in group], load, settings)
        for r in res:
            if not r.converged:
                raise RuntimeError(f"spectral solver failed: {r.reason}")
            curves.append(r.stress_xx)
    LAST_CPU_S_PER_VE = (time.process_time() - cpu0) / len(jobs)
    return np.array(curves), (time.perf_counter() - start) / len(jobs)


def jobs_for(size: int, n: int, seed: int) -> list[dict]:
    ves = make_ves(size, n, seed=seed)
    return [
        {"name": f"{size}-{seed}-{i}", "ve_index": i, "grain_ids": ves.grain_ids[i].astype(np.int64),
         "euler": ves.grain_euler(i).astype(np.float64), "resolution": float(ves.resolution),
         "n_grains": int(len(ves.grain_euler(i)))}
        for i in range(len(ves))
    ]


def compare(jobs: list[dict], twinning: bool, args, retime: int) -> dict:
    """Both backends on ``jobs`` with one twin setting: per-increment differences and timings."""
    if args.cached_only:
        found = [(j, cached_damask(j, twinning, args.work, args.shear)) for j in jobs]
        jobs, dam = [j for j, x in found if x], [x for _, x in found if x]
        retime = 0
        if not jobs:
            return None
    else:
        dam = [run_damask_case(j, twinning, args.threads, args.work, i < retime, args.shear) for i, j in enumerate(jobs)]
    d = np.array([x["sigma_xx_pa"] for x in dam], dtype=np.float64)
    s, spectral_s = run_spectral_case(jobs, twinning, args.threads, False, args.shear)
    diff = rel_diff(s, d)
    fresh = [x["wall_s"] for x in dam if not x["cached"]]
    with np.errstate(all="ignore"):
        per_inc_max = np.nanmax(np.abs(diff), axis=0)
        per_inc_mean = np.nanmean(diff, axis=0)
    entry = {
        "n_ves": len(jobs),
        "ves": [j["name"] for j in jobs],
        "partial_damask_runs": [j["name"] for j, x in zip(jobs, dam) if x.get("partial")],
        "increments_compared": int(np.isfinite(d[:, 1:]).all(axis=0).sum()),
        "n_grains": [j["n_grains"] for j in jobs],
        "max_abs_rel_diff_per_increment": [None if not np.isfinite(v) else round(float(v), 6) for v in per_inc_max],
        "mean_rel_diff_per_increment": [None if not np.isfinite(v) else round(float(v), 6) for v in per_inc_mean],
        "max_abs_rel_diff": float(np.nanmax(np.abs(diff))),
        "spectral_final_mpa": (s[:, -1] / 1e6).round(3).tolist(),
        "damask_final_mpa": [None if not np.isfinite(v) else round(float(v), 3) for v in d[:, -1] / 1e6],
        "spectral_s_per_ve": spectral_s,
        "spectral_cpu_s_per_ve": LAST_CPU_S_PER_VE,
        "damask_s_per_ve_this_run": float(np.mean(fresh)) if fresh else None,
        "damask_s_per_ve_cached": float(np.nanmean([x["wall_s"] for x in dam if x["cached"]])) if len(fresh) < len(dam) else None,
    }
    if fresh:
        # the same VEs, one at a time, in this run: the ratio of like with like
        t0 = time.perf_counter()
        run_spectral_case(jobs[:retime], twinning, args.threads, False, args.shear)
        entry["speed_ratio_same_ves"] = float(np.mean(fresh) / ((time.perf_counter() - t0) / retime))
    tag = "on " if twinning else "off"
    print(f"{jobs[0]['grain_ids'].shape[0]}^3 twins {tag}: {len(jobs)} VEs, {entry['increments_compared']} increments, "
          f"max |rel diff| {entry['max_abs_rel_diff']:.4f}, mean at the last {per_inc_mean[np.isfinite(per_inc_mean)][-1]:+.4f}; "
          f"spectral {spectral_s:.1f} s/VE, DAMASK "
          f"{entry['damask_s_per_ve_this_run'] or entry['damask_s_per_ve_cached'] or float('nan'):.1f} s/VE"
          + (f" (x{entry['speed_ratio_same_ves']:.1f} same VEs, this run)" if fresh else " (cached)"), flush=True)
    return entry


# --------------------------------------------------------------------------------------------------
# --diagnose: where the remaining difference comes from (stress measure, Nyquist modes, time step)

IDX = [0, 1, 2, 3, 4, 5, 7, 9, 14, 19]  # increments shown in the printed rows (1-based: 1..6, 8, 10, 15, 20)


def damask_measures(job: dict, twinning: bool, work: Path) -> dict:
    """DAMASK run of one job with outputs F, P, F_e, S (kept in ``work``, reused): per increment the
    volume averages of the Cauchy sigma_xx and of (R_e S R_e^T)_xx, the lattice-frame 2nd Piola-Kirchhoff
    stress that drives slip in DAMASK (M_p = F_i^T F_i S = S) rotated to the lab, and the mean lattice
    rotation since the start (deg)."""
    import damask

    base = work / f"diagnose-{job['name']}-tw{int(twinning)}"
    h5 = base / f"ve-{job['ve_index']:06d}" / "result.hdf5"
    wall = float("nan")
    if not (base / "done").exists():
        phase = simulate.damask_phase

        def with_stress(tw: bool = True) -> dict:
            ph = phase(tw)
            ph["mechanical"]["output"] = ["F", "P", "F_e", "S"]
            return ph

        simulate.damask_phase = with_stress
        try:
            t0 = time.perf_counter()
            simulate.run_damask([job], SimulateParams(backend="damask", twinning=twinning).model_dump(), str(base), shear="strain")
            wall = time.perf_counter() - t0
        finally:
            simulate.damask_phase = phase
        (base / "done").write_text(f"{wall}\n")
    r = damask.Result(str(h5))
    out: dict[str, list] = {"cauchy": [], "RSR": [], "rotation_deg": []}
    R0 = None
    for inc in r.increments:
        v = r.view(increments=inc)
        F, P, Fe, S = (np.asarray(v.get(k)).reshape(-1, 3, 3) for k in ("F", "P", "F_e", "S"))
        R = damask.mechanics.rotation(Fe).as_matrix().reshape(-1, 3, 3)
        R0 = R if R0 is None else R0
        dR = R @ np.swapaxes(R0, 1, 2)
        out["cauchy"].append(float(damask.mechanics.stress_Cauchy(P, F)[:, 0, 0].mean()))
        out["RSR"].append(float((R @ S @ np.swapaxes(R, 1, 2))[:, 0, 0].mean()))
        out["rotation_deg"].append(float(np.degrees(np.arccos(np.clip((np.trace(dR, axis1=1, axis2=2) - 1) / 2, -1, 1))).mean()))
    return out


def _rel(a, b) -> list[float]:
    a, b = np.asarray(a, float), np.asarray(b, float)
    return [round(float(x), 5) for x in a[1:] / b[1:] - 1]


def _row(label: str, rel: list[float]) -> str:
    r = np.asarray(rel)
    return f"  {label:44s} max|d| {np.abs(r).max() * 100:5.2f}%  d%: " + " ".join(f"{x * 100:+.2f}" for x in r[IDX])


def diagnose(args) -> dict:
    """Homogeneous crystals and one 16^3 VE through both solvers, with DAMASK's stress measures; the
    spectral solver's Nyquist conventions against a 32^3 refinement; its time step (20 vs 40 increments)."""
    torch.set_num_threads(args.threads)
    jobs = jobs_for(16, max(args.n, 1), args.seed)
    load = cp.Load(shear="strain")
    report: dict = {"shear_held_at_zero": "strain", "solver_version": simulate.SOLVER_VERSION, "crystals": {}, "ve": {}}

    def ours(ids, euler, **kw) -> np.ndarray:
        ld = cp.Load(shear="strain", increments=kw.pop("increments", 20))
        r = cp.solve(ids[None], [euler], ld, cp.SolverSettings(**kw))[0]
        if not r.converged:
            raise RuntimeError(r.reason)
        return np.interp(load.strains, r.strain, r.stress_xx)

    print("homogeneous crystals (4^3 grid, one grain): spectral / DAMASK - 1", flush=True)
    for tw in (True, False):
        for k, e in enumerate(jobs[0]["euler"][: args.crystals]):
            job = {"name": f"crystal{k}", "ve_index": k, "grain_ids": np.zeros((4, 4, 4), np.int64),
                   "euler": e[None].astype(np.float64), "resolution": 1.0, "n_grains": 1}
            m = damask_measures(job, tw, args.work)
            c = ours(job["grain_ids"], job["euler"], twinning=tw)
            sm = ours(job["grain_ids"], job["euler"], twinning=tw, stress_measure="small")
            rows = {"cauchy_vs_damask_cauchy": _rel(c, m["cauchy"]), "small_vs_damask_cauchy": _rel(sm, m["cauchy"]),
                    "small_vs_damask_RSR": _rel(sm, m["RSR"])}
            report["crystals"][f"{job['name']} twins {'on' if tw else 'off'}"] = rows | {
                "euler_rad": e.tolist(), "damask_cauchy_mpa": [round(x / 1e6, 4) for x in m["cauchy"]],
                "lattice_rotation_deg_at_1pct": round(m["rotation_deg"][-1], 3)}
            print(f" {job['name']} twins {'on' if tw else 'off'} (lattice rotation at 1 %: {m['rotation_deg'][-1]:.2f} deg)", flush=True)
            for key, rel in rows.items():
                print(_row(key, rel), flush=True)
    for tw in (True, False):
        job = jobs[args.diagnose_ve]
        m = damask_measures(job, tw, args.work)
        g = job["grain_ids"]
        g2 = g.repeat(2, 0).repeat(2, 1).repeat(2, 2)
        curves = {
            "reduced (v4), cauchy": ours(g, job["euler"], twinning=tw),
            "reduced, small": ours(g, job["euler"], twinning=tw, stress_measure="small"),
            "drop (v3), small": ours(g, job["euler"], twinning=tw, stress_measure="small", nyquist="drop"),
            "reduced, small, 40 increments": ours(g, job["euler"], twinning=tw, stress_measure="small", increments=40),
        }
        if args.refine:
            curves["32^3 refinement, reduced, small"] = ours(g2, job["euler"], twinning=tw, stress_measure="small")
            curves["32^3 refinement, drop, small"] = ours(g2, job["euler"], twinning=tw, stress_measure="small", nyquist="drop")
        rows = {f"{k} vs DAMASK cauchy": _rel(v, m["cauchy"]) for k, v in curves.items()}
        rows |= {f"{k} vs DAMASK RSR": _rel(v, m["RSR"]) for k, v in curves.items() if "small" in k and "32" not in k}
        rows["reduced, small, 20 vs 40 increments"] = _rel(curves["reduced, small"], curves["reduced, small, 40 increments"])
        if args.refine:
            for k in ("reduced", "drop"):
                rows[f"16^3 {k} vs 32^3 reduced (small)"] = _rel(curves[f"{k} (v3), small" if k == "drop" else "reduced, small"],
                                                                 curves["32^3 refinement, reduced, small"])
        key = f"{job['name']} twins {'on' if tw else 'off'}"
        report["ve"][key] = rows | {"damask_cauchy_over_RSR_minus_1": _rel(m["cauchy"], m["RSR"]),
                                   "damask_cauchy_mpa": [round(x / 1e6, 4) for x in m["cauchy"]],
                                   "lattice_rotation_deg_at_1pct": round(m["rotation_deg"][-1], 3)}
        print(f"VE {key} (16^3): spectral / DAMASK - 1", flush=True)
        for k, rel in rows.items():
            print(_row(k, rel), flush=True)
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8, help="VEs at 16^3")
    ap.add_argument("--n32", type=int, default=1, help="VEs at 32^3")
    ap.add_argument("--twins", default="on,off", help="twin settings to run: on,off | on | off")
    ap.add_argument("--twins32", default="on,off", help="twin settings at 32^3")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--retime", type=int, default=1, help="16^3 VEs rerun by DAMASK in this run, for the speed ratio")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--shear", default="strain", choices=["strain", "stress"],
                    help="mean shear strains held at zero (DAMASK's usual tensionX) or shear stresses (the paper's load)")
    ap.add_argument("--work", type=Path, default=Path("benchmarks/.damask-work"))
    ap.add_argument("--json", type=Path)
    ap.add_argument("--damask-only", action="store_true", help="only fill the DAMASK cache")
    ap.add_argument("--cached-only", action="store_true",
                    help="compare the VEs DAMASK has finished (or partly finished) in --work; run no DAMASK")
    ap.add_argument("--reverse", action="store_true", help="with --damask-only: the VEs in reverse order")
    ap.add_argument("--take-over", action="store_true", help="with --damask-only: rerun cases left half done")
    ap.add_argument("--diagnose", action="store_true",
                    help="homogeneous crystals and one VE with DAMASK's stress measures, Nyquist conventions, time step")
    ap.add_argument("--diagnose-ve", type=int, default=0, help="with --diagnose: the 16^3 VE")
    ap.add_argument("--crystals", type=int, default=3, help="with --diagnose: homogeneous crystals (grains of VE 0)")
    ap.add_argument("--refine", action="store_true", help="with --diagnose: also the VE refined to 32^3 (spectral)")
    args = ap.parse_args(argv)
    if shutil.which("DAMASK_grid") is None and not args.cached_only:
        print("bench_vs_damask: DAMASK_grid not on PATH (bash scripts/build-damask.sh SRC PREFIX; export PATH=PREFIX/bin:$PATH)",
              file=sys.stderr)
        return 2
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.diagnose:
        report = diagnose(args)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=1) + "\n")
        return 0
    report: dict = {"shear_held_at_zero": args.shear, "threads": args.threads, "increments": 20, "strain": 0.01, "solver_version": simulate.SOLVER_VERSION,
                    "torch": torch.__version__, "cases": {}}
    plan = [(16, args.n, t == "on") for t in args.twins.split(",") if t and args.n]
    plan += [(32, args.n32, t == "on") for t in args.twins32.split(",") if t and args.n32]
    cache: dict[int, list[dict]] = {}
    for size, n, twinning in plan:
        jobs = cache.setdefault(size, jobs_for(size, n, args.seed))
        if args.damask_only:
            for j in (reversed(jobs) if args.reverse else jobs):
                case = case_dir(args.work, j, twinning, args.shear)
                if case.exists() and not (case / "sigma.json").exists() and not args.take_over:
                    print(f"DAMASK {j['name']} twins {twinning}: claimed by another process, skipped", flush=True)
                    continue
                t = run_damask_case(j, twinning, args.threads, args.work, False, args.shear)
                print(f"DAMASK {j['name']} twins {twinning}: {t['wall_s']:.0f} s, {t['sigma_xx_pa'][-1] / 1e6:.2f} MPa"
                      + (" (cached)" if t["cached"] else ""), flush=True)
            continue
        key = f"{size}^3 twins {'on' if twinning else 'off'}"
        entry = compare(jobs, twinning, args, args.retime if size == 16 else 0)
        if entry is not None:
            report["cases"][key] = entry
    if args.json and not args.damask_only:
        worst = max(c["max_abs_rel_diff"] for c in report["cases"].values())
        report["cached_only"] = bool(args.cached_only)
        report["max_abs_rel_diff_all"] = worst
        report["goal_1pct_met"] = bool(worst <= 0.01)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
