"""One loader: an export dir, a run id, a diffusers folder made from it (and models:/NAME/VERSION, see
test_export_mlflow.py) all lead to the same export, and only while it is unchanged."""

from __future__ import annotations

import json

import pytest

from latentforge.conversion.config import ExportConfig
from latentforge.trained_model import ExportError, load_export, resolve_export_dir
from pipelines.export import run
from tests.harness.job_process import run_job
from tests.harness.tiny_export import build_tiny_export


def test_diffusers_folder_leads_back_to_its_export(tmp_path) -> None:
    source = build_tiny_export(tmp_path / "src", vae="autoencoder_kl", resolution=32, text_states="full")
    folder = run(ExportConfig(model=str(source.dir), out=str(tmp_path / "sd"))).out
    assert resolve_export_dir(folder) == str(source.dir)
    assert load_export(folder).export_dir == str(source.dir)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    proc = run_job("generate", ["--model", folder, "--prompts", str(prompts), "--out", str(tmp_path / "gen"),
                                "--steps", "2", "--no-progress", "--no-mlflow"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "gen" / "000000.png").exists()
    # the export changed after the folder was made: refused, not silently another model
    manifest = source.dir / "manifest.json"
    data = json.loads(manifest.read_text())
    data["extra"]["step"] = 8
    manifest.write_text(json.dumps(data))
    with pytest.raises(ExportError, match="gone or changed"):
        resolve_export_dir(folder)


def test_unknown_reference_names_every_accepted_kind(tmp_path) -> None:
    with pytest.raises(ExportError, match="models:/NAME/VERSION"):
        resolve_export_dir(str(tmp_path / "nothing"))
