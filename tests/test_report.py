"""`microfp report`: the one-screen result, beside the paper and the no-learning baselines."""

from __future__ import annotations

import json

from conftest import run_cli, tiny_raw
import yaml

from microfp import runlog
from microfp.config import Params
from microfp.report import build_report, run_costs


def _write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def _metrics(root):
    _write(root / "reconstruction.json", {
        "val": {"phi4_mean": 0.0612, "phi4_std": 0.004, "disorientation_deg_mean": 28.4,
                "mean_field_disorientation_deg_mean": 40.7, "reference_disorientation_deg_mean": 40.6},
        "brass": {"phi4_mean": 0.02, "phi4_std": 0.001, "disorientation_deg_mean": 9.5},
    })
    _write(root / "latent.json", {"vae": {"n_components_90": 12, "texture_accuracy": 0.984, "texture_chance": 0.27},
                                  "twopoint": {"n_components_90": 33, "texture_accuracy": 1.0, "texture_chance": 0.27}})
    _write(root / "surrogate.json", {"vae": {"test_mae_mpa": 1.71, "test_mae_mpa_std": 0.9, "test_r2": 0.8,
                                             "vs_texture": {"mae_diff_mpa": -0.12, "mae_diff_ci95_lo": -0.31,
                                                                            "mae_diff_ci95_hi": 0.05}},
                                     "constant": {"test_mae_mpa": 3.2, "test_mae_mpa_std": 2.0},
                                     "data": {"n_test": 52}})
    _write(root / "simulate" / "hcp.json", {"n_converged": 255, "converged_fraction": 0.99609375,
                                            "final_stress_mpa_mean": 85.31, "final_stress_mpa_std": 3.8})
    _write(root / "train.json", {"epochs": 10, "global_step": 320})


def test_report_puts_each_number_beside_paper_and_baseline(tmp_path):
    _metrics(tmp_path)
    params = Params.model_validate({**tiny_raw(), "encoder": "resnet18"})
    text = build_report(params, tmp_path)
    val = next(line for line in text.splitlines() if line.startswith("| val "))
    assert "0.061 ± 0.004" in val and "0.031 ± 0.004" in val and "28.4" in val and "40.7" in val
    assert "| brass | 0.020 ± 0.001 | 0.044 ± 0.003 | 9.5 | – | – |" in text
    assert "| components for 90% variance | 12 | 33 |" in text
    assert "98.4%" in text and "96.5%" in text
    assert "1.71 ± 0.90" in text and "-0.12 [-0.31, +0.05]" in text and "constant (mean curve)" in text
    assert "255 (99.6%)" in text and "85.3 ± 3.8" in text
    assert "320 optimizer steps" in text
    assert len(text.splitlines()) < 60  # one screen


def test_headline_metrics_are_few_and_flat(tmp_path):
    from microfp.report import headline_metrics
    from microfp.tracking import flatten

    _metrics(tmp_path)
    flat = flatten(headline_metrics(tmp_path))
    assert flat["reconstruction.val.mean_field_disorientation_deg_mean"] == 40.7
    assert flat["surrogate.vae.vs_texture_mae_diff_ci95_lo"] == -0.31
    assert flat["simulate.hcp.final_stress_mpa_mean"] == 85.31
    assert flat["latent.vae.n_components_90"] == 12
    assert len(flat) < 60


def test_report_without_metrics_is_short_and_report_show_prints_run_costs(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_raw()))
    made = run_cli("report", "--metrics", "metrics", "--out", "report.md", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    assert (tmp_path / "report.md").read_text().startswith("# microfp report")
    runlog.record("generate@train", 12.5, tmp_path / ".microfp" / "runlog.jsonl")
    shown = run_cli("report", "--show", cwd=tmp_path)
    assert shown.returncode == 0 and "# microfp report" in shown.stdout
    assert "`generate@train`: 12.5 s" in shown.stdout
    assert f"CPU of the newest: {runlog.cpu_facts()['cpu']}" in shown.stdout
    assert "report" not in run_costs(tmp_path / ".microfp" / "runlog.jsonl").split("\n", 1)[1]
    assert "no stage ran here" in run_costs(tmp_path / "missing.jsonl")


def test_report_show_without_a_report_is_one_line(tmp_path):
    result = run_cli("report", "--show", "--out", "nothing.md", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == "microfp: error: nothing.md: no report yet (run `dvc repro` or `microfp report`)"


def test_cpu_facts_name_the_model_and_the_vector_extensions_onednn_picks_kernels_by(tmp_path):
    info = tmp_path / "cpuinfo"
    cpu = "model name\t: Some CPU @ 2.0GHz\nflags\t\t: fpu sse avx2 avx512f amx_tile\n"
    info.write_text("processor\t: 0\n" + cpu + "\nprocessor\t: 1\n" + cpu)
    assert runlog.cpu_facts(info) == {"cpu": "Some CPU @ 2.0GHz", "isa": ["avx2", "avx512f", "amx_tile"]}
    assert runlog.cpu_facts(tmp_path / "missing")["isa"] == []
    runlog.record("train", 1.0, tmp_path / "log.jsonl")
    entry = runlog.last_runs(tmp_path / "log.jsonl")["train"]
    assert entry["isa"] == runlog.cpu_facts()["isa"] and entry["cpu"] == runlog.cpu_facts()["cpu"]
