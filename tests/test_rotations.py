"""Quaternion fields, fundamental-zone reduction and the symmetry-aware loss against damask."""

from __future__ import annotations

import damask
import numpy as np
import pytest
import torch

from microfp.rotations import (
    disorientation_cos_half,
    euler_field_to_quaternion,
    euler_to_quaternion,
    quaternion_field_to_euler,
    quaternion_multiply,
    quaternion_to_euler,
    reduce_to_fz,
    symmetric_misorientation_loss,
    symmetry_quaternions,
)

FAMILIES = ("cubic", "hexagonal")


@pytest.mark.parametrize("family", FAMILIES)
def test_conversions_and_reduction_match_damask(family: str) -> None:
    ori = damask.Orientation.from_random(shape=500, family=family, rng_seed=3)
    euler = torch.tensor(ori.as_Euler_angles())
    q = euler_to_quaternion(euler)
    assert np.allclose(q.numpy(), ori.quaternion, atol=1e-12)
    back = quaternion_to_euler(q)
    # the same rotation (damask's Euler angles may split phi1/phi2 differently only at Phi = 0 or pi)
    assert np.allclose(np.abs((euler_to_quaternion(back) * q).sum(-1).numpy()), 1.0, atol=1e-12)
    assert np.allclose(reduce_to_fz(q, family).numpy(), ori.reduced.quaternion, atol=1e-12)
    assert symmetry_quaternions(family).shape == ({"cubic": 24, "hexagonal": 12}[family], 4)


@pytest.mark.parametrize("family", FAMILIES)
def test_disorientation_matches_damask(family: str) -> None:
    a = damask.Orientation.from_random(shape=300, family=family, rng_seed=4)
    b = damask.Orientation.from_random(shape=300, family=family, rng_seed=5)
    cos_half = disorientation_cos_half(torch.tensor(a.quaternion), torch.tensor(b.quaternion), family)
    assert np.allclose(2 * np.arccos(np.clip(cos_half.numpy(), 0, 1)), a.disorientation_angle(b), atol=1e-9)


def test_euler_quaternion_field_round_trip() -> None:
    # FZ orientations as the generator stores them: Euler field -> quaternion field -> Euler field
    ori = damask.Orientation.from_random(shape=(2, 8, 8, 8), family="cubic", rng_seed=6).reduced
    x = torch.tensor(ori.as_Euler_angles() / np.array([2 * np.pi, np.pi, 2 * np.pi]), dtype=torch.float32)
    x = x.movedim(-1, 1).contiguous()  # (2, 3, 8, 8, 8)
    q = euler_field_to_quaternion(x, "cubic")
    assert q.shape == (2, 4, 8, 8, 8) and torch.allclose(q.norm(dim=1), torch.ones(2, 8, 8, 8), atol=1e-6)
    assert np.allclose(q.movedim(1, -1).numpy(), ori.quaternion, atol=1e-5)
    x_back = quaternion_field_to_euler(q, "cubic")
    q_back = euler_field_to_quaternion(x_back, "cubic")
    assert torch.allclose((q * q_back).sum(1).abs(), torch.ones(2, 8, 8, 8), atol=1e-5)  # same rotations
    # a scaled (unnormalised) network output decodes to the same field
    assert torch.allclose(quaternion_field_to_euler(3.0 * q, "cubic"), x_back, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_symmetry_equivalent_orientations_give_zero_loss(family: str) -> None:
    gen = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(2, 4, 6, 6, 6, generator=gen, dtype=torch.float64), dim=1)
    sym = symmetry_quaternions(family, torch.float64)
    pick = sym[torch.randint(len(sym), (2, 6, 6, 6), generator=gen)]  # a random operator per voxel
    equivalent = quaternion_multiply(pick, q.movedim(1, -1)).movedim(-1, 1)
    assert float((equivalent - q).abs().max()) > 0.5  # really other quaternions
    assert symmetric_misorientation_loss(equivalent, q, family).item() == pytest.approx(0.0, abs=1e-6)
    assert symmetric_misorientation_loss(-2.0 * equivalent, q, family).item() == pytest.approx(0.0, abs=1e-6)
    other = torch.nn.functional.normalize(torch.randn(2, 4, 6, 6, 6, generator=gen, dtype=torch.float64), dim=1)
    assert symmetric_misorientation_loss(other, q, family).item() > 0.01


def test_loss_has_gradients() -> None:
    q = euler_field_to_quaternion(torch.rand(1, 3, 4, 4, 4), "cubic")
    q_hat = torch.randn(1, 4, 4, 4, 4, requires_grad=True)
    symmetric_misorientation_loss(q_hat, q, "cubic").backward()
    assert q_hat.grad is not None and torch.isfinite(q_hat.grad).all() and q_hat.grad.abs().sum() > 0


def test_unknown_family_is_an_error() -> None:
    from microfp.errors import MicrofpError

    with pytest.raises(MicrofpError, match="cubic or hexagonal"):
        symmetry_quaternions("tetragonal")
