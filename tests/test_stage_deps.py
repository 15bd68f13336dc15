"""Every DVC stage depends on each `microfp` module its command can load (scripts/stage_deps.py)."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from conftest import ROOT

_spec = importlib.util.spec_from_file_location("stage_deps", ROOT / "scripts" / "stage_deps.py")
stage_deps = importlib.util.module_from_spec(_spec)
sys.modules["stage_deps"] = stage_deps
_spec.loader.exec_module(stage_deps)


@pytest.mark.parametrize("stage", sorted(stage_deps.stage_commands()))
def test_stage_lists_every_module_its_command_loads(stage):
    missing = stage_deps.missing_modules(stage)
    assert not missing, (
        f"dvc.yaml stage {stage!r} misses deps (run `python scripts/stage_deps.py --write`): "
        + ", ".join(sorted(stage_deps.path_of(m) for m in missing))
    )


def test_the_check_sees_function_level_imports_and_a_removed_dep(tmp_path):
    """`generate` imports microfp.datasets only inside its command function; a dvc.yaml without
    that dep is reported, by stage and module."""
    assert "microfp.datasets" in stage_deps.command_modules("generate")
    stripped = tmp_path / "dvc.yaml"
    lines = (ROOT / "dvc.yaml").read_text().splitlines(keepends=True)
    stripped.write_text("".join(line for line in lines if line.strip() != "- src/microfp/datasets.py"))
    assert stage_deps.missing_modules("generate", stripped) == {"microfp.datasets"}
    assert "microfp.datasets" in stage_deps.missing_modules("datasets-summary", stripped)
