"""Bit-for-bit reproducible numerics on the CPU: same commit + same machine kind -> same bytes.

Three things make two runs of the same code give floating-point results that differ in the last
digits, and so change the md5 of a DVC output:

1. **Instruction set.** Math libraries pick their kernels from the CPU they find (AVX-512 on one
   host, AVX2 on another of the same machine kind), and the kernels sum in different orders.
   :func:`pin_cpu_kernels` pins torch's own kernels, MKL (torch's BLAS, LAPACK and FFT) and
   OpenBLAS (numpy, scipy, scikit-learn) to their AVX2 code paths. oneDNN (torch's CPU
   convolutions) is not pinned: ``ONEDNN_MAX_CPU_ISA=AVX2`` made a 3D-convolution training step
   markedly slower on this machine kind's AVX-512 CPU. These are
   read when the libraries load, so ``microfp/__init__.py`` calls it before anything imports
   numpy or torch. A variable that is already set is left alone (set e.g.
   ``ATEN_CPU_CAPABILITY=avx512`` for speed where bitwise reproducibility does not matter).
2. **Thread counts.** Parallel reductions split their work by the number of threads, so a result
   is reproducible only at the same thread count. Stages use torch's default (the number of
   cores, the same on one machine kind) unless a ``threads`` parameter fixes it.
3. **Algorithms that are not deterministic** (randomised solvers, atomics on GPUs).
   :func:`deterministic_torch` seeds every generator and makes torch refuse such algorithms;
   scikit-learn estimators get ``random_state=seed`` where they take one.

On GPUs (CUDA), cuBLAS and cuDNN are made deterministic too (``CUBLAS_WORKSPACE_CONFIG``,
``cudnn.deterministic``), but results still depend on the GPU model, the CUDA/cuDNN versions and
the number of devices (DDP all-reduces in another order), and bf16 mixed precision rounds
differently from fp32: a GPU run reproduces on the same GPU model, driver stack and device count
only, and never matches a CPU run to the bit.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import platform
import random
from types import ModuleType

# Environment read by the math libraries when they are loaded (see module docstring, point 1).
PINNED_ENV: dict[str, str] = {
    "ATEN_CPU_CAPABILITY": "avx2",  # torch's vectorised CPU kernels
    "MKL_CBWR": "AVX2",  # MKL conditional numerical reproducibility (torch's BLAS/LAPACK/FFT)
    "OPENBLAS_CORETYPE": "Haswell",  # OpenBLAS kernels of numpy/scipy (an AVX2 core)
    "CUBLAS_WORKSPACE_CONFIG": ":4096:8",  # deterministic cuBLAS (CUDA only)
    "KMP_WARNINGS": "0",
}


def pin_cpu_kernels(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Set each of :data:`PINNED_ENV` in ``environ`` (default ``os.environ``) unless already set.

    Returns the variables that were set by this call.
    """
    env = os.environ if environ is None else environ
    if platform.machine().lower() not in {"x86_64", "amd64"}:
        return {}  # the pinned kernels are x86-64 ones; other CPUs have one code path each
    added = {k: v for k, v in PINNED_ENV.items() if k not in env}
    env.update(added)
    return added


def deterministic_torch(seed: int, threads: int = 0) -> None:
    """Seed Python, numpy and torch, and make torch use deterministic algorithms only.

    ``threads`` > 0 fixes torch's intra-op thread count (results of parallel reductions depend
    on it); 0 keeps torch's default, the number of cores.
    """
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def source_digest(*modules: ModuleType) -> str:
    """sha256 (16 hex digits) of the source text of ``modules``, in the order given.

    Stored with a persistent output (VE shards, the training checkpoint) so that it is never resumed
    from when the code that made it changed: the result would mix two versions of the code and would
    not be what a fresh run of this commit gives."""
    h = hashlib.sha256()
    for module in modules:
        h.update(inspect.getsource(module).encode())
    return h.hexdigest()[:16]
