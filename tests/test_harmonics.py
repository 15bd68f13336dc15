"""Symmetry-invariant texture harmonics (microfp.harmonics)."""

from __future__ import annotations

import damask
import numpy as np
import pytest

from microfp.harmonics import local_state


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
