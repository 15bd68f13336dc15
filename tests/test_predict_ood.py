"""`microfp predict` reports how far each VE lies from the training VEs (OOD calibration embedded in
the surrogate checkpoint)."""

from __future__ import annotations

from microfp import ood, surrogate
from microfp.datasets import generate_set
from microfp.fingerprints import fingerprint

from conftest import run_cli
from test_surrogate import tiny_hcp  # noqa: F401 - fixture


def test_predict_reports_the_ood_percentile(tiny_hcp, tmp_path):  # noqa: F811 - fixture
    root, params = tiny_hcp["root"], tiny_hcp["params"]
    generate_set(params.model_copy(update={"seed": params.seed + 1}), "hcp", tmp_path / "ves" / "hcp_val", workers=1, progress=False)
    (tmp_path / "ves" / "hcp").symlink_to(root / "ves" / "hcp")
    ev = params.evaluate.model_copy(update={"sets": ["hcp", "hcp_val"]})
    fingerprint(params.model_copy(update={"evaluate": ev}), tiny_hcp["ckpt"], tmp_path / "ves", tmp_path / "fp",
                tmp_path / "fp2", ood_out=ood.default_path(tiny_hcp["ckpt"]), val_set="hcp_val")
    small = params.model_copy(update={"surrogate": params.surrogate.model_copy(update={"epochs": 2})})
    out = tmp_path / "s.ckpt"
    surrogate.run(small, "hcp", root / "fp", root / "fp2", root / "ves", root / "curves", tiny_hcp["ckpt"], out,
                  tmp_path / "m.json", tmp_path / "p")
    predictor = surrogate.Predictor.load(out)
    assert predictor.ood is not None and predictor.ood.meta["val_set"] == "hcp_val"
    shard = root / "ves" / "hcp" / "shard-00000.h5"
    result = run_cli("predict", str(shard), "--checkpoint", str(out), "--out", str(tmp_path / "c.csv"))
    assert result.returncode == 0, result.stderr
    assert list(predictor.ood.checks) == ["fingerprint", "microstructure"]
    fields = predictor.read_fields(shard)
    scores = predictor.ood.score(predictor.fingerprint(fields), fields)
    lines = [line for line in result.stderr.splitlines() if line.startswith("VE ")]
    assert len(lines) == len(scores["ood_flag"]) > 1
    for i, line in enumerate(lines):
        for check in ("fingerprint", "microstructure"):
            d, pct = scores[f"ood_{check}_distance"][i], scores[f"ood_{check}_percentile"][i]
            assert f"{check} distance {d:.3g} (percentile {pct:.0f})" in line, line
            assert (f"{check} check" in line) == bool(scores[f"ood_{check}_flag"][i]), line
        assert ("WARNING" in line) == bool(scores["ood_flag"][i])
    ood.default_path(tiny_hcp["ckpt"]).unlink()  # the fixture is shared: leave it as it was
