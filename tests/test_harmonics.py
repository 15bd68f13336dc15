"""Symmetry-invariant texture harmonics (microfp.harmonics)."""

from __future__ import annotations

import damask
import numpy as np
import pytest
import torch

from microfp.harmonics import CHANNELS, NearestOrientation, harmonics, local_state, whitened_field


@pytest.mark.parametrize("family", ["cubic", "hexagonal"])
def test_local_state_is_symmetry_invariant(family: str) -> None:
    rot = damask.Rotation.from_random(100, rng_seed=1)
    ori = damask.Orientation(rotation=rot, family=family)
    base = local_state(np.asarray(rot.as_Euler_angles()), family)
    assert base.shape == (100, 9 if family == "cubic" else 18)
    equivalents = ori.equivalent
    for k in range(equivalents.shape[0]):
        np.testing.assert_allclose(local_state(np.asarray(equivalents[k].as_Euler_angles()), family), base, atol=1e-12)
    # but it tells different orientations apart, and a random texture averages to ~0
    other = local_state(np.asarray(damask.Rotation.from_random(100, rng_seed=2).as_Euler_angles()), family)
    assert np.abs(other - base).max() > 0.1
    many = local_state(np.asarray(damask.Rotation.from_random(20000, rng_seed=3).as_Euler_angles()), family)
    assert np.abs(many.mean(0)).max() < 0.01


@pytest.mark.parametrize("family", ["cubic", "hexagonal"])
def test_torch_harmonics_use_damask_orientation_matrices(family: str) -> None:
    # the rows of damask's orientation matrix, built in torch: same numbers as from damask's matrices
    rot = damask.Rotation.from_random(50, rng_seed=4)
    rows = np.asarray(rot.as_matrix())
    q = torch.as_tensor(np.asarray(rot.quaternion))
    from microfp.rotations import quaternion_to_matrix

    np.testing.assert_allclose(quaternion_to_matrix(q).numpy(), rows, atol=1e-12)
    assert harmonics(q, family).shape == (50, CHANNELS[family])


@pytest.mark.parametrize("family", ["cubic", "hexagonal"])
def test_symmetry_equivalent_orientations_give_zero_harmonics_loss(family: str) -> None:
    rot = damask.Rotation.from_random(64, rng_seed=5)
    ori = damask.Orientation(rotation=rot, family=family)
    q = torch.as_tensor(np.asarray(rot.quaternion)).view(1, 4, 4, 4, 4).permute(0, 4, 1, 2, 3)
    ref = whitened_field(q, family)
    for k in (1, 5, ori.equivalent.shape[0] - 1):
        qk = torch.as_tensor(np.asarray(ori.equivalent[k].quaternion)).view(1, 4, 4, 4, 4).permute(0, 4, 1, 2, 3)
        assert torch.nn.functional.mse_loss(whitened_field(qk, family), ref).item() < 1e-20
    other = whitened_field(torch.as_tensor(np.asarray(damask.Rotation.from_random(64, rng_seed=6).quaternion))
                           .view(1, 4, 4, 4, 4).permute(0, 4, 1, 2, 3), family)
    assert torch.nn.functional.mse_loss(other, ref).item() > 1.0  # unit variance per channel: ~2 for unrelated


@pytest.mark.parametrize("family", ["cubic", "hexagonal"])
def test_nearest_orientation_inverts_the_harmonics(family: str) -> None:
    rot = damask.Rotation.from_random(2000, rng_seed=7)
    decoder = NearestOrientation(family)
    h = torch.as_tensor(np.asarray(rot.quaternion)).float()
    back = decoder(whitened_field(h, family, dim=-1))
    assert back.shape == (2000, 4) and back.dtype == torch.float32
    a = damask.Orientation(rotation=rot, family=family)
    b = damask.Orientation(rotation=damask.Rotation(back.double().numpy()), family=family)
    angle = np.degrees(a.disorientation(b).as_axis_angle()[..., 3])
    assert angle.max() < 0.2
    # a mix of two orientations decodes to an orientation between them, nearer the heavier one
    h2 = torch.as_tensor(np.asarray(damask.Rotation.from_random(2000, rng_seed=8).quaternion)).float()
    mix = decoder(0.8 * whitened_field(h, family, dim=-1) + 0.2 * whitened_field(h2, family, dim=-1))
    c = damask.Orientation(rotation=damask.Rotation(mix.double().numpy()), family=family)
    d = damask.Orientation(rotation=damask.Rotation(h2.double().numpy()), family=family)
    to_heavy = np.degrees(a.disorientation(c).as_axis_angle()[..., 3])
    to_light = np.degrees(d.disorientation(c).as_axis_angle()[..., 3])
    assert np.mean(to_heavy < to_light) > 0.9


def test_least_squares_matches_lapack() -> None:
    from microfp.harmonics import _least_squares

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(64, 18)), rng.normal(size=(64, 18))
    np.testing.assert_allclose(_least_squares(a, b), np.linalg.lstsq(a, b, rcond=None)[0], atol=1e-12)


DECODER_DIGEST = """
import hashlib
from microfp.harmonics import nearest_orientation
d = [nearest_orientation(f) for f in ("cubic", "hexagonal")]
print(hashlib.md5(b"".join(t.numpy().tobytes() for n in d for t in (n.generators, n.table_h))).hexdigest())
"""


def test_decoder_tables_are_bit_identical_in_every_process() -> None:
    """The decoder's tables must not depend on the process (LAPACK's least squares did: 2 of 8
    processes gave other last bits, and with them other decoded VEs); environments of different sizes
    move the processes' memory layout."""
    import os
    import subprocess
    import sys

    digests = {
        subprocess.run([sys.executable, "-c", DECODER_DIGEST], env={**os.environ, "PAD": "x" * (7 * i)},
                       capture_output=True, text=True, check=True).stdout.strip()
        for i in range(4)
    }
    assert len(digests) == 1, digests
