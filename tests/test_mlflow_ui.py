"""The MLflow UI, for real: a tiny pipeline logs to a real `mlflow server`, then headless Chromium
opens the training run's pages and we check what a person would look for.

- Model metrics tab: a chart for the training loss and for the evaluation metrics (validation
  loss, prompt adherence; plus the in-training evaluator's metrics when it is installed).
- Artifacts tab: the sample grid renders as an image.
- Overview: the training run's input dataset (the latents manifest) is listed.
Screenshots are kept under test-artifacts/mlflow_ui/ (LATENTFORGE_TEST_ARTIFACTS overrides).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

import pytest

from tests.harness.chromium import Chromium, find_chromium

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(os.environ.get("LATENTFORGE_TEST_ARTIFACTS", REPO / "test-artifacts")) / "mlflow_ui"
# Charts are drawn only when on screen: a tall window puts every section on screen at once.
WIDTH, HEIGHT = 1400, 6000


def _visit(browser: Chromium, url: str, name: str, ready_js: str, timeout_s: float = 240) -> str:
    """Open `url`, wait until `ready_js` holds, save DOM + screenshot as test artifacts."""
    page = browser.open(url)
    ready = page.wait_for(ready_js, timeout_s)
    dom = page.html()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / f"{name}.html").write_text(dom)
    page.screenshot(ARTIFACTS / f"{name}.png")
    assert ready, f"{url}: the page did not get ready in {timeout_s}s (see {ARTIFACTS / name}.png)"
    return dom


def test_training_run_page_shows_charts_grid_and_lineage(demo_smoke_run, mlflow_server, tmp_path) -> None:
    from mlflow.tracking import MlflowClient

    binary = find_chromium()
    if binary is None:
        pytest.skip("no Chromium found (`make install` installs Debian's chromium where apt-get is available)")
    summary = demo_smoke_run.summary
    experiment, run_id = summary["experiment_id"], summary["training_run_id"]
    assert run_id, "the demo's training run id is missing from its summary"
    client = MlflowClient(tracking_uri=mlflow_server.url)
    logged = set(client.get_run(run_id).data.metrics)
    evaluator = importlib.util.find_spec("latentforge.evaluation.in_training") is not None
    wanted = ["loss", "val/loss", "adherence_colour", *sorted(m for m in logged if m.startswith("eval/"))]
    assert set(wanted) <= logged, f"the training run lacks metrics: {set(wanted) - logged}"

    def files(path: str | None = None) -> list[str]:
        out = []
        for item in client.list_artifacts(run_id, path):
            out.extend(files(item.path) if item.is_dir else [item.path])
        return out

    grids = sorted(p for p in files() if p.endswith("grid.png"))
    if evaluator:
        assert any(re.match(r"eval/step_\d{6}/", p) for p in grids), f"no in-training eval grid in {grids}"
    assert grids, "the training run has no sample-grid artifact"
    grid = next((p for p in reversed(grids) if p.startswith("eval/")), grids[-1])

    base = f"{mlflow_server.url}/#/experiments/{experiment}/runs/{run_id}"
    with Chromium(binary, tmp_path / "chromium-profile", WIDTH, HEIGHT) as browser:
        # Model metrics: every wanted chart card is there, and every card has drawn its plot.
        titles_js = json.dumps(wanted)
        dom = _visit(browser, f"{base}/model-metrics", "model_metrics",
                     f"(() => {{ const t = [...document.querySelectorAll('h4[title]')].map(h => h.title);"
                     f" return {titles_js}.every(w => t.includes(w))"
                     f" && document.querySelectorAll('.main-svg').length >= t.length; }})()")
        titles = set(re.findall(r'<h4[^>]*title="([^"]+)"', dom))
        assert set(wanted) <= titles, f"charts missing: {set(wanted) - titles}"

        # Artifacts: the grid is rendered as an image (fetched from the server into a blob: URL).
        dom = _visit(browser, f"{base}/artifacts/{grid}", "artifact_grid",
                     f"!!document.querySelector('img[alt={json.dumps(grid)}][src^=\"blob:\"]')")
        assert re.search(rf'<img[^>]*alt="{re.escape(grid)}"[^>]*src="blob:', dom)

        # Overview: lineage, the latents manifest this run trained on, is listed as a dataset.
        dom = _visit(browser, base, "overview", "document.body.innerText.includes('latents')")
        assert "latents" in dom
