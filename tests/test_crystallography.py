"""Tests of orientation sampling, fundamental-zone reduction and normalisation."""

from __future__ import annotations

import damask
import numpy as np
import pytest

from microfp.config import TEXTURES_DEG, SetSpec
from microfp.crystallography import (
    denormalise_euler,
    euler_to_quaternion,
    grain_orientations,
    in_fundamental_zone,
    normalise_euler,
    random_euler,
    reduce_to_fundamental_zone,
    textured_euler,
    to_float32_in_fz,
    wrap_euler,
)

FAMILIES = ["cubic", "hexagonal"]


def _disorientation_deg(a: np.ndarray, b: np.ndarray, family: str) -> np.ndarray:
    oa = damask.Orientation(rotation=damask.Rotation.from_Euler_angles(np.asarray(a, float)), family=family)
    ob = damask.Orientation(rotation=damask.Rotation.from_Euler_angles(np.asarray(b, float)), family=family)
    return np.degrees(oa.disorientation_angle(ob))


def test_random_euler_is_uniform_on_so3_and_deterministic():
    e = random_euler(20000, np.random.default_rng(0))
    assert e.shape == (20000, 3)
    assert e.min() >= 0 and e[:, [0, 2]].max() <= 2 * np.pi and e[:, 1].max() <= np.pi
    # uniform on SO(3): cos(Phi) uniform on [-1, 1], phi1 and phi2 uniform on [0, 2 pi)
    assert abs(np.cos(e[:, 1]).mean()) < 0.03
    assert abs(np.mean(np.cos(e[:, 1]) ** 2) - 1 / 3) < 0.02  # not uniform in Phi (that gives 1/2)
    assert abs(e[:, 0].mean() - np.pi) < 0.05
    np.testing.assert_array_equal(e, random_euler(20000, np.random.default_rng(0)))


def test_textured_euler_centre_and_spread():
    e = np.degrees(textured_euler(TEXTURES_DEG["copper"], 2.0, 20000, np.random.default_rng(1)))
    np.testing.assert_allclose(e.mean(axis=0), [90, 35, 45], atol=0.1)
    np.testing.assert_allclose(e.std(axis=0), [2, 2, 2], rtol=0.05)


def test_textured_euler_positive_noise_at_zero_centres():
    e = np.degrees(textured_euler(TEXTURES_DEG["brass"], 2.0, 20000, np.random.default_rng(2)))
    phi2 = e[:, 2]
    # phi2 centre is 0: half-normal noise, no wrap to ~360
    assert phi2.max() < 15
    assert phi2.min() >= 0
    assert abs(phi2.mean() - 2 * np.sqrt(2 / np.pi)) < 0.05
    assert abs(phi2.std() - 2 * np.sqrt(1 - 2 / np.pi)) < 0.05
    np.testing.assert_allclose(e[:, :2].mean(axis=0), [35, 45], atol=0.1)
    cube = np.degrees(textured_euler(TEXTURES_DEG["cube"], 2.0, 5000, np.random.default_rng(3)))
    assert cube.max() < 15 and cube.min() >= 0


def test_wrap_euler_keeps_the_rotation():
    rng = np.random.default_rng(4)
    raw = rng.uniform(-7, 7, size=(500, 3))
    w = wrap_euler(raw)
    assert w[:, [0, 2]].min() >= 0 and w[:, [0, 2]].max() < 2 * np.pi
    assert w[:, 1].min() >= 0 and w[:, 1].max() <= np.pi
    # Compare rotation matrices built directly from the (unwrapped) Bunge angles.
    def matrix(e):
        c1, s1 = np.cos(e[:, 0]), np.sin(e[:, 0])
        c, s = np.cos(e[:, 1]), np.sin(e[:, 1])
        c2, s2 = np.cos(e[:, 2]), np.sin(e[:, 2])
        return np.stack([
            np.stack([c1 * c2 - s1 * s2 * c, s1 * c2 + c1 * s2 * c, s2 * s], -1),
            np.stack([-c1 * s2 - s1 * c2 * c, -s1 * s2 + c1 * c2 * c, c2 * s], -1),
            np.stack([s1 * s, -c1 * s, c * np.ones_like(c1)], -1),
        ], -2)
    np.testing.assert_allclose(matrix(w), matrix(raw), atol=1e-12)


@pytest.mark.parametrize("family", FAMILIES)
def test_reduction_lands_in_fz_and_keeps_the_orientation(family):
    e = random_euler(2000, np.random.default_rng(5))
    assert not in_fundamental_zone(e, family).all()  # the check can fail
    r = reduce_to_fundamental_zone(e, family)
    assert r.shape == e.shape and r.dtype == np.float64
    assert in_fundamental_zone(r, family).all()
    assert r[:, [0, 2]].max() < 2 * np.pi and r[:, 1].max() <= np.pi
    # symmetric equivalents: disorientation zero
    assert _disorientation_deg(e, r, family).max() < 1e-6
    if family == "cubic":
        assert np.degrees(r[:, 1]).max() < 60.5  # cubic FZ: Phi up to ~60.3 deg


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("texture", ["brass", "copper", "goss"])
def test_float32_rounding_stays_in_fz_near_the_boundary(family, texture):
    # Tiny spread: many orientations within float32 rounding of the FZ boundary (cubic: Goss,
    # brass and copper lie on it).
    e = textured_euler(TEXTURES_DEG[texture], 1e-5, 4000, np.random.default_rng(6))
    r = reduce_to_fundamental_zone(e, family)
    fixed = to_float32_in_fz(r, family)
    assert fixed.dtype == np.float32
    assert in_fundamental_zone(fixed, family).all()
    assert np.abs(fixed.astype(np.float64) - r).max() < 1e-5
    if family == "cubic":  # plain rounding does leave the zone: the fix is needed
        assert not in_fundamental_zone(r.astype(np.float32), family).all()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("texture", ["random", "brass", "copper", "cube", "goss"])
def test_grain_orientations_in_fz_float32(family, texture):
    spec = SetSpec(n=1, texture=texture, crystal=family)
    e = grain_orientations(spec, 300, np.random.default_rng(7))
    assert e.shape == (300, 3) and e.dtype == np.float32
    assert in_fundamental_zone(e, family).all()


@pytest.mark.parametrize("texture", ["brass", "copper", "cube", "goss"])
def test_textured_orientations_cluster_at_the_table2_centre(texture):
    spec = SetSpec(n=1, texture=texture)
    e = grain_orientations(spec, 2000, np.random.default_rng(8))
    centre = np.radians(np.asarray(TEXTURES_DEG[texture], float))[None].repeat(len(e), 0)
    dis = _disorientation_deg(e.astype(np.float64), centre, "cubic")
    assert np.percentile(dis, 95) < 8  # near the centre, symmetry-aware
    assert np.median(dis) > 1  # but spread out (2 deg per angle)
    random = grain_orientations(SetSpec(n=1), 2000, np.random.default_rng(8))
    assert np.median(_disorientation_deg(random.astype(np.float64), centre, "cubic")) > 20


def test_zero_spread_on_the_fz_boundary():
    # Goss (0, 45, 0) lies exactly on the cubic FZ boundary.
    e = grain_orientations(SetSpec(n=1, texture="goss", spread_deg=0.0), 10, np.random.default_rng(0))
    assert in_fundamental_zone(e, "cubic").all()
    centre = np.radians([[0.0, 45.0, 0.0]]).repeat(10, 0)
    assert _disorientation_deg(e.astype(np.float64), centre, "cubic").max() < 1e-3


def test_normalise_round_trip_and_range():
    rng = np.random.default_rng(9)
    e = reduce_to_fundamental_zone(random_euler(100, rng), "cubic").astype(np.float32)
    n = normalise_euler(e)
    assert n.dtype == np.float32 and n.min() >= 0 and n.max() <= 1
    np.testing.assert_allclose(n[:, 1], e[:, 1] / np.pi, rtol=1e-6)
    np.testing.assert_allclose(denormalise_euler(n), e, rtol=1e-6)
    # channel-first volume (3, n, n, n) and batched (B, 3, n, n, n)
    vol = np.moveaxis(e[:64].reshape(4, 4, 4, 3), -1, 0)
    nv = normalise_euler(vol, channel_axis=0)
    np.testing.assert_allclose(np.moveaxis(nv, 0, -1).reshape(-1, 3), n[:64], rtol=1e-6)
    np.testing.assert_allclose(denormalise_euler(nv, channel_axis=0), vol, rtol=1e-6)
    batch = vol[None].repeat(2, 0)
    np.testing.assert_allclose(normalise_euler(batch, channel_axis=1)[1], nv, rtol=1e-6)
    with pytest.raises(ValueError):
        normalise_euler(vol)  # last axis has length 4, not 3


def test_normalise_torch_tensor():
    torch = pytest.importorskip("torch")
    t = torch.rand(3, 4, 4, 4, dtype=torch.float32) * torch.tensor([6.0, 3.0, 6.0]).reshape(3, 1, 1, 1)
    n = normalise_euler(t, channel_axis=0)
    assert isinstance(n, torch.Tensor) and n.dtype == torch.float32
    assert torch.allclose(denormalise_euler(n, channel_axis=0), t)


def test_euler_to_quaternion():
    q = euler_to_quaternion(np.zeros((2, 5, 3)))
    assert q.shape == (2, 5, 4)
    np.testing.assert_allclose(q[..., 0], 1.0)
    e = random_euler(50, np.random.default_rng(10))
    q = euler_to_quaternion(e)
    np.testing.assert_allclose(np.linalg.norm(q, axis=-1), 1.0, atol=1e-12)
    # rotation by 90 deg about z: phi1 = 90 deg -> (cos 45, 0, 0, +-sin 45)
    q90 = euler_to_quaternion(np.radians([[90.0, 0.0, 0.0]]))[0]
    np.testing.assert_allclose(np.abs(q90), [np.sqrt(0.5), 0, 0, np.sqrt(0.5)], atol=1e-12)


def test_component_fraction_gives_ves_textured_around_their_own_random_orientation():
    from microfp.crystallography import grain_orientations

    def spread_deg(euler: np.ndarray) -> float:
        ori = damask.Orientation.from_Euler_angles(phi=euler.astype(np.float64), family="cubic")
        return float(np.degrees(np.median(ori[0:1].disorientation_angle(ori[1:]))))

    textured = SetSpec(n=4, component_fraction=1.0, spread_deg=2.0)
    centres = []
    for seed in range(3):
        e = grain_orientations(textured, 30, np.random.default_rng(seed))
        assert spread_deg(e) < 10  # one component per VE
        centres.append(e[0])
    centres_ori = damask.Orientation.from_Euler_angles(phi=np.array(centres, np.float64), family="cubic")
    assert np.degrees(centres_ori[0:1].disorientation_angle(centres_ori[1:])).min() > 5  # random centres
    # fraction 0 is the plain random texture, draw for draw (existing sets unchanged)
    plain = SetSpec(n=4)
    assert np.array_equal(grain_orientations(plain, 30, np.random.default_rng(7)),
                          grain_orientations(SetSpec(n=4, component_fraction=0.0), 30, np.random.default_rng(7)))
    assert spread_deg(grain_orientations(plain, 30, np.random.default_rng(7))) > 20
