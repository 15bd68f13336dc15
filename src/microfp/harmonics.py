"""Crystal-symmetry-invariant texture harmonics of orientations (:func:`local_state`).

Used by the 2-point-statistics baseline (:mod:`microfp.fingerprints`: the local state whose spatial
correlations it measures) and by the out-of-distribution check (:mod:`microfp.ood`: the volume-averaged
harmonics, the lowest-order texture coefficients, 0 for a random texture). Written here rather than
taken from a library: damask gives the orientation matrices and symmetry operations, but no
symmetrised tensor harmonics.
"""

from __future__ import annotations

import numpy as np

from microfp.errors import MicrofpError

__all__ = ["local_state"]


def _monomials(degree: int) -> list[tuple[int, int, int]]:
    """Exponents (a, b, c) of x^a y^b z^c of the given degree with c <= 1: the independent components
    of a symmetric traceless (harmonic) tensor of that order (2 * degree + 1 of them)."""
    return [(degree - c - b, b, c) for c in (0, 1) for b in range(degree - c + 1)]


def _components(v: np.ndarray, degree: int) -> np.ndarray:
    """``v (..., 3)`` (real or complex) -> ``(..., 2 degree + 1)`` components of ``v^(x)degree``."""
    return np.stack([v[..., 0] ** a * v[..., 1] ** b * v[..., 2] ** c for a, b, c in _monomials(degree)], axis=-1)


def local_state(euler: np.ndarray, family: str) -> np.ndarray:
    """Crystal-symmetry-invariant description of orientations, ``(G, 3)`` Bunge radians -> ``(G, C)``.

    Rows of damask's (passive) orientation matrix are the crystal axes in the sample frame; damask's
    symmetry operations permute them (with signs), so even tensor powers summed over equivalent axes
    are invariant. Cubic: C = 9 (l = 4); hexagonal: C = 18 (l = 2 of the c axis, l = 6 of the a axes).
    The isotropic part is subtracted, so a random texture averages to 0.
    """
    import damask

    e = np.asarray(euler, dtype=np.float64).reshape(-1, 3)
    rows = np.asarray(damask.Rotation.from_Euler_angles(e).as_matrix()).reshape(-1, 3, 3)
    if family == "cubic":
        t4 = sum(_components(rows[:, i, :], 4) for i in range(3))
        iso = np.zeros(9)
        iso[[0, 2, 4]] = [3 / 5, 1 / 5, 3 / 5]  # x^4, x^2 y^2, y^4 of (1/5)(dd + dd + dd)
        return t4 - iso
    if family == "hexagonal":
        c2 = _components(rows[:, 2, :], 2)
        c2[:, [0, 2]] -= 1 / 3  # x^2, y^2 of I / 3
        u6 = _components(rows[:, 0, :] + 1j * rows[:, 1, :], 6).real
        return np.concatenate([c2, u6], axis=1)
    raise MicrofpError(f"crystal family must be cubic or hexagonal, got {family!r}")
