"""The MLflow UI, for real: a tiny pipeline logs to a real `mlflow server`, then headless Chromium
opens the training run's pages and we check what a person would look for.

- Model metrics tab: a chart for the training loss and for the evaluation metrics (validation
  loss, the in-training eval's failure count, prompt adherence), each at the steps the smoke preset logs it.
- Artifacts tab: the sample grid renders as an image.
- Overview: lineage. Clicking the training run's dataset opens MLflow's dataset panel, which must
  show the latents manifest's name, path and digest, the digest the precompute run logged as its
  output.
Without Chromium the test skips on a developer machine and fails under CI (`CI` set).
Screenshots are kept under test-artifacts/mlflow_ui/ (LATENTFORGE_TEST_ARTIFACTS overrides).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.harness.chromium import Chromium, Page, require_chromium

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(os.environ.get("LATENTFORGE_TEST_ARTIFACTS", REPO / "test-artifacts")) / "mlflow_ui"
# Charts are drawn only when on screen: a tall window puts every section on screen at once.
WIDTH, HEIGHT = 1400, 6000
SMOKE = yaml.safe_load((REPO / "jobs/configs/demo/smoke.yaml").read_text())


def _save(page: Page, name: str) -> str:
    """Keep the page's DOM and a screenshot as test artifacts; returns the DOM."""
    dom = page.html()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / f"{name}.html").write_text(dom)
    page.screenshot(ARTIFACTS / f"{name}.png")
    return dom


def _visit(browser: Chromium, url: str, name: str, ready_js: str, timeout_s: float = 240) -> str:
    """Open `url`, wait until `ready_js` holds, save DOM + screenshot as test artifacts."""
    page = browser.open(url)
    ready = page.wait_for(ready_js, timeout_s)
    dom = _save(page, name)
    assert ready, f"{url}: the page did not get ready in {timeout_s}s (see {ARTIFACTS / name}.png)"
    return dom


# The run overview's "Datasets" section: one button per dataset, "NAME (DIGEST)" plus its context.
_DATASET_BUTTONS = ("[...([...document.querySelectorAll('h4')].find(h => h.textContent.trim() === 'Datasets')"
                    "?.parentElement?.querySelectorAll('[role=button]') ?? [])]")
_DATASET_PANEL = "[...document.querySelectorAll('[role=dialog]')].find(d => d.innerText.includes('Digest:'))"


def _open_dataset_panel(browser: Chromium, url: str, name: str, timeout_s: float = 240) -> str:
    """Run overview -> click dataset `name` in its Datasets section -> the text of the panel it opens."""
    page = browser.open(url)
    button = f"{_DATASET_BUTTONS}.find(b => b.innerText.startsWith({json.dumps(name + ' (')}))"
    listed = page.wait_for(f"!!{button}", timeout_s)
    if not listed:
        _save(page, "overview")
        raise AssertionError(f"{url}: no dataset {name!r} in the run's Datasets section (see {ARTIFACTS}/overview.png)")
    page.evaluate(f"{button}.click()")
    opened = page.wait_for(f"!!{_DATASET_PANEL}", 60)
    _save(page, "dataset_panel")
    assert opened, f"clicking dataset {name!r} opened no dataset panel (see {ARTIFACTS}/dataset_panel.png)"
    return page.evaluate(f"{_DATASET_PANEL}.innerText")


def _datasets(client, run_id: str, context: str) -> list:
    """The MLflow datasets a run logged with this context (input / output)."""
    return [d.dataset for d in client.get_run(run_id).inputs.dataset_inputs
            if any(t.key == "mlflow.data.context" and t.value == context for t in d.tags)]


@pytest.fixture(scope="session")
def chromium_binary() -> str:
    """Asked for before the slow demo run: skips at once here, fails at once under CI."""
    return require_chromium()


@pytest.mark.slow
@pytest.mark.timeout(1800)  # it waits for the smoke demo (tests/harness/demo_run.py)
def test_training_run_page_shows_charts_grid_and_lineage(chromium_binary, demo_smoke_run, mlflow_server,
                                                         tmp_path) -> None:
    from mlflow.tracking import MlflowClient

    summary = demo_smoke_run.summary
    experiment, run_id = summary["experiment_id"], summary["training_run_id"]
    assert run_id, "the demo's training run id is missing from its summary"
    client = MlflowClient(tracking_uri=mlflow_server.url)
    # What the smoke demo must have logged, from its preset: validation and the in-training eval (the demo
    # passes --eval-prompts, no CLIP or FID model, so the evaluator's only metric is its failure count)
    # every eval_every steps, and the adherence of the untrained (step 0) and trained (last step) models.
    evals = list(range(SMOKE["eval_every"], SMOKE["steps"] + 1, SMOKE["eval_every"]))
    wanted = ["loss", "val/loss", "eval/failures", "adherence_colour"]
    history = {name: {m.step: m.value for m in client.get_metric_history(run_id, name)} for name in wanted}
    assert sorted(history["val/loss"]) == sorted(history["eval/failures"]) == evals, (history["val/loss"], evals)
    assert set(history["eval/failures"].values()) == {0.0}, "an in-training eval failed"
    assert sorted(history["loss"]) == list(range(1, SMOKE["steps"] + 1)), history["loss"]  # every step
    assert sorted(history["adherence_colour"]) == [0, SMOKE["steps"]], history["adherence_colour"]

    def files(path: str | None = None) -> list[str]:
        out = []
        for item in client.list_artifacts(run_id, path):
            out.extend(files(item.path) if item.is_dir else [item.path])
        return out

    # One in-training eval grid per eval step, and the adherence grids of the untrained and trained models.
    grids = sorted(p for p in files() if p.endswith("grid.png"))
    assert grids == ["adherence/trained/grid.png", "adherence/untrained/grid.png",
                     *(f"eval/step_{s:06d}/step_{s:06d}_grid.png" for s in evals)], grids
    grid = f"eval/step_{evals[-1]:06d}/step_{evals[-1]:06d}_grid.png"

    [latents] = _datasets(client, run_id, "input")
    precompute = client.search_runs([experiment], filter_string="tags.`latentforge.stage` = 'precompute' AND "
                                    f"tags.mlflow.parentRunId = '{summary['pipeline_run_id']}'")
    # One precompute pass wrote the base's and the upscaler's datasets (latents/16px, latents/32px).
    outputs = {d.name: d.digest for d in _datasets(client, precompute[0].info.run_id, "output")}
    assert sorted(outputs) == ["16px", "32px"] and outputs["16px"] == latents.digest and latents.name == "16px"

    base = f"{mlflow_server.url}/#/experiments/{experiment}/runs/{run_id}"
    with Chromium(chromium_binary, tmp_path / "chromium-profile", WIDTH, HEIGHT) as browser:
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

        # Overview: lineage. The panel of the dataset this run trained on names the latents manifest
        # and shows the digest the precompute run logged as its output.
        panel = _open_dataset_panel(browser, base, latents.name)
        manifest = demo_smoke_run.out / "latents" / "16px" / "manifest.json"
        for shown in (f"Digest: {latents.digest}", f"Path: {manifest}",
                      "stage: precompute", f"samples: {summary['latents']}"):
            assert shown in panel, f"the dataset panel lacks {shown!r}:\n{panel}"


def test_no_chromium_skips_here_and_fails_under_ci(monkeypatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        require_chromium()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI is set but there is no Chromium"):
        require_chromium()


def test_make_chromium_fails_under_ci_when_it_cannot_install(tmp_path) -> None:
    # A PATH with a shell, make and id only: no browser, no apt-get, so nothing can be installed.
    if shutil.which("make") is None:
        pytest.skip("no make here (`make test` and .ci/run run the suite through it)")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("sh", "make", "id"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path)}
    lenient = subprocess.run(["make", "-s", "chromium"], cwd=REPO, env=env, capture_output=True, text=True)
    assert lenient.returncode == 0 and "warning: no Chromium and no apt-get" in lenient.stdout, lenient
    strict = subprocess.run(["make", "-s", "chromium"], cwd=REPO, env={**env, "CI": "1"}, capture_output=True,
                            text=True)
    assert strict.returncode != 0 and "error: no Chromium and no apt-get" in strict.stderr, strict
