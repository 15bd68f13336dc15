"""Crystal-symmetry-invariant texture harmonics of orientations, and back.

An orientation modulo the crystal symmetry is described by a few symmetrised tensor harmonics
(:func:`harmonics`): cubic (432) by the l = 4 harmonic of its three cube axes (9 numbers), hexagonal
(622) by the l = 2 harmonic of its c axis and the l = 6 harmonic of its a axes (5 + 13 = 18 numbers).
Symmetry-equivalent orientations give the same numbers, different orientations different ones, and the
numbers average linearly: the mean over a grain, a block of voxels or a whole VE is a texture
coefficient (0 for a random texture).

Used by

* the 2-point-statistics baseline (:mod:`microfp.fingerprints`: the local state whose spatial
  correlations it measures) and the out-of-distribution check (:mod:`microfp.ood`: the volume-averaged
  harmonics), through :func:`local_state`;
* the ``harmonics`` representation of the VAE (:mod:`microfp.model`): the network reconstructs the
  whitened harmonics field (:func:`whitened_field`) with a plain MSE, a regression without the 24- or
  12-fold ambiguity a loss on orientations has, and :class:`NearestOrientation` turns its output back
  into orientations.

Written here rather than taken from a library: damask gives orientation matrices and symmetry
operations, but no symmetrised tensor harmonics (the tests check invariance under damask's operations).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from microfp.rotations import check_family, euler_to_quaternion, quaternion_multiply, quaternion_to_matrix

__all__ = ["CHANNELS", "NearestOrientation", "harmonics", "local_state", "whitened_field", "whitening"]

CHANNELS = {"cubic": 9, "hexagonal": 18}  # harmonics per orientation, for each of rotations.FAMILIES
WHITENING_SAMPLE = 200_000  # random orientations that fix the whitening (sampling error ~0.3 %)
SEED = 20251126


def _monomials(degree: int) -> list[tuple[int, int, int]]:
    """Exponents (a, b, c) of x^a y^b z^c of the given degree with c <= 1: the independent components
    of a symmetric traceless (harmonic) tensor of that order (2 * degree + 1 of them)."""
    return [(degree - c - b, b, c) for c in (0, 1) for b in range(degree - c + 1)]


def _powers(t: torch.Tensor, degree: int) -> list[torch.Tensor | None]:
    """``[None, t, t^2, ..., t^degree]`` by repeated multiplication (``None`` stands for ``t^0 = 1``)."""
    out: list[torch.Tensor | None] = [None, t]
    for _ in range(degree - 1):
        out.append(out[-1] * t)  # type: ignore[operator]
    return out


def _components(v: torch.Tensor, degree: int) -> torch.Tensor:
    """``v (..., 3)`` (real or complex) -> ``(..., 2 degree + 1)`` components of ``v^(x)degree``.

    Monomials from tables of powers, not ``**``: torch's pow of a float tensor by 3 or more (and of any
    complex tensor) is a general power, 2.5x (cubic) to 10x (hexagonal) slower for all components."""
    x, y, z = v.unbind(-1)
    px, py, pz = _powers(x, degree), _powers(y, degree), [None, z]
    columns = []
    for a, b, c in _monomials(degree):
        factors = [f for f in (px[a], py[b], pz[c]) if f is not None]
        m = factors[0]
        for f in factors[1:]:
            m = m * f
        columns.append(m)
    return torch.stack(columns, dim=-1)


def harmonics(q: torch.Tensor, family: str) -> torch.Tensor:
    """Symmetry-invariant harmonics ``(..., C)`` of unit quaternions ``(..., 4)`` (damask's convention).

    Rows of the (passive) orientation matrix are the crystal axes in the sample frame; damask's
    symmetry operations permute them (with signs), so even tensor powers summed over equivalent axes
    are invariant. Cubic: C = 9 (l = 4 of the cube axes); hexagonal: C = 18 (l = 2 of the c axis,
    l = 6 of the a axes, as the real part of (a_1 + i a_2)^6). The isotropic part is subtracted, so a
    random texture averages to 0. Same dtype and device as ``q``.
    """
    check_family(family)
    rows = quaternion_to_matrix(q)
    if family == "cubic":
        t4 = sum(_components(rows[..., i, :], 4) for i in range(3))
        iso = torch.zeros(9, dtype=q.dtype, device=q.device)
        iso[[0, 2, 4]] = torch.tensor([3 / 5, 1 / 5, 3 / 5], dtype=q.dtype, device=q.device)  # of (1/5)(dd + dd + dd)
        return t4 - iso
    c2 = _components(rows[..., 2, :], 2)
    iso = torch.zeros(5, dtype=q.dtype, device=q.device)
    iso[[0, 2]] = 1 / 3  # x^2, y^2 of I / 3
    u6 = _components(torch.complex(rows[..., 0, :], rows[..., 1, :]), 6).real
    return torch.cat([c2 - iso, u6], dim=-1)


def local_state(euler: np.ndarray, family: str) -> np.ndarray:
    """:func:`harmonics` of Bunge Euler angles: ``(G, 3)`` radians -> ``(G, C)`` float64 (numpy)."""
    e = torch.as_tensor(np.asarray(euler, dtype=np.float64).reshape(-1, 3))
    return harmonics(euler_to_quaternion(e), family).numpy()


def _random_quaternions(n: int, seed: int) -> np.ndarray:
    """``(n, 4)`` uniformly random unit quaternions from damask (deterministic for a seed)."""
    import damask

    return np.asarray(damask.Rotation.from_random(n, rng_seed=seed).quaternion, dtype=np.float64)


@lru_cache(maxsize=None)
def whitening(family: str) -> np.ndarray:
    """``(C, C)`` matrix W with ``W h`` of unit covariance over uniformly random orientations.

    For an irreducible harmonic the covariance over random orientations is the inverse of the
    rotation-invariant inner product, so whitening makes distances between harmonics independent of
    the sample frame and weighs every channel equally in the MSE (float64, from a fixed sample)."""
    check_family(family)
    h = harmonics(torch.as_tensor(_random_quaternions(WHITENING_SAMPLE, SEED)), family).numpy()
    cov = h.T @ h / len(h)
    vals, vecs = np.linalg.eigh(cov)
    return (vecs / np.sqrt(vals)) @ vecs.T


@lru_cache(maxsize=None)
def _whitening_t(family: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The transpose of :func:`whitening` as a tensor, converted once per dtype and device."""
    return torch.tensor(whitening(family).T, dtype=dtype, device=device)  # a copy in torch's (aligned) memory


def whitened_harmonics(q: torch.Tensor, family: str) -> torch.Tensor:
    """Unit quaternions ``(..., 4)`` -> whitened harmonics ``(..., C)``, ``W H(q)``; same dtype and device."""
    return harmonics(q, family) @ _whitening_t(family, q.dtype, q.device)


def whitened_field(q: torch.Tensor, family: str, dim: int = 1) -> torch.Tensor:
    """Quaternion field (components along ``dim``, 4) -> whitened harmonics field (C along ``dim``)."""
    return whitened_harmonics(q.movedim(dim, -1), family).movedim(-1, dim).contiguous()


class NearestOrientation:
    """Whitened harmonics ``(N, C)`` -> the orientation ``(N, 4)`` whose harmonics are nearest.

    The reconstruction of a ``harmonics`` VAE is in general not the harmonics of any orientation (at a
    grain boundary it is a mix, and an untrained model returns about 0); the nearest one is its
    orientation, ``argmin_q |h - H(q)|^2``. Found in two steps, all in matrix products (a k-d tree is
    exact but degenerates to a brute-force scan for points away from the 3D manifold of orientations):

    1. the best of ``COARSE`` fixed random orientations (about 10 deg apart for cubic);
    2. ``ITERATIONS`` Gauss-Newton steps on a rotation vector ``v`` applied on the sample side,
       ``q <- q * exp(v)``, each at most ``MAX_STEP`` degrees. Harmonics transform linearly under a
       sample rotation, ``H(q * r) = D_r H(q)``, so the Jacobian is ``[G_1 H, G_2 H, G_3 H]`` with the
       three fixed generators ``G_a = dD / dv_a`` (fitted once by central differences).

    Measured (both families, 8192 orientations): pure harmonics come back within 0.05 deg; on mixtures
    of two orientations the result is as good as a 0.1-deg grid search. Deterministic.
    """

    COARSE = 512
    ITERATIONS = 5
    MAX_STEP = 15.0  # degrees per Gauss-Newton step (a damped step far from the optimum)
    CHUNK = 8192  # voxels per matrix product

    def __init__(self, family: str) -> None:
        check_family(family)
        self.family = family  # tables built in float64, searched in float32
        table = torch.as_tensor(_random_quaternions(self.COARSE, SEED + 1))
        self.table, self.table_h = table.float(), self._harmonics(table).float()
        fit = torch.as_tensor(_random_quaternions(64, SEED + 2))
        fit_h, eps = self._harmonics(fit).numpy(), 1e-4
        generators = []
        for axis in torch.eye(3, dtype=torch.float64):
            # H(q r) = H(q) D^T exactly, so D^T is the least-squares fit over the 64 orientations
            moved = [self._harmonics(quaternion_multiply(fit, _exp(sign * eps * axis).expand_as(fit))).numpy()
                     for sign in (1, -1)]
            d_plus, d_minus = (_least_squares(fit_h, m) for m in moved)
            generators.append((d_plus - d_minus) / (2 * eps))
        self.generators = torch.as_tensor(np.concatenate(generators, axis=1)).float()  # (C, 3 C): H @ it = [dH / dv_a]

    def _harmonics(self, q: torch.Tensor) -> torch.Tensor:
        return whitened_harmonics(q, self.family)

    def _search(self, h: torch.Tensor) -> torch.Tensor:
        n, c = h.shape
        q = self.table[torch.addmm(-0.5 * self.table_h.square().sum(-1), h, self.table_h.T).argmax(-1)]
        eye = 1e-6 * torch.eye(3)
        max_step = float(np.radians(self.MAX_STEP))
        for _ in range(self.ITERATIONS):
            hq = self._harmonics(q)
            jac = (hq @ self.generators).view(n, 3, c)  # rows d H / d v_a
            v = torch.linalg.solve(jac @ jac.transpose(1, 2) + eye, jac @ (h - hq).unsqueeze(-1)).squeeze(-1)
            v = v * (max_step / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)).clamp(max=1.0)
            q = quaternion_multiply(q, _exp(v))
        return torch.nn.functional.normalize(q, dim=-1)

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        """``(N, C)`` whitened harmonics (any float dtype/device) -> ``(N, 4)`` unit quaternions, same."""
        flat = h.detach().float().cpu()
        out = torch.cat([self._search(part) for part in flat.split(self.CHUNK)]) if len(flat) else flat.new_zeros(0, 4)
        return out.to(dtype=h.dtype, device=h.device)


def _least_squares(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``x (n, k)`` minimising ``|a x - b|`` for ``a (m, n)`` of full column rank, ``b (m, k)``, float64.

    Normal equations, solved by Gaussian elimination with partial pivoting, every sum in a fixed order
    (numpy element-wise operations and reductions along a non-contiguous axis). Written here because
    LAPACK's solvers (``torch.linalg.lstsq``, ``numpy.linalg.solve``) returned results that differ in the
    last bits from process to process (their blocked kernels depend on memory alignment; measured: 2 of
    8 processes), which changed decoded orientations and so the md5 of evaluate's outputs. The systems
    here are 9 x 9 or 18 x 18 and well conditioned (whitened harmonics of 64 random orientations)."""
    m = (a[:, :, None] * a[:, None, :]).sum(axis=0)  # a^T a, (n, n)
    r = (a[:, :, None] * b[:, None, :]).sum(axis=0)  # a^T b, (n, k)
    n = len(m)
    for k in range(n):
        p = k + int(np.argmax(np.abs(m[k:, k])))
        m[[k, p]], r[[k, p]] = m[[p, k]], r[[p, k]]
        f = m[k + 1 :, k] / m[k, k]
        m[k + 1 :] -= f[:, None] * m[k]
        r[k + 1 :] -= f[:, None] * r[k]
    x = np.zeros_like(r)
    for k in range(n - 1, -1, -1):
        x[k] = (r[k] - (m[k, k + 1 :, None] * x[k + 1 :]).sum(axis=0)) / m[k, k]
    return x


def _exp(v: torch.Tensor) -> torch.Tensor:
    """Unit quaternions ``(..., 4)`` of rotation vectors ``(..., 3)`` (radians)."""
    angle = v.norm(dim=-1, keepdim=True)
    axis = v / angle.clamp_min(1e-12)
    return torch.cat([torch.cos(angle / 2), torch.sin(angle / 2) * axis], dim=-1)


@lru_cache(maxsize=2)
def nearest_orientation(family: str) -> NearestOrientation:
    """The decoding tables of a crystal family, built once per process."""
    return NearestOrientation(family)
