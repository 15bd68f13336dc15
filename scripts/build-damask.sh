#!/usr/bin/env bash
# Build DAMASK_grid (v3.0.2) from a source checkout into a prefix, for the `damask` backend of
# `microfp simulate` and for benchmarks/bench_vs_damask.py. Recipe: shared/reference/damask-build.md.
#
#   Usage: bash scripts/build-damask.sh SRC [PREFIX]     (PREFIX defaults to /opt/damask)
#   SRC: a DAMASK source checkout at tag v3.0.2 (e.g. `git clone https://github.com/damask-multiphysics/DAMASK
#        SRC && git -C SRC checkout v3.0.2`). Then: export PATH=PREFIX/bin:$PATH
#
# Installs the Debian dependencies with apt-get when run as root (otherwise they must already be there),
# configures against Debian's PETSc 3.18 and builds with `nice -n 10` on all cores (~75 s on 2 cores).
# Idempotent: rerunning rebuilds only what changed. Exits non-zero with one line on bad input.
set -euo pipefail

die() { echo "build-damask: $*" >&2; exit 1; }

[ $# -ge 1 ] && [ $# -le 2 ] || die "usage: bash scripts/build-damask.sh SRC [PREFIX]"
src="$(cd "$1" 2>/dev/null && pwd)" || die "source directory not found: $1"
prefix="${2:-/opt/damask}"
[ -f "$src/CMakeLists.txt" ] && [ -f "$src/src/grid/DAMASK_grid.f90" ] \
    || die "$src is not a DAMASK source checkout (no CMakeLists.txt / src/grid/DAMASK_grid.f90)"
version="$(cat "$src/VERSION" 2>/dev/null || echo unknown)"
case "$version" in
    v3.0.2*|3.0.2*) ;;
    *) die "$src is DAMASK $version; this recipe is for v3.0.2 (git -C $src checkout v3.0.2)" ;;
esac

debs=(libpetsc-real3.18-dev gfortran libhdf5-openmpi-dev libfftw3-mpi-dev libfyaml-dev zlib1g-dev
      pkg-config cmake make openmpi-bin)
missing=()
for d in "${debs[@]}"; do
    dpkg-query -W -f='${Status}' "$d" 2>/dev/null | grep -q "install ok installed" || missing+=("$d")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "build-damask: apt-get install ${missing[*]}" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >/dev/null
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
        die "missing Debian packages (install them as root): ${missing[*]}"
    fi
fi

export PETSC_DIR=/usr/lib/petscdir/petsc3.18/x86_64-linux-gnu-real
[ -d "$PETSC_DIR" ] || die "PETSc 3.18 not found at $PETSC_DIR"
build="$src/build/grid"
# Two flags work around Debian's packaging: the fftw3-mpi Fortran include, and the HDF5 Fortran
# library missing from PETSc's link line.
nice -n 10 cmake -S "$src" -B "$build" -DDAMASK_SOLVER=grid -DCMAKE_BUILD_TYPE=RELEASE \
    -DCMAKE_INSTALL_PREFIX="$prefix" -DBUILDCMD_POST=-I/usr/include \
    "-DCMAKE_Fortran_STANDARD_LIBRARIES=-L/usr/lib/x86_64-linux-gnu/hdf5/openmpi -lhdf5_fortran" >/dev/null
nice -n 10 cmake --build "$build" -j"$(nproc)" --target install >/dev/null
[ -x "$prefix/bin/DAMASK_grid" ] || die "build finished but $prefix/bin/DAMASK_grid is missing"
echo "build-damask: DAMASK_grid $version installed at $prefix/bin/DAMASK_grid (export PATH=$prefix/bin:\$PATH)"
