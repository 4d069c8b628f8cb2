"""--format mlflow against a real `mlflow server`: a pyfunc on the training run, registered, loadable
from models:/NAME/1, giving the images jobs/generate.py gives, linked to its run and latents."""

from __future__ import annotations

import io

import numpy as np
import pytest

from latentforge.conversion.config import ExportConfig
from latentforge.conversion.target import ExportRefused
from pipelines.export import run
from tests.harness.tiny_export import build_tiny_export


@pytest.fixture
def tracked(mlflow_server, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    client = MlflowClient(tracking_uri=mlflow_server.url)
    experiment = client.get_experiment_by_name("export-test") or client.get_experiment(
        client.create_experiment("export-test"))
    return client, client.create_run(experiment.experiment_id).info.run_id


def test_registered_model_gives_the_generate_images(tracked, tmp_path) -> None:
    import mlflow
    import pandas as pd
    from PIL import Image

    from latentforge.generation import SampleParams, load_export

    client, run_id = tracked
    source = build_tiny_export(tmp_path / "src", vae="autoencoder_kl", resolution=32, text_states="full",
                               mlflow_run_id=run_id)
    result = run(ExportConfig(model=str(source.dir), format="mlflow", register_as="lf-tiny"))
    assert result.out == "models:/lf-tiny/1"
    version = client.get_model_version("lf-tiny", "1")
    assert version.run_id == run_id
    data_sha256 = load_export(str(source.dir)).manifest.inputs[0]["sha256"]
    assert version.tags["latentforge.data_sha256"] == data_sha256

    # One loader: jobs/generate.py / evaluate.py take models:/NAME/VERSION (training tags its run with the export).
    from latentforge.trained_model import EXPORT_URI_TAG, resolve_export_dir

    client.set_tag(run_id, EXPORT_URI_TAG, str(source.dir))
    assert resolve_export_dir("models:/lf-tiny/1") == str(source.dir)

    model = mlflow.pyfunc.load_model("models:/lf-tiny/1")
    frame = pd.DataFrame({"prompt": ["a red circle", "two blue squares"], "seed": [3, 11], "steps": [6, 6],
                          "guidance": [3.5, 3.5]})
    out = model.predict(frame)
    ours = np.stack([np.asarray(Image.open(io.BytesIO(png))).astype(np.int16) for png in out["image"]])
    sampler = load_export(str(source.dir)).sampler(text_states="full")
    expected = sampler.txt2img(list(frame.prompt), [3, 11], SampleParams(sampler="ddim", steps=6, guidance=3.5))
    assert np.abs(ours - np.stack([e.to_uint8() for e in expected]).astype(np.int16)).max() <= 1
    assert np.abs(ours[0] - ours[1]).max() > 3
    # prompt only: the defaults (seed 0, 50 steps, guidance 4) apply, still one PNG per row
    assert len(model.predict(pd.DataFrame({"prompt": ["x"]}))["image"][0]) > 100
    assert model.metadata.get_input_schema().input_names() == ["prompt", "seed", "steps", "guidance"]


def test_export_without_training_run_is_refused(mlflow_server, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    source = build_tiny_export(tmp_path / "src", vae="autoencoder_kl", text_states="full")
    with pytest.raises(ExportRefused, match="no MLflow training run"):
        run(ExportConfig(model=str(source.dir), format="mlflow"))
