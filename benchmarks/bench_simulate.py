"""Benchmark of the spectral crystal-plasticity solver: seconds per VE, batched vs unbatched.

For each grid size, ``--n`` random-texture HCP VEs (paper morphology: the box is 16 length units, so
the resolution is 16 / size) are simulated to 1 % strain in ``--increments`` increments, once as one
batched solve and once one VE at a time with the same solver, in the same run. Reports wall seconds
per VE, core-seconds per VE (wall x torch threads) and the ratio to the paper's ~40 core-minutes per
VE (4 cores x ~10 min, DAMASK, 64^3). ``--refine`` also runs one geometry at 16^3, 32^3 (and 64^3 if
listed in --sizes) by voxel refinement and reports the final stress of each.

    python benchmarks/bench_simulate.py                       # 32^3 and 64^3, 2 VEs, 20 increments
    python benchmarks/bench_simulate.py --sizes 16 32 --n 2   # quick
    python benchmarks/bench_simulate.py --sizes 64 --n 1 --float32 --no-unbatched   # float32 vs float64
    python benchmarks/bench_simulate.py --device cuda --dtype float32

``--float32`` also times the float32 solver (batched) in the same run and reports its speed-up over the
``--dtype`` one and the largest difference of their curves.

``--compare-ref REV`` also runs the solver of git revision REV (its ``src/microfp/cp.py`` and ``cp_kernel.py``,
imported from temporary files; the kernel compiled before the timing) on the same VEs in the same run, and reports the speed-up (wall and CPU time) and the
largest relative difference of the sigma_xx curves:

    python benchmarks/bench_simulate.py --sizes 16 64 --n 8 1 --threads 1 --no-unbatched --compare-ref main

On a CPU in float64 the local update is the fused numba kernel (``microfp.cp_kernel``; ``--kernel torch``
times the torch one); its first call in a process compiles it (~1 min) or loads it from numba's cache
next to the source (~1 s): timed apart (``kernel_first_call_s``), before the runs.

On a machine shared with other jobs the wall time of a multi-threaded torch run swings several-fold;
``cpu_s_per_ve`` (process CPU time over all threads, core-seconds) is steadier.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from microfp import cp, datasets, shards
from microfp.config import parse_params

PAPER_CORE_SECONDS = 40 * 60.0


def make_ves(size: int, n: int, seed: int = 11) -> shards.VESet:
    raw = {
        "seed": seed,
        "ve_size": max(size, 16),
        "resolution": 16.0 / max(size, 16),
        "latent_dim": 8,
        "encoder": "resnet12",
        "generate": {"shard_size": 64, "workers": 1, "sets": {"train": {"n": 1}, "val": {"n": 1},
                                                                "hcp": {"n": n, "crystal": "hexagonal"}}},
    }
    with tempfile.TemporaryDirectory() as tmp:
        datasets.generate_set(parse_params(raw), "hcp", Path(tmp), workers=1, progress=False)
        return shards.read_set(tmp)


def timed(grain_ids, eulers, load, settings, module=cp):
    """(wall s, CPU s of this process, results) of ``module.solve``."""
    start, cpu = time.perf_counter(), time.process_time()
    res = module.solve(grain_ids, eulers, load, settings)
    return time.perf_counter() - start, time.process_time() - cpu, res


def solver_at(rev: str):
    """The ``microfp.cp`` module of git revision ``rev``, imported from a temporary copy of its source, with
    that revision's fused kernel (``microfp.cp_kernel``, as ``cp_kernel_ref``) where it has one: otherwise the
    reference would run this checkout's kernel, and the comparison would hide the kernel's changes."""
    root = Path(__file__).resolve().parents[1]
    source = subprocess.run(["git", "show", f"{rev}:src/microfp/cp.py"], cwd=root, check=True,
                            capture_output=True, text=True).stdout
    tmp = Path(tempfile.mkdtemp())
    kernel = subprocess.run(["git", "show", f"{rev}:src/microfp/cp_kernel.py"], cwd=root, capture_output=True, text=True)
    if kernel.returncode == 0:
        (tmp / "cp_kernel_ref.py").write_text(kernel.stdout)
        kspec = importlib.util.spec_from_file_location("cp_kernel_ref", tmp / "cp_kernel_ref.py")
        kmod = importlib.util.module_from_spec(kspec)
        sys.modules["cp_kernel_ref"] = kmod
        kspec.loader.exec_module(kmod)
        source = source.replace("from microfp import cp_kernel", "import cp_kernel_ref as cp_kernel")
        source = source.replace("import microfp.cp_kernel", "import cp_kernel_ref")
    path = tmp / "cp_ref.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("cp_ref", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["cp_ref"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    # the commit whose source was loaded (a branch may move while the benchmark runs)
    module.COMMIT = subprocess.run(["git", "rev-parse", "--short", rev], cwd=root, capture_output=True,
                                   text=True).stdout.strip()
    return module


def compare(module, rev, g, eulers, load, args, entry, res_b, rerun=None):
    """Run ``module`` (the solver of ``rev``) batched on the same VEs; add its timings and the differences.
    ``rerun()`` (with ``--repeat`` > 1) times this checkout's solver again between the reference's runs:
    each side's fastest run counts, so a load that changes during the run favours neither."""
    settings = module.SolverSettings(device=args.device, dtype=args.dtype)
    # the reference's kernel compiles on its first call (its source is a temporary file): not timed
    module.solve(np.zeros((1, 4, 4, 4), np.uint16), [np.zeros((1, 3))], module.Load(strain=0.002, increments=1), settings)
    ref_load = module.Load(strain=load.strain, rate=load.rate, increments=load.increments)
    runs = []
    for k in range(args.repeat):
        if k:
            rerun()
        runs.append(timed(g, eulers, ref_load, settings, module))
    wall, cpu = min(r[0] for r in runs), min(r[1] for r in runs)
    res = runs[0][2]
    n = len(eulers)
    entry["ref"] = {"rev": rev, "commit": module.COMMIT, "batched_s_per_ve": wall / n, "cpu_s_per_ve": cpu / n,
                    "runs_s_per_ve": [r[0] / n for r in runs],
                    "final_mpa": [float(r.stress_xx[-1] / 1e6) for r in res],
                    "newton": [r.newton_iterations for r in res]}
    entry["speedup_vs_ref"] = entry["ref"]["batched_s_per_ve"] / entry["batched_s_per_ve"]
    entry["cpu_speedup_vs_ref"] = entry["ref"]["cpu_s_per_ve"] / entry["cpu_s_per_ve"]
    entry["max_rel_diff_vs_ref"] = float(max(
        np.nanmax(np.abs(a.stress_xx[1:] / b.stress_xx[1:] - 1)) for a, b in zip(res_b, res)
    ))
    print(f"{g.shape[1]}^3 vs {rev}: {entry['ref']['batched_s_per_ve']:.1f} s/VE ({entry['ref']['cpu_s_per_ve']:.1f} "
          f"CPU s/VE) -> x{entry['speedup_vs_ref']:.2f} wall, x{entry['cpu_speedup_vs_ref']:.2f} CPU; curves within "
          f"{entry['max_rel_diff_vs_ref']:.1e}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--n", type=int, nargs="+", default=[2], help="VEs per size (one number, or one per size)")
    ap.add_argument("--increments", type=int, default=20)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    ap.add_argument("--no-unbatched", action="store_true", help="skip the one-VE-at-a-time runs")
    ap.add_argument("--float32", action="store_true", help="also time float32 (batched) in the same run")
    ap.add_argument("--refine", action="store_true", help="grid refinement 16 -> 32 (-> 64) of one geometry")
    ap.add_argument("--compare-ref", metavar="REV", help="also run the solver of git revision REV (same run)")
    ap.add_argument("--kernel", default="auto", choices=list(cp.KERNELS),
                    help="local update: numba (fused CPU kernel), torch, auto (numba on CPU float64)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="with --compare-ref: run both solvers this many times, alternating; the fastest run of each counts")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)
    ref_module = solver_at(args.compare_ref) if args.compare_ref else None
    torch.set_num_threads(args.threads)
    load = cp.Load(strain=0.01, rate=1e-3, increments=args.increments)
    settings = cp.SolverSettings(device=args.device, dtype=args.dtype, kernel=args.kernel)
    kernel = cp.Material([np.zeros((1, 3))], dtype=getattr(torch, args.dtype), device=args.device, kernel=args.kernel).kernel
    head = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True).stdout.strip()
    report: dict = {"rev": head, "compare_ref": args.compare_ref, "threads": args.threads, "device": args.device, "dtype": args.dtype,
                    "increments": args.increments, "kernel": kernel, "sizes": {}}
    if kernel == "numba":
        # the first call compiles the kernel, or loads it from numba's on-disk cache: timed apart, not in the runs
        start = time.perf_counter()
        cp.solve(np.zeros((1, 4, 4, 4), np.uint16), [np.zeros((1, 3))], cp.Load(strain=0.002, increments=1), settings)
        report["kernel_first_call_s"] = time.perf_counter() - start
        print(f"numba kernel: first solve (compile or cache load) {report['kernel_first_call_s']:.1f} s", flush=True)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.device}, {args.dtype}, {args.increments} increments, "
          f"{kernel} local update")
    if len(args.n) not in (1, len(args.sizes)):
        ap.error("--n takes one number or one per size")
    for size, n_ves in zip(args.sizes, args.n * len(args.sizes) if len(args.n) == 1 else args.n):
        ves = make_ves(size, n_ves)
        g = ves.grain_ids if ves.ve_size == size else ves.grain_ids[:, :: ves.ve_size // size, :: ves.ve_size // size, :: ves.ve_size // size]
        eulers = [ves.grain_euler(i).astype(np.float64) for i in range(len(ves))]
        wall_b, cpu_b, res_b = timed(g, eulers, load, settings)
        entry = {
            "batched_s_per_ve": wall_b / len(eulers),
            "cpu_s_per_ve": cpu_b / len(eulers),
            "converged": [r.converged for r in res_b],
            "final_mpa": [float(r.stress_xx[-1] / 1e6) for r in res_b],
            "newton": [r.newton_iterations for r in res_b],
            "cg": [r.cg_iterations for r in res_b],
        }
        if not args.no_unbatched:
            walls = [timed(g[i : i + 1], eulers[i : i + 1], load, settings)[0] for i in range(len(eulers))]
            entry["unbatched_s_per_ve"] = float(np.mean(walls))
            entry["batched_speedup"] = entry["unbatched_s_per_ve"] / entry["batched_s_per_ve"]
        if args.float32:
            s32 = cp.SolverSettings(device=args.device, dtype="float32")
            wall_32, _, res_32 = timed(g, eulers, load, s32)
            entry["float32_s_per_ve"] = wall_32 / len(eulers)
            entry["float32_speedup"] = entry["batched_s_per_ve"] / entry["float32_s_per_ve"]
            entry["float32_max_rel_diff"] = float(max(
                np.nanmax(np.abs(a.stress_xx[1:] / b.stress_xx[1:] - 1)) for a, b in zip(res_32, res_b)
            ))
            print(f"{size}^3 float32: {entry['float32_s_per_ve']:.1f} s/VE (x{entry['float32_speedup']:.2f} vs "
                  f"{args.dtype}), curves within {entry['float32_max_rel_diff']:.1e}", flush=True)
        if ref_module is not None:
            def rerun():
                w, c, _ = timed(g, eulers, load, settings)
                entry["runs_s_per_ve"].append(w / len(eulers))
                entry["batched_s_per_ve"] = min(entry["batched_s_per_ve"], w / len(eulers))
                entry["cpu_s_per_ve"] = min(entry["cpu_s_per_ve"], c / len(eulers))

            entry["runs_s_per_ve"] = [entry["batched_s_per_ve"]]
            compare(ref_module, args.compare_ref, g, eulers, load, args, entry, res_b, rerun)
        core_s = entry["batched_s_per_ve"] * (args.threads if args.device == "cpu" else 1)
        entry["core_s_per_ve"] = core_s
        entry["paper_core_s_per_ve"] = PAPER_CORE_SECONDS
        entry["speedup_vs_paper"] = PAPER_CORE_SECONDS / core_s
        report["sizes"][str(size)] = entry
        print(f"{size}^3: batched {entry['batched_s_per_ve']:.1f} s/VE"
              + (f", unbatched {entry['unbatched_s_per_ve']:.1f} s/VE (x{entry['batched_speedup']:.2f})" if "unbatched_s_per_ve" in entry else "")
              + f"; {core_s / 60:.1f} core-min/VE vs paper 40 (x{entry['speedup_vs_paper']:.1f}); "
              f"final {', '.join(f'{s:.1f}' for s in entry['final_mpa'])} MPa; converged {entry['converged']}", flush=True)
    if args.refine:
        ves = make_ves(16, 1)
        base = ves.grain_ids[0]
        euler = [ves.grain_euler(0).astype(np.float64)]
        finals = {}
        for size in [16, 32, 64]:
            if size > 32 and size not in args.sizes:
                continue
            f = size // 16
            gi = base.repeat(f, 0).repeat(f, 1).repeat(f, 2)[None]
            wall, _, res = timed(gi, euler, load, settings)
            finals[str(size)] = {"final_mpa": float(res[0].stress_xx[-1] / 1e6), "curve_mpa": (res[0].stress_xx / 1e6).round(3).tolist(),
                                 "wall_s": wall, "converged": res[0].converged}
            print(f"refinement {size}^3: sigma_xx(1%) = {finals[str(size)]['final_mpa']:.2f} MPa ({wall:.0f} s)", flush=True)
        report["refinement"] = finals
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
