"""The `microfp` command as a user runs it: help for every command, import/export, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from microfp import datasets, shards
from microfp.config import parse_params

from conftest import microfp_click_group, run_cli, tiny_raw

COMMANDS = ["check-params", "generate", "datasets-summary", "import dream3d", "import damask", "export damask", "export dream3d"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command):
    result = run_cli(*command.split(), "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage: microfp" in result.stdout and len(result.stdout) > 200


def _walk(command, path=()):
    """(command path, click parameter) of every parameter of every microfp command."""
    if hasattr(command, "commands"):  # a group (typer vendors its own click: no isinstance)
        for name, sub in command.commands.items():
            yield from _walk(sub, (*path, name))
    else:
        for param in command.params:
            yield " ".join(path), param


def test_help_texts_survive_rich_markup():
    """Typer renders help with rich markup, which swallows square brackets: "Shard directory
    [default: data/ves/SET]." was shown as "Shard directory .". Defaults are written in parentheses."""
    params = list(_walk(microfp_click_group()))
    assert len({path for path, _ in params}) >= 15, "expected every microfp command"
    bad = [f"{path} {param.name}: {param.help!r}" for path, param in params if "[" in (getattr(param, "help", None) or "")]
    assert not bad, "help text with [...] (rich markup eats it): " + "; ".join(bad)


def test_no_arguments_prints_help_and_unknown_option_exits_2():
    assert "generate" in run_cli().stdout + run_cli().stderr
    result = run_cli("generate", "train", "--frobnicate")
    assert result.returncode == 2 and "No such option" in result.stderr and "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    out = tmp_path_factory.mktemp("ves")
    params = parse_params(tiny_raw(train={"n": 2}, val={"n": 1}, hcp={"n": 1, "crystal": "hexagonal"}))
    datasets.generate_set(params, "train", out / "train", workers=1, progress=False)
    datasets.generate_set(params, "hcp", out / "hcp", workers=1, progress=False)
    return out


@pytest.mark.parametrize("fmt, name", [("damask", "grid"), ("dream3d", "ve.dream3d")])
@pytest.mark.parametrize("set_name", ["train", "hcp"])
def test_export_then_import_round_trips(tmp_path, shard, fmt, name, set_name):
    source = shard / set_name / "shard-00000.h5"
    exported = tmp_path / name
    result = run_cli("export", fmt, str(source), "--index", "0", "--out", str(exported))
    assert result.returncode == 0, result.stderr
    vti = next(exported.glob("*.vti")) if fmt == "damask" else exported
    result = run_cli("import", fmt, str(vti), "--out", str(tmp_path / "back.h5"))
    assert result.returncode == 0, result.stderr
    original, back = shards.read_shard(source), shards.read_shard(tmp_path / "back.h5")
    assert back.crystal == original.crystal and back.resolution == pytest.approx(original.resolution)
    # same partition of the voxels into grains (ids may be relabelled) ...
    pairs = np.unique(np.stack([original.grain_ids[0].ravel(), back.grain_ids[0].ravel()]), axis=1)
    assert pairs.shape[1] == original.n_grains[0] == back.n_grains[0]
    # ... with the same orientations up to crystal symmetry
    import damask

    mapping = dict(zip(pairs[0], pairs[1]))
    a = original.grain_euler(0)
    b = back.grain_euler(0)[[mapping[g] for g in range(len(a))]]
    o_a = damask.Orientation.from_Euler_angles(phi=a.astype(float), family=original.crystal)
    o_b = damask.Orientation.from_Euler_angles(phi=b.astype(float), family=original.crystal)
    assert np.degrees(o_a.disorientation_angle(o_b)).max() < 1e-2


def test_bad_files_give_one_line_and_no_output(tmp_path, shard):
    broken = tmp_path / "broken.dream3d"
    broken.write_bytes((shard / "train" / "shard-00000.h5").read_bytes()[:1500])
    for args in (
        ("import", "dream3d", str(broken), "--out", str(tmp_path / "x.h5")),
        ("import", "damask", str(tmp_path / "missing.vti"), "--out", str(tmp_path / "x.h5")),
        ("export", "damask", str(broken), "--out", str(tmp_path / "x")),
        ("export", "dream3d", str(shard / "train" / "shard-00000.h5"), "--index", "5", "--out", str(tmp_path / "x.dream3d")),
    ):
        result = run_cli(*args)
        assert result.returncode == 2, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("microfp: error: "), result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.dream3d"]
