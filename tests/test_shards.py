"""HDF5 shards: round trip, determinism, the normalised field, and one-line errors on bad input."""

from __future__ import annotations

import hashlib
import math

import h5py
import numpy as np
import pytest

from microfp.shards import EULER_SCALE, ShardError, VESet, euler_field, pack, read_set, read_shard, write_shard


def make_set(n: int = 3, size: int = 8, seed: int = 0) -> VESet:
    rng = np.random.default_rng(seed)
    ves = []
    for _ in range(n):
        g = int(rng.integers(2, 6))
        ids = rng.integers(0, g, (size, size, size))
        ids.flat[:g] = np.arange(g)  # every grain present
        ves.append((ids, (rng.uniform(0, 1, (g, 3)) * EULER_SCALE).astype(np.float32)))
    grain_ids, euler, n_grains = pack(ves)
    return VESet(grain_ids, euler, n_grains, np.arange(n), np.full(n, 5.78, np.float32), "cubic", 0.5, {"seed": seed, "params": {"n": n}})


def md5(path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_round_trip_and_padding(tmp_path):
    ves = make_set()
    write_shard(tmp_path / "s.h5", ves)
    back = read_shard(tmp_path / "s.h5")
    np.testing.assert_array_equal(back.grain_ids, ves.grain_ids)
    np.testing.assert_array_equal(back.n_grains, ves.n_grains)
    for i in range(len(ves)):
        np.testing.assert_array_equal(back.grain_euler(i), ves.grain_euler(i))
        assert np.all(np.isnan(back.euler[i, back.n_grains[i]:]))
    assert back.crystal == "cubic" and back.resolution == 0.5
    assert back.attrs["seed"] == 0 and back.attrs["params"] == '{"n": 3}'
    assert back.attrs["format_version"] == 1


def test_same_content_gives_byte_identical_files(tmp_path):
    write_shard(tmp_path / "a.h5", make_set(seed=4))
    write_shard(tmp_path / "b.h5", make_set(seed=4))
    write_shard(tmp_path / "c.h5", make_set(seed=5))
    assert md5(tmp_path / "a.h5") == md5(tmp_path / "b.h5") != md5(tmp_path / "c.h5")


def test_euler_field_is_normalised_channel_first():
    ids = np.array([[[0, 1], [1, 0]], [[1, 1], [0, 0]]], dtype=np.uint16)
    euler = np.array([[math.pi, math.pi / 2, math.pi / 2], [2 * math.pi, 0.0, math.pi]], dtype=np.float32)
    field = euler_field(ids, euler)
    assert field.shape == (3, 2, 2, 2) and field.dtype == np.float32
    np.testing.assert_allclose(field[:, 0, 0, 0], [0.5, 0.5, 0.25])
    np.testing.assert_allclose(field[:, 0, 0, 1], [1.0, 0.0, 0.5])


def test_read_set_concatenates_shards(tmp_path):
    write_shard(tmp_path / "shard-00000.h5", make_set(2, seed=1))
    write_shard(tmp_path / "shard-00001.h5", make_set(3, seed=2))
    assert len(read_set(tmp_path)) == 5
    with pytest.raises(ShardError, match="no shards found"):
        read_set(tmp_path / "empty")


def one_line(err: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(err.value)
    return str(err.value)


def test_truncated_and_foreign_files(tmp_path):
    good = tmp_path / "good.h5"
    write_shard(good, make_set())
    cut = tmp_path / "cut.h5"
    cut.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(ShardError) as err:
        read_shard(cut)
    assert "corrupt or truncated" in one_line(err)
    text = tmp_path / "text.h5"
    text.write_text("hello")
    with pytest.raises(ShardError):
        read_shard(text)
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["data"] = np.zeros(3)
    with pytest.raises(ShardError) as err:
        read_shard(foreign)
    assert "missing grain_ids, euler, n_grains" in one_line(err)
    with pytest.raises(ShardError, match="no such shard"):
        read_shard(tmp_path / "missing.h5")


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda v: v.euler.__setitem__((0, 0, 0), np.nan), "NaN"),
        (lambda v: v.euler.__setitem__((1, 0, 1), 45.0), "outside"),
        (lambda v: v.grain_ids.__setitem__((0, 0, 0, 0), 60), "grain id"),
        (lambda v: setattr(v, "crystal", "tetragonal"), "crystal family"),
        (lambda v: setattr(v, "grain_ids", v.grain_ids[:, :, :4]), "shape"),
        (lambda v: setattr(v, "grain_ids", v.grain_ids.astype(np.int32)), "uint16"),
    ],
)
def test_invalid_content_is_refused_and_nothing_written(tmp_path, corrupt, message):
    ves = make_set()
    corrupt(ves)
    with pytest.raises(ShardError, match=message):
        write_shard(tmp_path / "s.h5", ves)
    assert list(tmp_path.iterdir()) == []


def test_a_veset_checks_itself_when_made_and_reads_and_writes_itself(tmp_path):
    good = make_set()
    with pytest.raises(ShardError, match="crystal family"):
        VESet(**{**good.__dict__, "crystal": "tetragonal"})
    ids = good.grain_ids.copy()
    ids[0, 0, 0, 0] = 60
    with pytest.raises(ShardError, match=r"^imported\.h5: VE 0 has grain id 60"):
        VESet(**{**good.__dict__, "grain_ids": ids, "source": "imported.h5"})
    made = VESet.from_ves([(good.grain_ids[i], good.grain_euler(i)) for i in range(len(good))], "cubic", 0.5)
    assert np.array_equal(made.euler, good.euler, equal_nan=True) and np.array_equal(made.grain_ids, good.grain_ids)
    assert made.ve_index.tolist() == [0, 1, 2] and np.isnan(made.esd_target).all()
    made.write(tmp_path / "s.h5")
    back = VESet.read(tmp_path / "s.h5")
    assert back.source == str(tmp_path / "s.h5") and np.array_equal(back.grain_ids, made.grain_ids)


def test_euler_bounds_are_one_value_everywhere():
    from microfp import crystallography, rotations
    from microfp.shards import EULER_MAX

    # crystallography keeps a literal copy (its source is hashed into every shard): it must not drift
    assert crystallography.EULER_SCALE == rotations.EULER_SCALE == EULER_MAX
    assert EULER_SCALE.dtype == np.float32 and np.array_equal(EULER_SCALE, np.float32(EULER_MAX))
