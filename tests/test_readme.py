"""The README a newcomer reads: the sections users are pointed to exist, every command it names
exists, every module of src/microfp is placed in its Layout."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

# Sections other files, issues and notes point users to (a lost section is a broken promise).
SECTIONS = [
    "## Quick start: two commands",
    "### The VAE",
    "### Crystal plasticity",
    "### DAMASK",
    "### Surrogate",
    "## Parameters and profiles",
    "### Reproducible to the bit",
    "### Paper scale",
    "## Your own microstructures",
    "## Share and compare",
    "## Tests and benchmarks",
    "## Layout",
]


def test_sections_are_there_in_order() -> None:
    positions = [README.find(f"\n{s}") for s in SECTIONS]
    missing = [s for s, p in zip(SECTIONS, positions) if p < 0]
    assert not missing, f"README lost sections: {missing}"
    assert positions == sorted(positions), "README sections out of order"


def test_every_named_command_exists() -> None:
    from conftest import microfp_click_group

    known = set(microfp_click_group().commands)
    named = set(re.findall(r"`microfp ([a-z][a-z-]*)", README))
    assert named, "README names no microfp command"
    assert not named - known, f"README names commands that do not exist: {sorted(named - known)}"


def test_layout_places_every_module() -> None:
    layout = README[README.index("\n## Layout"):]
    modules = sorted(p.stem for p in (ROOT / "src" / "microfp").glob("*.py") if p.stem != "__init__")
    missing = [m for m in modules if f"`{m}`" not in layout]
    assert not missing, f"README Layout does not name: {missing}"
