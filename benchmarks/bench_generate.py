"""Benchmark VE generation against damask's periodic Voronoi tessellation, per core.

Runs ``--n`` training VEs (Table 1: ESD 5.78, sigma 0.1, cut-off 5) at ``--size``^3 with the
paper's physical box (edge 16 length units) through :func:`microfp.volumes.generate_ve_detailed`,
and ``damask.GeomGrid.from_Voronoi_tessellation`` on the very same (final) seed points, all in one
process with one thread, interleaved so that machine noise hits both alike. Prints VEs/s per core
and the ratio of times ours/damask (the number to compare across machines).

    python benchmarks/bench_generate.py --n 50 --size 64 --seed 0
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy/damask import; damask's KD-tree reads OMP_NUM_THREADS

import argparse  # noqa: E402
import time  # noqa: E402

import damask  # noqa: E402
import numpy as np  # noqa: E402

from microfp.config import SetSpec  # noqa: E402
from microfp.volumes import generate_ve_detailed, grain_esd, grains_per_face  # noqa: E402

BOX_EDGE = 16.0  # length units: 64 voxels x 0.25 (paper)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=30, help="number of VEs (default 30)")
    parser.add_argument("--size", type=int, default=64, help="voxels per edge (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args(argv)

    spec = SetSpec(n=args.n)  # the training set of Table 1
    resolution = BOX_EDGE / args.size
    cells = [args.size] * 3
    size = [BOX_EDGE] * 3
    rng = np.random.default_rng(args.seed)
    generate_ve_detailed(spec, args.size, resolution, np.random.default_rng(args.seed + 1))  # warm-up
    t_ours = t_damask = 0.0
    esd_ratio, faces, grains = [], [], []
    for _ in range(args.n):
        t0 = time.perf_counter()
        ve = generate_ve_detailed(spec, args.size, resolution, rng)
        t1 = time.perf_counter()
        damask.GeomGrid.from_Voronoi_tessellation(cells, size, ve.seeds)
        t2 = time.perf_counter()
        t_ours += t1 - t0
        t_damask += t2 - t1
        esd = grain_esd(ve.grain_ids, resolution)
        esd_ratio.append(esd.mean() / ve.esd_target)
        faces.append(grains_per_face(ve.grain_ids))
        grains.append(esd.size)
    print(f"{args.n} training VEs at {args.size}^3, resolution {resolution:g}, one thread")
    print(f"  grains/VE {np.mean(grains):.1f}, mean ESD / target {np.mean(esd_ratio):.3f}, "
          f"grains per face {np.mean(faces):.1f}")
    print(f"  ours  : {args.n / t_ours:7.1f} VEs/s per core ({1e3 * t_ours / args.n:.1f} ms/VE, "
          "tessellation + orientations)")
    print(f"  damask: {args.n / t_damask:7.1f} VEs/s per core ({1e3 * t_damask / args.n:.1f} ms/VE, "
          "GeomGrid.from_Voronoi_tessellation on the same seeds)")
    print(f"  ratio ours/damask (time): {t_ours / t_damask:.2f}")


if __name__ == "__main__":
    main()
