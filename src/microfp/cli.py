"""``microfp``: the command line, one command per DVC stage.

Every stage of ``dvc.yaml`` runs one of these commands with explicit paths; each reads its
parameters from ``params.yaml`` (validated, see :mod:`microfp.config`). Bad input of any kind ends
with a one-line ``microfp: error: ...`` on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
import warnings
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from microfp import runlog
from microfp.console import setup_logging
from microfp.errors import MicrofpError

app = typer.Typer(
    name="microfp",
    help=(
        "Fingerprint 3D microstructure volume elements (VEs) with a 3D ResNet VAE and predict their "
        "crystal-plasticity response. Each command is one DVC stage; `dvc repro` runs them all."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
import_app = typer.Typer(help="Import VEs from Dream3D or DAMASK files into a microfp shard.", no_args_is_help=True)
export_app = typer.Typer(help="Export a VE of a microfp shard to Dream3D or DAMASK files.", no_args_is_help=True)
app.add_typer(import_app, name="import")
app.add_typer(export_app, name="export")

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="Parameter file (params.yaml or configs/paper.yaml).")]


class Crystal(str, Enum):
    cubic = "cubic"
    hexagonal = "hexagonal"


@app.command("check-params")
def check_params(
    params: ParamsOpt = Path("params.yaml"),
    out: Annotated[Optional[Path], typer.Option(help="Write a marker file when valid (for DVC ordering).")] = None,
) -> None:
    """Validate the parameter file: unknown keys, wrong types and out-of-range values are errors."""
    from microfp.atomic import write_text
    from microfp.config import load_params

    p = load_params(params)
    if out is not None:
        # Constant content: stages that depend on it rerun only because of their own params.
        write_text(out, "params valid\n")
    typer.echo(f"{params}: valid ({len(p.generate.sets)} sets, {p.encoder}, latent_dim={p.latent_dim})")


@app.command()
def generate(
    set_name: Annotated[str, typer.Argument(metavar="SET", help="Set to build, a key of generate.sets (e.g. train).")],
    params: ParamsOpt = Path("params.yaml"),
    out: Annotated[Optional[Path], typer.Option(help="Shard directory (default: data/ves/SET).")] = None,
    metrics: Annotated[Optional[Path], typer.Option(help="Statistics JSON (default: metrics/datasets/SET.json).")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="Mid-slice PNG (default: plots/ves/SET.png).")] = None,
    workers: Annotated[Optional[int], typer.Option(help="Processes (default: generate.workers; 0 = all cores).")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Generate one set of periodic grain-structure VEs as HDF5 shards.

    Grains come from a periodic power (Laguerre) tessellation whose cell volumes follow the
    set's log-normal ESD distribution (paper Table 1); orientations are uniform on SO(3) or a
    named texture (Table 2), reduced to the cubic or hexagonal fundamental zone with damask.
    Shards that already exist with the same parameters are kept, so a killed run resumes.
    Also writes the set's measured statistics (ESD, grains per face, texture) and a plot.
    """
    from microfp import datasets
    from microfp.config import load_params

    p = load_params(params)
    out = out or Path("data/ves") / set_name
    made = datasets.generate_set(p, set_name, out, p.generate.workers if workers is None else workers, progress)
    stats = datasets.write_set_report(
        p,
        set_name,
        out,
        metrics or Path("metrics/datasets") / f"{set_name}.json",
        plot or Path("plots/ves") / f"{set_name}.png",
    )
    typer.echo(
        f"{set_name}: {stats['n_ves']} VEs ({made} new) in {out}; mean ESD {stats['esd_mean']:.2f} "
        f"(target {stats['esd_target']:.2f}), {stats['grains_per_face']:.1f} grains per face"
    )


@app.command("datasets-summary")
def datasets_summary(
    stats_dir: Annotated[Path, typer.Option(help="Directory of per-set statistics JSON files.")] = Path("metrics/datasets"),
    out: Annotated[Path, typer.Option(help="Merged metrics file.")] = Path("metrics/datasets.json"),
) -> None:
    """Merge the per-set statistics of `generate` into one metrics file (for `dvc metrics show`)."""
    from microfp import datasets

    paths = sorted(stats_dir.glob("*.json"))
    if not paths:
        raise MicrofpError(f"{stats_dir}: no set statistics found (run `microfp generate SET` first)")
    merged = datasets.merge_set_metrics(paths, out)
    typer.echo(f"{out}: statistics of {len(merged)} sets")


@import_app.command("dream3d")
def import_dream3d(
    file: Annotated[Path, typer.Argument(help="A .dream3d file (HDF5 with FeatureIds and EulerAngles).")],
    out: Annotated[Path, typer.Option(help="Shard file to write (.h5).")],
    crystal: Annotated[Optional[Crystal], typer.Option(help="Crystal family (default: from the file, else cubic).")] = None,
    resolution: Annotated[Optional[float], typer.Option(help="Length units per voxel (default: the file's spacing).")] = None,
) -> None:
    """Import a Dream3D VE into a one-VE shard (orientations reduced to the fundamental zone)."""
    from microfp import formats, shards

    ves = formats.read_dream3d(file, crystal=crystal.value if crystal else None, resolution=resolution)
    shards.write_shard(out, ves)
    typer.echo(f"{out}: {ves.ve_size}^3 VE with {int(ves.n_grains[0])} grains ({ves.crystal})")


@import_app.command("damask")
def import_damask(
    file: Annotated[Path, typer.Argument(help="A DAMASK grid (.vti) whose material ids index material.yaml.")],
    out: Annotated[Path, typer.Option(help="Shard file to write (.h5).")],
    material: Annotated[Optional[Path], typer.Option(help="material.yaml (default: next to the .vti).")] = None,
    crystal: Annotated[Optional[Crystal], typer.Option(help="Crystal family (default: from the phase lattice).")] = None,
) -> None:
    """Import a DAMASK grid and its material configuration into a one-VE shard."""
    from microfp import formats, shards

    ves = formats.read_damask(file, material_path=material, crystal=crystal.value if crystal else None)
    shards.write_shard(out, ves)
    typer.echo(f"{out}: {ves.ve_size}^3 VE with {int(ves.n_grains[0])} grains ({ves.crystal})")


ShardArg = Annotated[Path, typer.Argument(help="A microfp shard (.h5).")]
IndexOpt = Annotated[int, typer.Option(help="Which VE of the shard (0-based).")]


@export_app.command("damask")
def export_damask(
    shard: ShardArg,
    out: Annotated[Path, typer.Option(help="Directory for <name>.vti and material.yaml.")],
    index: IndexOpt = 0,
) -> None:
    """Export one VE as a DAMASK grid (.vti) plus material.yaml, ready for DAMASK_grid."""
    from microfp import formats, shards

    written = formats.write_damask(out, _pick(shards.read_shard(shard), index, shard), index=0)
    typer.echo(f"wrote {written}")


@export_app.command("dream3d")
def export_dream3d(
    shard: ShardArg,
    out: Annotated[Path, typer.Option(help="The .dream3d file to write.")],
    index: IndexOpt = 0,
) -> None:
    """Export one VE as a Dream3D (SIMPL HDF5) file."""
    from microfp import formats, shards

    formats.write_dream3d(out, _pick(shards.read_shard(shard), index, shard), index=0)
    typer.echo(f"wrote {out}")


def _pick(ves, index: int, source: Path):  # noqa: ANN001, ANN202 - VESet in, VESet out
    """The one-VE VESet of VE ``index`` of ``ves``."""
    if not 0 <= index < len(ves):
        raise MicrofpError(f"{source}: has {len(ves)} VEs, no index {index}")
    return ves.select(index)


# Stages whose modules import torch, Lightning or Dask (seconds of start-up): their commands are
# registered only when they are the command being run, or when the command list is shown.
LAZY_COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("microfp.train", "train_command"),
    "evaluate": ("microfp.evaluate", "evaluate_command"),
    "fingerprint": ("microfp.fingerprints", "fingerprint_command"),
    "fingerprint-volume": ("microfp.volume_fingerprints", "fingerprint_volume_command"),
    "analyse": ("microfp.analysis", "analyse_command"),
    "simulate": ("microfp.simulate", "simulate_command"),
    "surrogate": ("microfp.surrogate", "surrogate_command"),
    "predict": ("microfp.surrogate", "predict_command"),
    "release": ("microfp.release", "release_command"),
    "pull": ("microfp.release", "pull_command"),
    "report": ("microfp.report", "report_command"),
}


def _register_lazy_commands(argv: list[str]) -> None:
    words = [a for a in argv if not a.startswith("-")]
    for name, (module, function) in LAZY_COMMANDS.items():
        if not words or words[0] == name:
            app.command(name)(getattr(importlib.import_module(module), function))


# Deprecation notices of the libraries (torch, Lightning, pandas, ...) are for their developers, not
# for a user reading a stage log; the test suite still sees them.
QUIET_CATEGORIES = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)


def quiet_third_party_warnings() -> None:
    """Silence deprecation warnings in this process and in the processes it starts (Dask workers)."""
    for category in QUIET_CATEGORIES:
        warnings.simplefilter("ignore", category)
    os.environ.setdefault("PYTHONWARNINGS", ",".join(f"ignore::{c.__name__}" for c in QUIET_CATEGORIES))


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app; print bad input as one line and return exit code 2."""
    argv = sys.argv[1:] if argv is None else argv
    quiet_third_party_warnings()
    setup_logging()
    _register_lazy_commands(argv)
    started = time.perf_counter()
    try:
        app(args=argv, standalone_mode=False, prog_name="microfp")
        if stage := os.environ.get("DVC_STAGE"):  # a stage of `dvc repro`: its wall time, untracked
            runlog.record(stage, time.perf_counter() - started, Path(os.environ.get("DVC_ROOT", ".")) / runlog.RUNLOG)
    except typer.Exit as err:
        return err.exit_code
    except (typer.Abort, KeyboardInterrupt):
        print("microfp: interrupted", file=sys.stderr)
        return 130
    except MicrofpError as err:
        print(f"microfp: error: {err}", file=sys.stderr)
        return 2
    except typer.TyperException as err:  # usage errors (unknown option, bad value): exit 2
        err.show()
        return getattr(err, "exit_code", 2)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
