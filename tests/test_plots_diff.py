"""`dvc plots diff` of two git revisions, opened in headless Chromium: the generate stage's PNG plots
and a CSV plot (vega-lite) render for both revisions (DOM checks and a non-blank screenshot)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, make_stage_project, run_tool

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")

VEGA_DIR = Path(os.environ.get("MICROFP_VEGA_DIR", Path.home() / ".cache" / "microfp" / "vega"))
VEGA_BUNDLES = ("vega", "vega-lite", "vega-embed")
LOSS = "plots/ci/loss.csv"
SETS = {"train": {"n": 2}, "val": {"n": 1}}

# The page DVC renders, with the vega bundles loaded from local files instead of its CDN links, and
# a check that writes what rendered into the DOM (read back with --dump-dom).
TEMPLATE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>microfp plots diff</title>
{vega_scripts}
</head><body>
{{plot_divs}}
<pre id="microfp-check"></pre>
<script>
window.addEventListener("load", function () {{
  setTimeout(function () {{
    var imgs = Array.from(document.querySelectorAll("img"));
    var result = {{
      vega_loaded: typeof vegaEmbed === "function",
      images: imgs.length,
      images_loaded: imgs.filter(function (i) {{ return i.complete && i.naturalWidth > 0; }}).length,
      vega_views: document.querySelectorAll(".vega-embed canvas, .vega-embed svg.marks").length
    }};
    document.getElementById("microfp-check").textContent = JSON.stringify(result);
  }}, 1500);
}});
</script>
</body></html>
"""


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser() -> str:
    """Headless Chromium; installed by scripts/ci-services.sh (run here once if it is missing)."""
    if _chromium() is None or not all((VEGA_DIR / f"{b}.min.js").is_file() for b in VEGA_BUNDLES):
        subprocess.run(["bash", str(ROOT / "scripts" / "ci-services.sh")], capture_output=True, timeout=900)
    exe = _chromium()
    if exe is None:
        pytest.skip("chromium is not installed and scripts/ci-services.sh could not install it (needs root + apt)")
    return exe


@pytest.fixture(scope="module")
def diff_page(tmp_path_factory, browser) -> tuple[Path, dict, Path]:
    """Two revisions of the tiny pipeline (another seed and loss curve), their `dvc plots diff`
    rendered to HTML, then loaded in Chromium: (page, DOM check result, screenshot)."""
    base = tmp_path_factory.mktemp("plots")
    plots = list(yaml.safe_load((ROOT / "dvc.yaml").read_text()).get("plots") or [])
    plots.append({LOSS: {"x": "epoch", "y": "loss", "title": "loss"}})
    project = make_stage_project(base / "project", SETS, plots=plots)

    def revision(seed: int, losses: list[float], message: str) -> None:
        raw = yaml.safe_load((project / "params.yaml").read_text())
        raw["seed"] = seed
        (project / "params.yaml").write_text(yaml.safe_dump(raw))
        (project / LOSS).parent.mkdir(parents=True, exist_ok=True)
        (project / LOSS).write_text("epoch,loss\n" + "".join(f"{i},{v}\n" for i, v in enumerate(losses)))
        run_tool("dvc", "repro", cwd=project)
        run_tool("git", "add", "-A", cwd=project)
        run_tool("git", "commit", "-qm", message, cwd=project)

    revision(7, [1.0, 0.6, 0.4, 0.3], "baseline")
    revision(8, [0.9, 0.5, 0.3, 0.2, 0.15], "other seed")

    template = write_template(base)
    out = base / "diff"
    run_tool("dvc", "plots", "diff", "HEAD~1", "HEAD", "-o", str(out), "--html-template", str(template), cwd=project)
    page = out / "index.html"
    check, shot = open_in_chromium(browser, page, base)
    return page, check, shot


def write_template(base: Path) -> Path:
    """DVC's plots page template with the vega bundles loaded from local files and a DOM check."""
    vega = [VEGA_DIR / f"{b}.min.js" for b in VEGA_BUNDLES]
    scripts = "\n".join(f'<script src="{p.as_uri()}"></script>' for p in vega if p.is_file())
    template = base / "template.html"
    template.write_text(TEMPLATE.format(vega_scripts=scripts))
    return template


def open_in_chromium(browser: str, page: Path, base: Path) -> tuple[dict, Path]:
    """Load ``page`` in headless Chromium: (what rendered, from the page's DOM check; a screenshot)."""
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--hide-scrollbars", "--virtual-time-budget=10000", "--window-size=1400,2400",
    ]  # fmt: skip

    def chromium(*args: str, profile: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [browser, *flags, f"--user-data-dir={base / profile}", *args, page.as_uri()],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    dom = chromium("--dump-dom", profile="profile-dom")
    found = re.search(r'<pre id="microfp-check">(.*?)</pre>', dom.stdout, re.S)
    assert found and found.group(1), f"the page's check did not run:\n{dom.stdout[-2000:]}\n{dom.stderr[-2000:]}"
    shot = base / "diff.png"
    chromium(f"--screenshot={shot}", profile="profile-shot")
    assert shot.is_file(), "chromium wrote no screenshot"
    return json.loads(found.group(1)), shot


def test_plots_diff_page_shows_both_revisions_images(diff_page):
    page, check, _ = diff_page
    html = page.read_text()
    # one image per revision of each generate plot, served from the page's static folder
    srcs = re.findall(r'<img src="([^"]+)"', html)
    expected = sorted(f"static/{rev}_plots_ves_{name}.png" for rev in ("HEAD~1", "HEAD") for name in SETS)
    assert sorted(srcs) == expected and all((page.parent / s).is_file() for s in srcs), srcs
    assert check["images"] == check["images_loaded"] == len(expected), check  # all loaded in the browser


def test_plots_diff_screenshot_is_not_blank(diff_page):
    import numpy as np
    from PIL import Image

    _, _, shot = diff_page
    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3)
    coloured = int((pixels.min(axis=1) < 235).sum())
    assert coloured / len(pixels) > 0.05, f"only {coloured} of {len(pixels)} pixels are not white"
    assert len(np.unique(pixels, axis=0)) > 50  # plots, not a flat page


def test_plots_diff_vega_plot_renders(diff_page):
    page, check, _ = diff_page
    if not check["vega_loaded"]:
        pytest.skip(f"vega bundles not in {VEGA_DIR} (scripts/ci-services.sh fetches them with npm)")
    html = page.read_text()
    assert "plots_ci_loss_csv" in html.replace("/", "_").replace(".", "_")
    assert '"rev": "HEAD~1"' in html and '"rev": "HEAD"' in html  # both revisions' data in the spec
    assert check["vega_views"] >= 1, check
