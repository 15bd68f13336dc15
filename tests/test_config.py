"""The parameter schema: typos, wrong types and out-of-range values give one-line errors."""

from __future__ import annotations

import pytest
import yaml

from microfp.config import ParamsError, load_params, parse_params

from conftest import ROOT, run_cli, tiny_raw


def test_repository_params_and_paper_profile_are_valid():
    default = load_params(ROOT / "params.yaml")
    paper = load_params(ROOT / "configs" / "paper.yaml")
    assert default.box_size == pytest.approx(paper.box_size)  # same physical VE, fewer voxels
    assert paper.ve_size == 64 and paper.resolution == 0.25 and paper.latent_dim == 256
    assert paper.encoder == "resnet18"
    assert paper.generate.sets["train"].n == 100_000 and paper.generate.sets["val"].n == 10_000
    assert paper.generate.sets["small_mixed"].n == 110_000
    assert set(default.generate.sets) == set(paper.generate.sets)


@pytest.mark.parametrize(
    "edit, key",
    [
        (lambda r: r.update(latnt_dim=512), "latnt_dim"),
        (lambda r: r.update(latent_dim="big"), "latent_dim"),
        (lambda r: r.update(latent_dim=0), "latent_dim"),
        (lambda r: r.update(ve_size=30), "ve_size"),
        (lambda r: r.update(encoder="resnet50"), "encoder"),
        (lambda r: r.update(resolution=-0.25), "resolution"),
        (lambda r: r["generate"]["sets"]["train"].update(n=-1), "generate.sets.train.n"),
        (lambda r: r["generate"]["sets"]["train"].update(esd_mean="large"), "generate.sets.train.esd_mean"),
        (lambda r: r["generate"]["sets"]["train"].update(texture="rolling"), "generate.sets.train.texture"),
        (lambda r: r["generate"]["sets"]["train"].update(esd_sigam=0.1), "generate.sets.train.esd_sigam"),
        (lambda r: r["generate"].pop("sets"), "generate.sets"),
    ],
)
def test_bad_values_name_the_key_in_one_line(edit, key):
    raw = tiny_raw()
    edit(raw)
    with pytest.raises(ParamsError) as err:
        parse_params(raw)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"params.yaml: {key}: ")


def test_train_and_val_sets_must_exist():
    raw = tiny_raw(train={"n": 2})
    with pytest.raises(ParamsError, match="val_set"):
        parse_params(raw)


def test_unreadable_and_non_yaml_files(tmp_path):
    with pytest.raises(ParamsError, match="cannot read"):
        load_params(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: [1, 2\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ParamsError, match="mapping"):
        load_params(bad)


def test_cli_rejects_a_typo_with_exit_2_and_no_traceback(tmp_path):
    raw = tiny_raw()
    raw["latnt_dim"] = 512
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = run_cli("check-params", "--params", str(path))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"microfp: error: {path}: latnt_dim: unknown key (check the spelling; see params.yaml for the known keys)"]


def test_cli_check_params_writes_constant_marker(tmp_path):
    path = tmp_path / "params.yaml"
    marker = tmp_path / "ok"
    for latent in (8, 16):
        raw = tiny_raw()
        raw["latent_dim"] = latent
        path.write_text(yaml.safe_dump(raw))
        assert run_cli("check-params", "--params", str(path), "--out", str(marker)).returncode == 0
        assert marker.read_text() == "params valid\n"
