"""The `microfp` modules each DVC stage's command can load, checked against or written to dvc.yaml.

A stage whose code changed must rerun: `dvc status` can only know if dvc.yaml lists every module the
stage's command loads. For each stage the modules are found in two steps:

1. a fresh interpreter starts the command as `microfp <command>` does (the CLI registers it) and
   reports the `microfp` modules then in `sys.modules`;
2. the imports written inside functions (loaded only when the code runs) are followed from there,
   through the source (AST) of every module found, until nothing new turns up. `cli.py` holds
   several commands, so only its module-level imports and the stage's own command count.

    python scripts/stage_deps.py           # print what each stage misses (exit 1 if any)
    python scripts/stage_deps.py --write   # rewrite the src/microfp deps of every stage in dvc.yaml

tests/test_stage_deps.py fails when a stage misses one.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from functools import cache
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
DVC_YAML = ROOT / "dvc.yaml"
ENTRY = "microfp.cli"

_PROBE = """
import json, sys
from microfp import cli
cli._register_lazy_commands([sys.argv[1]])
command = next(c for c in cli.app.registered_commands if (c.name or c.callback.__name__) == sys.argv[1])
loaded = sorted(m for m in sys.modules if m == "microfp" or m.startswith("microfp."))
print(json.dumps({"loaded": loaded, "module": command.callback.__module__, "function": command.callback.__name__}))
"""


def _stage_bodies(dvc_yaml: Path) -> dict[str, dict]:
    """``{stage: body}`` of dvc.yaml; a ``foreach`` stage by its ``do`` body."""
    stages = yaml.safe_load(dvc_yaml.read_text())["stages"]
    return {name: body.get("do") or body for name, body in stages.items()}


def stage_commands(dvc_yaml: Path = DVC_YAML) -> dict[str, str]:
    """``{stage: microfp command}`` of every stage in dvc.yaml."""
    commands = {}
    for name, body in _stage_bodies(dvc_yaml).items():
        words = body["cmd"].split()
        commands[name] = words[words.index("microfp") + 1]
    return commands


def declared_modules(stage: str, dvc_yaml: Path = DVC_YAML) -> set[str]:
    """Modules of ``src/microfp`` that dvc.yaml lists as deps of ``stage``."""
    deps = _stage_bodies(dvc_yaml)[stage].get("deps", [])
    return {module_of(str(d)) for d in deps if str(d).startswith("src/microfp/") and str(d).endswith(".py")}


def module_of(path: str) -> str:
    """``src/microfp/x.py`` -> ``microfp.x``; ``src/microfp/__init__.py`` -> ``microfp``."""
    parts = Path(path).relative_to("src").with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def path_of(module: str) -> str:
    """``microfp.x`` -> ``src/microfp/x.py`` (relative to the repository)."""
    package = Path("src", *module.split("."))
    return str(package / "__init__.py" if (ROOT / package).is_dir() else package.with_suffix(".py"))


def _microfp_imports(nodes: list[ast.AST], module: str) -> set[str]:
    """`microfp` modules imported anywhere inside ``nodes`` (``from microfp import x`` -> microfp.x)."""
    found = set()
    for node in (n for top in nodes for n in ast.walk(top)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "microfp"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "microfp":
            found.add(node.module)
            package = SRC.joinpath(*node.module.split("."))
            found |= {f"{node.module}.{a.name}" for a in node.names if (package / f"{a.name}.py").exists()}
    return {m for m in found if m != module}


@cache
def _tree(module: str) -> ast.Module:
    return ast.parse((ROOT / path_of(module)).read_text())


def _function(module: str, name: str) -> ast.FunctionDef:
    return next(n for n in _tree(module).body if isinstance(n, ast.FunctionDef) and n.name == name)


@cache
def command_modules(command: str) -> frozenset[str]:
    """Every `microfp` module that ``microfp <command>`` can load (see the module docstring)."""
    probe = subprocess.run(
        [sys.executable, "-c", _PROBE, command], capture_output=True, text=True, check=True, cwd=ROOT, timeout=300
    )
    info = json.loads(probe.stdout.strip().splitlines()[-1])
    modules, todo = set(info["loaded"]), list(info["loaded"])
    if info["module"] == ENTRY:  # a command written in cli.py: its own function-level imports
        todo += sorted(_microfp_imports([_function(ENTRY, info["function"])], ENTRY))
    while todo:
        module = todo.pop()
        modules.add(module)
        tree = _tree(module)
        scope = [n for n in tree.body if not isinstance(n, (ast.FunctionDef, ast.ClassDef))] if module == ENTRY else [tree]
        todo += sorted(_microfp_imports(scope, module) - modules)
    return frozenset(modules)


def missing_modules(stage: str, dvc_yaml: Path = DVC_YAML) -> set[str]:
    """Modules ``stage``'s command can load that ``dvc_yaml`` does not list as its deps."""
    return set(command_modules(stage_commands(dvc_yaml)[stage])) - declared_modules(stage, dvc_yaml)


def write_deps(dvc_yaml: Path = DVC_YAML) -> None:
    """Replace the ``src/microfp`` deps of every stage by the modules its command loads (sorted,
    after the stage's other deps); comments and layout of dvc.yaml are kept."""
    from ruamel.yaml import YAML

    rt = YAML()
    rt.preserve_quotes = True
    rt.width = 120
    rt.indent(mapping=2, sequence=4, offset=2)
    doc = rt.load(dvc_yaml.read_text())
    commands = stage_commands(dvc_yaml)
    for name, body in doc["stages"].items():
        body = body.get("do") or body
        deps = body.setdefault("deps", [])
        keep = [d for d in deps if not str(d).startswith("src/microfp/")]
        deps[:] = keep + sorted(path_of(m) for m in command_modules(commands[name]))
    with open(dvc_yaml, "w") as f:
        rt.dump(doc, f)


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        write_deps()
    gaps = {stage: missing_modules(stage) for stage in sorted(stage_commands())}
    for stage, missing in gaps.items():
        print(f"{stage}: " + (", ".join(sorted(path_of(m) for m in missing)) or "complete"))
    sys.exit(1 if any(gaps.values()) else 0)
