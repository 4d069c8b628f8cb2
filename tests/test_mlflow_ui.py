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
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(os.environ.get("LATENTFORGE_TEST_ARTIFACTS", REPO / "test-artifacts")) / "mlflow_ui"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
    "--hide-scrollbars", "--window-size=1400,1600",
    # Virtual time lets the single-page app fetch and render before the DOM is dumped.
    "--virtual-time-budget=30000",
]


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no Chromium found (`make install` installs Debian's chromium where apt-get is available)")


def _browse(url: str, profile: Path, action: list[str]) -> str:
    proc = subprocess.run([_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *action, url],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _page(url: str, tmp_path: Path, name: str, needles: list[str], attempts: int = 3) -> str:
    """The rendered DOM of `url` (retried: the app renders charts lazily) plus a screenshot."""
    dom = ""
    for attempt in range(attempts):
        dom = _browse(url, tmp_path / f"profile-{name}-{attempt}", ["--dump-dom"])
        if all(n in dom for n in needles):
            break
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    _browse(url, tmp_path / f"profile-{name}-shot", [f"--screenshot={ARTIFACTS / f'{name}.png'}"])
    (ARTIFACTS / f"{name}.html").write_text(dom)
    return dom


def _chart_titles(dom: str) -> set[str]:
    # Each metric chart card has its metric's full name as the title of its heading.
    return set(re.findall(r'<h4[^>]*title="([^"]+)"', dom))


def test_training_run_page_shows_charts_grid_and_lineage(demo_smoke_run, mlflow_server, tmp_path) -> None:
    from mlflow.tracking import MlflowClient

    summary = demo_smoke_run.summary
    experiment, run_id = summary["experiment_id"], summary["training_run_id"]
    assert run_id, "the demo's training run id is missing from its summary"
    client = MlflowClient(tracking_uri=mlflow_server.url)
    logged = set(client.get_run(run_id).data.metrics)
    assert {"loss", "val/loss", "adherence_colour"} <= logged, logged
    evaluator = importlib.util.find_spec("latentforge.evaluation.in_training") is not None
    eval_metrics = sorted(m for m in logged if m.startswith("eval/")) if evaluator else []

    base = f"{mlflow_server.url}/#/experiments/{experiment}/runs/{run_id}"
    wanted = ["loss", "val/loss", "adherence_colour", *eval_metrics]
    dom = _page(f"{base}/model-metrics", tmp_path, "model_metrics", [f'title="{m}"' for m in wanted])
    titles = _chart_titles(dom)
    missing = [m for m in wanted if m not in titles]
    assert not missing, f"charts missing from the Model metrics tab: {missing}; found {sorted(titles)}"
    assert dom.count('class="main-svg"') >= len(wanted), "chart cards are present but not drawn"

    # The sample grid(s): in-training eval grids under eval/step_*/, the demo's adherence grids.
    def files(path: str | None = None) -> list[str]:
        out = []
        for item in client.list_artifacts(run_id, path):
            out.extend(files(item.path) if item.is_dir else [item.path])
        return out

    grids = [p for p in files() if p.endswith("grid.png")]
    if evaluator:
        assert any(re.match(r"eval/step_\d{6}/", p) for p in grids), f"no in-training eval grid in {grids}"
    assert grids, "the training run has no sample-grid artifact"
    grid = sorted(grids)[-1]
    dom = _page(f"{base}/artifacts/{grid}", tmp_path, "artifact_grid", [f'alt="{grid}"'])
    assert re.search(rf'<img[^>]*alt="{re.escape(grid)}"[^>]*src="blob:', dom), \
        f"the artifact view does not render {grid} as an image"

    # Lineage in the UI: the latents manifest this run trained on is listed as a dataset.
    dom = _page(base, tmp_path, "overview", ["latents"])
    assert "latents" in dom and "Datasets" in dom
