"""Orientation fields as unit quaternions, symmetry reduction and the symmetry-aware loss (torch).

Conventions are damask's (``P = -1``): quaternions ``(w, x, y, z)`` with ``w >= 0``, Bunge Euler angles
``(phi1, Phi, phi2)`` in radians, composition as ``damask.Rotation.__mul__``. The crystal symmetry
operators come from damask (``damask.Crystal(family=...).symmetry_operations``). Everything here is a
pure function of tensors, runs on any device and any batch shape, and is differentiable where the
loss needs it.

Fields: a normalised Euler field is ``(B, 3, n, n, n)`` in [0, 1] (angles divided by
``EULER_SCALE`` = (2 pi, pi, 2 pi), the VAE's input of the paper); a quaternion field is
``(B, 4, n, n, n)``, unit length along dimension 1.

Fundamental zone: for the proper point groups 432 (cubic) and 622 (hexagonal) damask's Rodrigues
fundamental zone is the set of orientations whose rotation angle is the smallest among their
symmetric equivalents, so :func:`reduce_to_fz` picks the equivalent with the largest ``|w|`` (the
test checks it against ``damask.Orientation.reduced``).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

from microfp.errors import MicrofpError
from microfp.shards import EULER_MAX

__all__ = [
    "align_to",
    "disorientation_cos_half",
    "euler_field_to_quaternion",
    "euler_to_quaternion",
    "quaternion_field_to_euler",
    "quaternion_multiply",
    "quaternion_to_matrix",
    "phi4",
    "quaternion_to_euler",
    "reduce_to_fz",
    "symmetric_misorientation_loss",
    "symmetry_quaternions",
]

_P = -1.0  # damask's sign convention of the quaternion product and of the Euler conversion
EULER_SCALE = EULER_MAX  # (2 pi, pi, 2 pi) in float64 (microfp.shards.EULER_SCALE is its float32 rounding)
FAMILIES = ("cubic", "hexagonal")


def check_family(family: str) -> None:
    """A one-line error unless ``family`` is one of :data:`FAMILIES`."""
    if family not in FAMILIES:
        raise MicrofpError(f"crystal family must be cubic or hexagonal, got {family!r}")


def euler_to_quaternion(euler: torch.Tensor) -> torch.Tensor:
    """Unit quaternions ``(..., 4)`` (``w >= 0``) of Bunge Euler angles ``(..., 3)`` in radians
    (damask's ``Rotation.from_Euler_angles``); same dtype and device."""
    e = 0.5 * euler
    c_big, s_big = torch.cos(e[..., 1]), torch.sin(e[..., 1])
    plus, minus = e[..., 0] + e[..., 2], e[..., 0] - e[..., 2]
    q = torch.stack(
        [c_big * torch.cos(plus), -_P * s_big * torch.cos(minus), -_P * s_big * torch.sin(minus),
         -_P * c_big * torch.sin(plus)],
        dim=-1,
    )
    return torch.where(q[..., :1] < 0, -q, q)


def quaternion_to_euler(q: torch.Tensor) -> torch.Tensor:
    """Bunge Euler angles ``(..., 3)`` in radians, phi1 and phi2 in [0, 2 pi), Phi in [0, pi], of unit
    quaternions ``(..., 4)`` (either hemisphere): damask's ``Rotation.as_Euler_angles`` (Bernardes and
    Viollet 2022). At Phi = 0 or pi the split between phi1 and phi2 is arbitrary; the rotation is not."""
    q = torch.where(q[..., :1] < 0, -q, q)
    a, b, c, d = q[..., 0], -_P * q[..., 3], -_P * q[..., 1], -_P * q[..., 2]
    half_sum, half_diff = torch.atan2(b, a), torch.atan2(-d, c)
    ab, cd = a.square() + b.square(), c.square() + d.square()
    big = torch.acos((2 * ab / (ab + cd) - 1).clamp(-1.0, 1.0))
    two_pi = 2 * math.pi
    return torch.stack(
        [torch.remainder(half_sum - half_diff, two_pi), big, torch.remainder(half_sum + half_diff, two_pi)], dim=-1
    )


def quaternion_to_matrix(q: torch.Tensor) -> torch.Tensor:
    """Rotation matrices ``(..., 3, 3)`` of unit quaternions ``(..., 4)``: damask's ``Rotation.as_matrix``
    (passive: row ``i`` is crystal axis ``i`` in the sample frame)."""
    w, x, y, z = q.unbind(-1)
    qq = w * w - (x * x + y * y + z * z)
    rows = [
        qq + 2 * x * x, 2 * (y * x - _P * w * z), 2 * (z * x + _P * w * y),
        2 * (x * y + _P * w * z), qq + 2 * y * y, 2 * (z * y - _P * w * x),
        2 * (x * z - _P * w * y), 2 * (y * z + _P * w * x), qq + 2 * z * z,
    ]
    return torch.stack(rows, -1).reshape(*q.shape[:-1], 3, 3)


def quaternion_multiply(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Composition ``a * b`` (first ``b``, then ``a``) with damask's convention, not standardised to
    ``w >= 0``. ``(..., 4)`` each, broadcast."""
    aw, av = a[..., :1], a[..., 1:]
    bw, bv = b[..., :1], b[..., 1:]
    w = aw * bw - (av * bv).sum(-1, keepdim=True)
    v = aw * bv + bw * av + _P * torch.linalg.cross(av, bv, dim=-1)
    return torch.cat([w, v], dim=-1)


def phi4(q1: torch.Tensor, q2: torch.Tensor) -> torch.Tensor:
    """Paper eq. 5: ``1 - |q1 . q2|`` per pair of unit quaternions ``(..., 4)``; in [0, 1], 0 for equal
    rotations (including ``q`` and ``-q``). Not symmetry-aware."""
    return (1.0 - (q1 * q2).sum(-1).abs()).clamp(0.0, 1.0)


@lru_cache(maxsize=None)
def _symmetry_numpy(family: str) -> np.ndarray:
    import damask

    return np.asarray(damask.Crystal(family=family).symmetry_operations.quaternion, dtype=np.float64)


def symmetry_quaternions(family: str, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """The proper rotations of the crystal family as quaternions ``(S, 4)``: 24 (cubic, 432) or 12
    (hexagonal, 622), from damask."""
    check_family(family)
    return torch.as_tensor(_symmetry_numpy(family), dtype=dtype, device=device)


def _left_matrices(sym: torch.Tensor) -> torch.Tensor:
    """``(S, 4, 4)`` matrices ``M_s`` with ``s * q = M_s q`` (damask's product, ``P = -1``)."""
    w, x, y, z = sym.unbind(-1)
    # s * q = (sw qw - sv.qv, sw qv + qw sv + P sv x qv), P = -1
    rows = [
        torch.stack([w, -x, -y, -z], -1),
        torch.stack([x, w, z, -y], -1),
        torch.stack([y, -z, w, x], -1),
        torch.stack([z, y, -x, w], -1),
    ]
    return torch.stack(rows, -2)


def reduce_to_fz(q: torch.Tensor, family: str, dim: int = -1) -> torch.Tensor:
    """The symmetric equivalent ``s * q`` (damask's ``Orientation.equivalent``) of each orientation
    (components along ``dim``, 4) with the smallest rotation angle, ``w >= 0``: the fundamental-zone
    representative (damask's ``Orientation.reduced`` up to ties on the zone's boundary). Same shape."""
    sym = symmetry_quaternions(family, q.dtype, q.device)  # (S, 4)
    mats = _left_matrices(sym)  # (S, 4, 4)
    qm = q.movedim(dim, -1)
    flat = qm.reshape(-1, 4)
    w = flat @ mats[:, 0, :].T  # (N, S): the w of every equivalent, one matmul
    best = w.abs().argmax(dim=1)  # (N,)
    out = torch.bmm(mats[best], flat.unsqueeze(-1)).squeeze(-1)  # (N, 4)
    out = torch.where(out[:, :1] < 0, -out, out)
    return out.reshape(qm.shape).movedim(-1, dim)


ALIGN_CHUNK = 1 << 18  # orientations per step of :func:`align_to` (bounds its (N, S) and (N, 16) temporaries)


def align_to(q: torch.Tensor, ref: torch.Tensor, family: str, dim: int = -1) -> torch.Tensor:
    """The symmetric equivalent ``s * q`` (and sign) of each orientation closest to ``ref`` (same
    shape, broadcast; components along ``dim``): what makes orientations of one texture component
    averageable when they straddle the fundamental zone's boundary."""
    sym = symmetry_quaternions(family, q.dtype, q.device)
    mats = _left_matrices(sym)  # (S, 4, 4)
    qm, rm = q.movedim(dim, -1), torch.broadcast_to(ref, q.shape).movedim(dim, -1)
    flat, rflat = qm.reshape(-1, 4), rm.reshape(-1, 4)
    out = torch.empty_like(flat)
    for part in torch.arange(len(flat), device=q.device).split(ALIGN_CHUNK):
        f, r = flat[part], rflat[part]
        # r . (M_s f) = sum_ij r_i f_j M_sij: one (N, 16) x (16, S) product, not all S equivalents
        dots = (r.unsqueeze(-1) * f.unsqueeze(-2)).reshape(-1, 16) @ mats.reshape(-1, 16).T  # (N, S)
        best = torch.bmm(mats[dots.abs().argmax(dim=1)], f.unsqueeze(-1)).squeeze(-1)  # (N, 4)
        out[part] = torch.where((best * r).sum(-1, keepdim=True) < 0, -best, best)
    return out.reshape(qm.shape).movedim(-1, dim)


def disorientation_cos_half(q1: torch.Tensor, q2: torch.Tensor, family: str, dim: int = -1) -> torch.Tensor:
    """``cos(omega / 2)`` of the disorientation angle omega of pairs of orientations (components along
    ``dim``, 4; the result drops that dimension): the largest ``|w|`` among the symmetric equivalents of
    ``q1 * conj(q2)``, in closed form (damask's ``Orientation.disorientation_angle``). Cubic (432): with
    ``a = |q1 * conj(q2)|`` per component, ``max(sum(a) / 2, a_(1), (a_(1) + a_(2)) / sqrt 2)``,
    ``a_(1) >= a_(2)`` the two largest; hexagonal (622): ``max(m1, m2, m1 sqrt3/2 + m4/2, m2 sqrt3/2 +
    m3/2)`` with ``m1 >= m4`` the sorted ``(|w|, |z|)`` and ``m2 >= m3`` the sorted ``(|x|, |y|)``. In
    [0, 1] for unit inputs; differentiable almost everywhere (the training loss uses it)."""
    check_family(family)
    w1, x1, y1, z1 = q1.unbind(dim)
    w2, x2, y2, z2 = q2.unbind(dim)
    # q1 * conj(q2) with damask's product: (w1 w2 + v1.v2, w2 v1 - w1 v2 + v1 x v2)
    a0 = (w1 * w2 + x1 * x2 + y1 * y2 + z1 * z2).abs()
    a1 = (w2 * x1 - w1 * x2 + y1 * z2 - z1 * y2).abs()
    a2 = (w2 * y1 - w1 * y2 + z1 * x2 - x1 * z2).abs()
    a3 = (w2 * z1 - w1 * z2 + x1 * y2 - y1 * x2).abs()
    if family == "cubic":
        top1 = torch.maximum(torch.maximum(a0, a1), torch.maximum(a2, a3))
        pairs = torch.maximum(
            torch.maximum(torch.maximum(a0 + a1, a0 + a2), torch.maximum(a0 + a3, a1 + a2)),
            torch.maximum(a1 + a3, a2 + a3),
        )
        return torch.maximum((a0 + a1 + a2 + a3) * 0.5, torch.maximum(top1, pairs * (math.sqrt(2.0) / 2.0)))
    m1, m4 = torch.maximum(a0, a3), torch.minimum(a0, a3)
    m2, m3 = torch.maximum(a1, a2), torch.minimum(a1, a2)
    s3 = math.sqrt(3.0) / 2.0
    return torch.maximum(torch.maximum(m1, m2), torch.maximum(m1 * s3 + m4 * 0.5, m2 * s3 + m3 * 0.5))


def euler_field_to_quaternion(x: torch.Tensor, family: str | None = None) -> torch.Tensor:
    """Normalised Euler field ``(B, 3, n, n, n)`` in [0, 1] -> quaternion field ``(B, 4, n, n, n)`` (unit
    along dim 1), reduced to the fundamental zone of ``family`` if given (the input of a ``quaternion``
    VAE)."""
    scale = x.new_tensor(EULER_SCALE).view(1, 3, *([1] * (x.ndim - 2)))
    q = euler_to_quaternion((x * scale).movedim(1, -1))
    if family is not None:
        q = reduce_to_fz(q, family)
    return q.movedim(-1, 1).contiguous()


def quaternion_field_to_euler(q: torch.Tensor, family: str) -> torch.Tensor:
    """Quaternion field ``(B, 4, n, n, n)`` (any length, normalised here) -> normalised Euler field
    ``(B, 3, n, n, n)`` in [0, 1] of its fundamental-zone representative (what ``evaluate`` reads)."""
    qn = torch.nn.functional.normalize(q.float(), dim=1, eps=1e-8).movedim(1, -1)
    euler = quaternion_to_euler(reduce_to_fz(qn, family))
    scale = euler.new_tensor(EULER_SCALE)
    return (euler / scale).clamp(0.0, 1.0).movedim(-1, 1).contiguous()


def symmetric_misorientation_loss(q_hat: torch.Tensor, q: torch.Tensor, family: str) -> torch.Tensor:
    """Mean over voxels and batch of ``1 - cos(omega / 2)``, omega the disorientation between the
    reconstruction ``q_hat`` ``(B, 4, n, n, n)`` (normalised here) and the input ``q`` (unit): the
    symmetry-aware version of the paper's phi4 (eq. 5), 0 for symmetry-equivalent orientations, a
    per-voxel mean (independent of ``ve_size``). Float32."""
    qh = torch.nn.functional.normalize(q_hat.float(), dim=1, eps=1e-8)
    return (1.0 - disorientation_cos_half(qh, q.float(), family, dim=1)).mean()
