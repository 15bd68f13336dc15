"""One-screen result of a pipeline run, beside the paper and the baselines (``report`` stage).

    metrics/*.json -> report.md            (a DVC output; git keeps it, so a pull request shows it)
                   -> metrics/summary.json  (the headline numbers: the one file dvc.yaml declares as metrics)

Every model number stands beside the paper's number and the level a model reaches without
learning anything from its input: for reconstructions the set's mean field (the best constant
field) and another VE of the set, for fingerprints the 2-point baseline, for the surrogate the
texture-only fingerprint and the constant (mean-curve) predictor. The cost is given in units that do
not change from run to run (VEs, optimizer steps, CP increments); wall-clock times are not tracked
(they would break bit-for-bit `dvc repro`), and `microfp report --show` prints them from the run
log (:mod:`microfp.runlog`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from microfp import runlog
from microfp.atomic import write_json, write_text
from microfp.config import Params, load_params
from microfp.errors import MicrofpError

# Paper values (mean misorientation phi4 = 1 - |q1.q2|, eq. 5; |z| = 256, 100 VEs per edge case).
PAPER_PHI4_TABLE4: dict[str, dict[str, str]] = {  # by encoder: train / test (val)
    "resnet12": {"train": "0.070 ± 0.006", "val": "0.070 ± 0.006"},
    "resnet18": {"train": "0.029 ± 0.003", "val": "0.031 ± 0.004"},
    "resnet34": {"train": "0.075 ± 0.004", "val": "0.075 ± 0.004"},
}
PAPER_PHI4_EDGE: dict[str, str] = {  # Table 5 (morphology) and Table 6 (texture)
    "large": "0.033 ± 0.010",
    "small": "0.063 ± 0.001",
    "elongated": "0.036 ± 0.009",
    "small_mixed": "0.061 ± 0.001 (retrained)",
    "brass": "0.044 ± 0.003",
    "copper": "0.061 ± 0.003",
    "cube": "0.029 ± 0.003",
    "goss": "0.032 ± 0.004",
}
PAPER_CLUSTERING: dict[str, str] = {"texture": "96.5%", "morphology_large_elongated": "53%"}
PAPER_SURROGATE_MAE = "2.75 ± 0.46"


def _read(path: Path) -> dict[str, Any]:
    """A metrics JSON as a dict; ``{}`` when the stage that writes it is not part of the run."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError) as err:
        raise MicrofpError(f"{path}: cannot read metrics ({err})") from None


def _num(value: Any, fmt: str) -> str:
    """``value`` formatted with ``fmt``, or an en dash when it is missing or not a number."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "–"
    return "–" if v != v else format(v, fmt)


def _pm(d: dict[str, Any], mean: str, std: str, fmt: str) -> str:
    """``mean ± std`` of two keys of ``d``."""
    m = _num(d.get(mean), fmt)
    s = _num(d.get(std), fmt)
    return m if s == "–" or m == "–" else f"{m} ± {s}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def reconstruction_section(params: Params, rec: dict[str, Any]) -> list[str]:
    """Tables 4-6: phi4 and disorientation per set, beside the paper and the no-learning levels."""
    if not rec:
        return []
    paper = {**PAPER_PHI4_TABLE4.get(params.encoder, {}), **PAPER_PHI4_EDGE}
    # Sets in the order params.yaml lists them (training, morphology, texture edge cases: the
    # paper's order), the metrics file's (alphabetical) order for any other.
    order = list(params.evaluate.sets or params.generate.sets)
    rows = []
    for name, m in sorted(rec.items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order else len(order), kv[0])):
        if not isinstance(m, dict) or "phi4_mean" not in m:
            continue
        rows.append([
            name,
            _pm(m, "phi4_mean", "phi4_std", ".3f"),
            paper.get(name, "–"),
            _num(m.get("disorientation_deg_mean"), ".1f"),
            _num(m.get("mean_field_disorientation_deg_mean"), ".1f"),
            _num(m.get("reference_disorientation_deg_mean"), ".1f"),
        ])
    header = ["set", "phi4", "paper phi4", "disorientation (deg)", "set's mean field (deg)", "another VE (deg)"]
    return [
        "## Reconstruction (paper Tables 4-6)",
        "",
        *_table(header, rows),
        "",
        "phi4 = 1 - |q1.q2| per voxel, mean per VE, then mean ± std over the set (eq. 5). A model that "
        "ignores its input scores the set's mean field at best; one that knows only the texture scores "
        "another VE of the set.",
        "",
    ]


def latent_section(lat: dict[str, Any]) -> list[str]:
    """Components for 90% variance and clustering accuracies, VAE beside the 2-point baseline."""
    methods = [m for m in ("vae", "twopoint") if isinstance(lat.get(m), dict)]
    if not methods:
        return []
    groups = sorted({k[: -len("_accuracy")] for m in methods for k in lat[m] if k.endswith("_accuracy")})
    rows = [["components for 90% variance", *(_num(lat[m].get("n_components_90"), ".0f") for m in methods), "~200 of 256"]]
    for g in groups:
        chance = _num(lat[methods[0]].get(f"{g}_chance"), ".0%")
        rows.append([f"{g} clustering (chance {chance})",
                     *(_num(lat[m].get(f"{g}_accuracy"), ".1%") for m in methods), PAPER_CLUSTERING.get(g, "–")])
    names = {"vae": "VAE", "twopoint": "2-point baseline"}
    return ["## Latent space (paper 3.3)", "", *_table(["measure", *(names[m] for m in methods), "paper"], rows), ""]


def surrogate_section(sur: dict[str, Any]) -> list[str]:
    """Test error of the surrogate for each fingerprint, the constant predictor and the paper."""
    kinds = [k for k in ("vae", "twopoint", "texture", "constant") if isinstance(sur.get(k), dict)]
    if not kinds:
        return []
    names = {"vae": "VAE fingerprint", "twopoint": "2-point fingerprint", "texture": "texture only",
             "constant": "constant (mean curve)"}
    rows = []
    for k in kinds:
        m = sur[k]
        vs = m.get("vs_texture") if isinstance(m.get("vs_texture"), dict) else {}
        ci = (f"{_num(vs.get('mae_diff_mpa'), '+.2f')} [{_num(vs.get('mae_diff_ci95_lo'), '+.2f')}, "
              f"{_num(vs.get('mae_diff_ci95_hi'), '+.2f')}]" if vs else "–")
        rows.append([names[k], _pm(m, "test_mae_mpa", "test_mae_mpa_std", ".2f"), _num(m.get("test_r2"), ".3f"), ci])
    data = sur.get("data", {})
    n_test = _num(data.get("n_test"), ".0f")
    return [
        "## Surrogate: fingerprint -> stress-strain curve (paper 2.4)",
        "",
        *_table(["input", "test MAE (MPa)", "R²", "MAE − texture-only MAE [95% CI]"], rows),
        "",
        f"{n_test} test VEs; a negative difference whose interval excludes 0 means the fingerprint "
        f"beats the texture-only descriptor. Paper: {PAPER_SURROGATE_MAE} MPa on 8.4k test VEs.",
        "",
    ]


def simulate_section(sims: dict[str, dict[str, Any]]) -> list[str]:
    """Convergence and sigma_xx at the final strain of each simulated set."""
    rows = []
    for name, m in sorted(sims.items()):
        rows.append([
            name,
            f"{_num(m.get('n_converged'), '.0f')} ({_num(m.get('converged_fraction'), '.1%')})",
            _pm(m, "final_stress_mpa_mean", "final_stress_mpa_std", ".1f"),
        ])
    if not rows:
        return []
    return ["## Crystal plasticity (paper 2.3)", "",
            *_table(["set", "converged", "sigma_xx at final strain (MPa)"], rows), ""]


def cost_section(params: Params, train: dict[str, dict[str, Any]], datasets: dict[str, Any]) -> list[str]:
    """What the run computed, in units that are the same on every run of the same commit."""
    n_ves = sum(int(s.get("n_ves", 0)) for s in datasets.values() if isinstance(s, dict))
    lines = ["## What the run computed", ""]
    if n_ves:
        lines.append(f"- {n_ves} VEs of {params.ve_size}^3 generated in {len(datasets)} sets")
    for name, m in train.items():
        if m:
            steps = _num(m.get("global_step", m.get("steps")), ".0f")
            lines.append(f"- {name}: {_num(m.get('epochs'), '.0f')} epochs, {steps} optimizer steps, "
                         f"{params.encoder}, latent {params.latent_dim}")
    lines += ["", "Wall-clock times are not part of this file (they differ from run to run): "
              "`microfp report --show` prints those of the last run.", ""]
    return lines


TEXTURES = ("brass", "copper", "cube", "goss")


def _pick(d: dict[str, Any], *keys: str) -> dict[str, float]:
    """The numeric ``keys`` of ``d`` that are present."""
    return {k: float(d[k]) for k in keys if isinstance(d.get(k), (int, float))}


def headline_metrics(metrics_dir: Path) -> dict[str, Any]:
    """The few dozen numbers `dvc metrics diff` and `dvc exp show` compare (``metrics/summary.json``).

    Per-set, per-increment and per-VE detail stays in the stage files (metrics/reconstruction.json,
    ...), which are plain outputs: `dvc metrics show metrics/reconstruction.json` still shows them.
    """
    rec = _read(metrics_dir / "reconstruction.json")
    out: dict[str, Any] = {}
    recon = {name: _pick(rec[name], "phi4_mean", "disorientation_deg_mean", "mean_field_disorientation_deg_mean")
             for name in ("val", "large", "small", "elongated", *TEXTURES) if isinstance(rec.get(name), dict)}
    textured = [recon[t]["disorientation_deg_mean"] for t in TEXTURES if "disorientation_deg_mean" in recon.get(t, {})]
    if len(textured) == len(TEXTURES):
        recon["textured_disorientation_deg_mean"] = sum(textured) / len(textured)
    if recon:
        out["reconstruction"] = recon
    lat = _read(metrics_dir / "latent.json")
    latent = {m: _pick(lat[m], "n_components_90", "texture_accuracy", "morphology_accuracy",
                       "morphology_large_elongated_accuracy")
              for m in ("vae", "twopoint") if isinstance(lat.get(m), dict)}
    if latent:
        out["latent"] = latent
    sur = _read(metrics_dir / "surrogate.json")
    surrogate = {k: _pick(sur[k], "test_mae_mpa", "test_mae_mpa_std")
                 for k in ("vae", "twopoint", "texture", "constant") if isinstance(sur.get(k), dict)}
    for k, m in surrogate.items():
        if isinstance(sur[k].get("vs_texture"), dict):
            m.update({f"vs_texture_{key}": v for key, v in
                      _pick(sur[k]["vs_texture"], "mae_diff_mpa", "mae_diff_ci95_lo", "mae_diff_ci95_hi").items()})
    if surrogate:
        out["surrogate"] = surrogate
    sims = {p.stem: _pick(_read(p), "converged_fraction", "final_stress_mpa_mean", "final_stress_mpa_std")
            for p in sorted((metrics_dir / "simulate").glob("*.json"))}
    if sims:
        out["simulate"] = sims
    train = {name: _pick(_read(metrics_dir / f"{name}.json"), "val_loss_best", "val_recon")
             for name in ("train", "train_hcp")}
    if any(train.values()):
        out["train"] = train
    return out


def build_report(params: Params, metrics_dir: Path) -> str:
    """The Markdown report of the metrics under ``metrics_dir``."""
    sims = {p.stem: _read(p) for p in sorted((metrics_dir / "simulate").glob("*.json"))}
    train = {"cubic VAE": _read(metrics_dir / "train.json"), "hexagonal VAE": _read(metrics_dir / "train_hcp.json")}
    sections = [
        f"# microfp report: {params.encoder}, |z| = {params.latent_dim}, VEs of {params.ve_size}^3 "
        f"at {params.resolution:g} units/voxel",
        "",
        *reconstruction_section(params, _read(metrics_dir / "reconstruction.json")),
        *latent_section(_read(metrics_dir / "latent.json")),
        *surrogate_section(_read(metrics_dir / "surrogate.json")),
        *simulate_section(sims),
        *cost_section(params, train, _read(metrics_dir / "datasets.json")),
    ]
    return "\n".join(sections).rstrip() + "\n"


def run_costs(log: Path = runlog.RUNLOG) -> str:
    """The wall-clock time of the last run of each stage command, from the run log."""
    runs = runlog.last_runs(log)
    stages = {k: v for k, v in runs.items() if k not in ("report", "check-params")}
    if not stages:
        return "No run log on this machine (.microfp/runlog.jsonl): no stage ran here.\n"
    lines = ["## Wall-clock time of the last run of each stage (this machine, not tracked)", ""]
    newest = max(stages.values(), key=lambda e: str(e.get("finished", "")))
    if "cpu" in newest:  # entries before 2026-12-03 have no CPU facts
        lines[1:1] = ["", f"CPU of the newest: {newest['cpu']}; vector extensions: {' '.join(newest.get('isa', [])) or 'none listed'}"]
    total = 0.0
    for stage, entry in stages.items():
        seconds = float(entry["seconds"])
        total += seconds
        lines.append(f"- `{stage}`: {seconds:.1f} s ({entry.get('cores', '?')} cores, {entry.get('finished', '')})")
    lines.append(f"- all of them: {total / 60:.1f} min")
    return "\n".join(lines) + "\n"


def report_command(
    params: Annotated[Path, typer.Option("--params", "-p", help="parameter file (params.yaml or configs/paper.yaml)")] = Path("params.yaml"),
    metrics: Annotated[Path, typer.Option(help="directory of the metrics JSON files the stages wrote")] = Path("metrics"),
    out: Annotated[Path, typer.Option(help="the Markdown report to write")] = Path("report.md"),
    summary: Annotated[Optional[Path], typer.Option(help="headline metrics JSON (the file dvc.yaml declares as metrics)")] = None,
    show: Annotated[bool, typer.Option("--show", help="print the existing report and the run's wall-clock times; write nothing")] = False,
) -> None:
    """Write report.md, the run's result on one screen, and print it (and with --summary the
    headline metrics that `dvc metrics diff` and `dvc exp show` compare).

    Reconstruction phi4 and disorientation per set (paper Tables 4-6), components for 90% of the
    fingerprint variance and clustering accuracies, surrogate errors per fingerprint, CP convergence
    and sigma_xx at the final strain: each beside the paper's number and the level of a model that
    learns nothing (the set's mean field, the 2-point baseline, texture-only and constant
    predictors). With --show, prints report.md and the wall-clock time of each stage's last run.
    """
    if show:
        try:
            text = out.read_text()
        except OSError:
            raise MicrofpError(f"{out}: no report yet (run `dvc repro` or `microfp report`)") from None
        typer.echo(text + "\n" + run_costs())
        return
    text = build_report(load_params(params), metrics)
    if summary is not None:
        write_json(summary, headline_metrics(metrics))
    write_text(out, text)
    typer.echo(text)
