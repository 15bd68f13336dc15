"""Grain orientations: sampling, fundamental-zone reduction and Euler-angle normalisation.

All crystallography goes through the ``damask`` library (``damask.Rotation`` and
``damask.Orientation``); this module only samples, wraps and converts arrays.

Conventions
-----------
* Euler angles are Bunge (z-x-z) ``(phi1, Phi, phi2)`` in **radians** unless a name ends in
  ``_deg``. Valid ranges are ``phi1, phi2 in [0, 2 pi)`` and ``Phi in [0, pi]``.
* Arrays of orientations have the three angles on the last axis, shape ``(..., 3)``, except where a
  ``channel_axis`` argument says otherwise (the channel-first ``(3, n, n, n)`` tensors of the VAE).
* "In the fundamental zone" (FZ) means ``damask.Orientation(...).in_FZ`` is true, i.e. the
  Rodrigues-Frank vector lies in the FZ of the crystal family. The reduced cubic Euler angles span
  ``phi1 in [0, 360)``, ``Phi in [0, ~60.3]``, ``phi2 in [0, 360)`` degrees; the zone is not a box.

Float32 storage
---------------
VEs store orientations as float32. Orientations on (or within ~1e-7 rad of) the FZ boundary can fall
out of the zone by rounding; this happens for textured sets (the Goss, brass and copper components
lie on the cubic FZ boundary). :func:`to_float32_in_fz` therefore rounds, re-checks with damask and
pulls any orientation that fell out slightly towards the identity (scaling its rotation angle by
``1 - eps`` with ``eps`` from 1e-6 up), which moves it by ~1e-6 rad, far below anything measured.
"""

from __future__ import annotations

from typing import Literal, Sequence

import damask
import numpy as np

from microfp.config import TEXTURES_DEG, SetSpec

__all__ = [
    "EULER_SCALE",
    "TEXTURES_DEG",
    "denormalise_euler",
    "euler_to_quaternion",
    "grain_orientations",
    "in_fundamental_zone",
    "normalise_euler",
    "random_euler",
    "reduce_to_fundamental_zone",
    "textured_euler",
    "to_float32_in_fz",
    "wrap_euler",
]

Family = Literal["cubic", "hexagonal"]

TWO_PI = 2.0 * np.pi
#: Divisors that map (phi1, Phi, phi2) to [0, 1] (paper section 2.1).
EULER_SCALE: tuple[float, float, float] = (TWO_PI, np.pi, TWO_PI)


def _seed_from(rng: np.random.Generator) -> int:
    """An integer seed for damask drawn from ``rng`` (keeps results a function of the rng state)."""
    return int(rng.integers(0, 2**63 - 1))


def _rotations(euler: np.ndarray) -> damask.Rotation:
    return damask.Rotation.from_Euler_angles(np.asarray(euler, dtype=np.float64))


def random_euler(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` orientations uniform on SO(3) (random texture) as Bunge Euler angles.

    Uniform on SO(3) is not uniform in Euler space (``Phi`` has density ``sin(Phi)/2``).

    Returns:
        ``(n, 3)`` float64 radians, ``phi1, phi2 in [0, 2 pi]``, ``Phi in [0, pi]``.
    """
    if n == 0:
        return np.zeros((0, 3))
    rot = damask.Rotation.from_random(shape=int(n), rng_seed=_seed_from(rng))
    return np.asarray(rot.as_Euler_angles(), dtype=np.float64).reshape(n, 3)


def wrap_euler(euler: np.ndarray) -> np.ndarray:
    """Bring arbitrary real Bunge angles into ``[0, 2pi) x [0, pi] x [0, 2pi)`` without changing the rotation.

    ``Phi`` is reflected into ``[0, pi]``; a reflection (``Phi -> -Phi`` or ``Phi -> 2 pi - Phi``)
    is compensated by adding ``pi`` to ``phi1`` and ``phi2``, because
    ``R(phi1, -Phi, phi2) == R(phi1 + pi, Phi, phi2 + pi)``.

    Args:
        euler: ``(..., 3)`` radians.

    Returns:
        ``(..., 3)`` float64 radians, the same rotations.
    """
    e = np.array(euler, dtype=np.float64, copy=True)
    big_phi = np.mod(e[..., 1], TWO_PI)  # [0, 2pi)
    flip = big_phi > np.pi
    e[..., 1] = np.where(flip, TWO_PI - big_phi, big_phi)
    e[..., 0] += np.where(flip, np.pi, 0.0)
    e[..., 2] += np.where(flip, np.pi, 0.0)
    e[..., 0] = np.mod(e[..., 0], TWO_PI)
    e[..., 2] = np.mod(e[..., 2], TWO_PI)
    return e


def textured_euler(
    center_deg: Sequence[float], spread_deg: float, n: int, rng: np.random.Generator
) -> np.ndarray:
    """Orientations scattered around a texture component, as in the paper (section 2.1.2).

    Each Euler angle is drawn from ``Normal(center, spread_deg)`` independently ("a variance of
    2 degrees" in the paper is read as a standard deviation of 2 degrees). Where a component of the
    centre is exactly zero the noise is made positive (its absolute value is taken), which is the
    paper's guard against periodicity effects near zero; the result is a half-normal there, with
    mean ``spread * sqrt(2/pi)`` and a smaller spread. The angles are then wrapped into the valid
    ranges with :func:`wrap_euler`. No fundamental-zone reduction here.

    Args:
        center_deg: ``(3,)`` Bunge angles of the component in degrees (see ``TEXTURES_DEG``).
        spread_deg: standard deviation of the noise per angle in degrees (>= 0).
        n: number of orientations.
        rng: random generator.

    Returns:
        ``(n, 3)`` float64 radians.
    """
    if spread_deg < 0:
        raise ValueError(f"spread_deg must be >= 0, got {spread_deg}")
    center = np.asarray(center_deg, dtype=np.float64).reshape(3)
    noise = rng.normal(0.0, float(spread_deg), size=(int(n), 3))
    noise = np.where(center == 0.0, np.abs(noise), noise)
    return wrap_euler(np.radians(center + noise))


def reduce_to_fundamental_zone(euler: np.ndarray, family: Family) -> np.ndarray:
    """Map orientations to their symmetric equivalent in the fundamental zone (damask ``reduced``).

    Call it once per grain, not per voxel (damask needs ~10 us per orientation).

    Args:
        euler: ``(..., 3)`` Bunge radians in the valid ranges (see :func:`wrap_euler`).
        family: crystal family, ``"cubic"`` or ``"hexagonal"``.

    Returns:
        ``(..., 3)`` float64 radians in ``[0, 2pi) x [0, pi] x [0, 2pi)``.
    """
    e = np.asarray(euler, dtype=np.float64)
    if e.shape[-1] != 3:
        raise ValueError(f"euler must have shape (..., 3), got {e.shape}")
    if e.size == 0:
        return e.copy()
    ori = damask.Orientation(rotation=_rotations(e), family=family)
    out = np.asarray(ori.reduced.as_Euler_angles(), dtype=np.float64).reshape(e.shape)
    out[..., 0] = np.mod(out[..., 0], TWO_PI)
    out[..., 2] = np.mod(out[..., 2], TWO_PI)
    return out


def in_fundamental_zone(euler: np.ndarray, family: Family) -> np.ndarray:
    """Whether each orientation lies in the fundamental zone (damask ``Orientation.in_FZ``).

    Args:
        euler: ``(..., 3)`` Bunge radians (any float dtype), ``phi1, phi2 <= 2 pi``, ``Phi <= pi``.
        family: ``"cubic"`` or ``"hexagonal"``.

    Returns:
        ``(...)`` bool array.
    """
    e = np.asarray(euler, dtype=np.float64)
    if e.size == 0:
        return np.zeros(e.shape[:-1], dtype=bool)
    ori = damask.Orientation(rotation=_rotations(e), family=family)
    return np.asarray(ori.in_FZ, dtype=bool).reshape(e.shape[:-1])


def _round_float32(euler: np.ndarray) -> np.ndarray:
    """float32 copy in the valid ranges: a phi1/phi2 that rounds up to 2 pi becomes 0 (same rotation)."""
    e32 = np.asarray(euler, dtype=np.float64).astype(np.float32)
    two_pi32 = np.float32(TWO_PI)  # 6.2831855 > 2 pi
    pi32 = np.float32(np.pi)
    for axis in (0, 2):
        e32[..., axis] = np.where(e32[..., axis] >= two_pi32, np.float32(0.0), e32[..., axis])
    e32[..., 1] = np.minimum(e32[..., 1], np.nextafter(pi32, np.float32(0.0)))
    return e32


def to_float32_in_fz(euler: np.ndarray, family: Family, max_tries: int = 12) -> np.ndarray:
    """Round fundamental-zone orientations to float32 so that they still test in the FZ.

    Orientations that leave the zone by rounding (those within ~1e-7 rad of its boundary) are
    pulled towards the identity by scaling their rotation angle by ``1 - eps`` (``eps`` = 1e-6,
    4e-6, ...), which keeps the rotation axis and moves the orientation by ``eps * angle`` rad; the
    fundamental zones are convex and contain the identity, so this moves inwards.

    Args:
        euler: ``(G, 3)`` float64 Bunge radians, already reduced to the FZ.
        family: ``"cubic"`` or ``"hexagonal"``.
        max_tries: how many growing ``eps`` to try before giving up.

    Returns:
        ``(G, 3)`` float32 radians, every row in the FZ according to damask.

    Raises:
        RuntimeError: if an orientation cannot be brought into the zone (input not reduced).
    """
    e64 = np.asarray(euler, dtype=np.float64)
    e32 = _round_float32(e64)
    bad = ~in_fundamental_zone(e32, family)
    eps = 1e-6
    for _ in range(max_tries):
        if not bad.any():
            return e32
        axis_angle = np.asarray(_rotations(e64[bad]).as_axis_angle(), dtype=np.float64)
        axis_angle[..., 3] *= 1.0 - eps
        moved = np.asarray(
            damask.Rotation.from_axis_angle(axis_angle).as_Euler_angles(), dtype=np.float64
        )
        cand = _round_float32(wrap_euler(moved))
        ok = in_fundamental_zone(cand, family)
        idx = np.flatnonzero(bad)
        e32[idx[ok]] = cand[ok]
        bad[idx[ok]] = False
        eps *= 4.0
    if bad.any():
        raise RuntimeError(
            f"{int(bad.sum())} orientation(s) could not be rounded to float32 inside the {family} "
            "fundamental zone; were they reduced first?"
        )
    return e32


def grain_orientations(spec: SetSpec, n_grains: int, rng: np.random.Generator) -> np.ndarray:
    """One orientation per grain for a set: random or textured, reduced to the FZ, float32.

    Random texture samples SO(3) uniformly; a named texture scatters around its Table 2 centre
    with ``spec.spread_deg`` (:func:`textured_euler`); with ``spec.component_fraction`` > 0 that share
    of random-texture VEs scatters around a random centre of its own. Reduction uses ``spec.crystal``.

    Returns:
        ``(n_grains, 3)`` float32 Bunge radians, every row in the FZ (damask ``in_FZ``).
    """
    if spec.texture == "random" and spec.component_fraction > 0 and rng.random() < spec.component_fraction:
        # a texture component of the VE's own, at a uniformly random orientation (training data that
        # teaches the VAE textures without showing it the named components of the test sets)
        center = np.degrees(random_euler(1, rng)[0])
        raw = textured_euler(center, spec.spread_deg, n_grains, rng)
    elif spec.texture == "random":
        raw = random_euler(n_grains, rng)
    else:
        raw = textured_euler(TEXTURES_DEG[spec.texture], spec.spread_deg, n_grains, rng)
    reduced = reduce_to_fundamental_zone(raw, spec.crystal)
    return to_float32_in_fz(reduced, spec.crystal)


def _scale(euler, channel_axis: int):
    """EULER_SCALE shaped to broadcast along ``channel_axis`` of ``euler`` (numpy or torch)."""
    ndim = euler.ndim
    axis = channel_axis % ndim
    if euler.shape[axis] != 3:
        raise ValueError(f"axis {channel_axis} of shape {tuple(euler.shape)} must have length 3")
    shape = [1] * ndim
    shape[axis] = 3
    if hasattr(euler, "new_tensor"):  # a torch tensor: stay on its device and dtype
        return euler.new_tensor(EULER_SCALE).reshape(shape)
    arr = np.asarray(euler)
    dtype = arr.dtype if np.issubdtype(arr.dtype, np.floating) else np.float64
    return np.asarray(EULER_SCALE, dtype=dtype).reshape(shape)


def normalise_euler(euler, channel_axis: int = -1):
    """Divide the Euler angles by ``(2 pi, pi, 2 pi)`` so that they lie in ``[0, 1]``.

    Args:
        euler: radians, the three angles along ``channel_axis``: ``(..., 3)`` with the default
            ``-1``, or channel-first ``(3, n, n, n)`` / ``(B, 3, n, n, n)`` with ``channel_axis=0``
            / ``1``. A numpy array (float dtype kept) or a torch tensor.
        channel_axis: the axis holding ``(phi1, Phi, phi2)``.

    Returns:
        Same shape and type, values in ``[0, 1]`` for valid angles.
    """
    if not hasattr(euler, "new_tensor"):
        euler = np.asarray(euler)
    return euler / _scale(euler, channel_axis)


def denormalise_euler(normalised, channel_axis: int = -1):
    """Inverse of :func:`normalise_euler`: multiply by ``(2 pi, pi, 2 pi)`` along ``channel_axis``."""
    if not hasattr(normalised, "new_tensor"):
        normalised = np.asarray(normalised)
    return normalised * _scale(normalised, channel_axis)


def euler_to_quaternion(euler: np.ndarray) -> np.ndarray:
    """Unit quaternions ``(w, x, y, z)`` of Bunge Euler angles (damask convention, ``w >= 0``).

    Args:
        euler: ``(..., 3)`` radians in the valid ranges.

    Returns:
        ``(..., 4)`` float64.
    """
    e = np.asarray(euler, dtype=np.float64)
    if e.size == 0:
        return np.zeros(e.shape[:-1] + (4,))
    return np.asarray(_rotations(e).quaternion, dtype=np.float64).reshape(e.shape[:-1] + (4,))
