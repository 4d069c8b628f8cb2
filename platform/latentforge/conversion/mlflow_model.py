"""A train export as an MLflow pyfunc model on its training run, optionally registered.

The model is "models from code" (MLflow's way without pickles): a two-line code file builds
``TextToImageModel``, whose ``load_context`` loads the diffusers folder shipped as the artifact
``pipeline`` with ``StableDiffusionPipeline.from_pretrained(local_files_only=True)``. Input: a
DataFrame with ``prompt`` and optional ``seed`` / ``steps`` / ``guidance`` columns; output: one
PNG (bytes) per row in column ``image``. Each row is its own pipeline call with a CPU generator
seeded by its seed, so a row's image is the diffusers pipeline's for those settings.
"""

from __future__ import annotations

import io
import os
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

from mlflow.pyfunc import PythonModel

from latentforge.conversion.target import ExportRefused, Source

DEFAULTS = {"seed": 0, "steps": 50, "guidance": 4.0}
"""Row defaults: the same as jobs/generate.py's."""
MODEL_CODE = ("from mlflow.models import set_model\n"
              "from latentforge.conversion.mlflow_model import TextToImageModel\n"
              "set_model(TextToImageModel())\n")
REQUIREMENTS = ("torch", "diffusers", "transformers", "pandas", "pillow", "safetensors")


class TextToImageModel(PythonModel):
    """pyfunc: DataFrame(prompt[, seed, steps, guidance]) -> DataFrame(image: PNG bytes)."""

    def load_context(self, context: Any) -> None:
        from diffusers import StableDiffusionPipeline

        self.pipe = StableDiffusionPipeline.from_pretrained(context.artifacts["pipeline"], local_files_only=True)
        self.pipe.set_progress_bar_config(disable=True)

    # No type hints here: MLflow reads predict()'s hints as a schema and would override the signature.
    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201
        import pandas as pd

        rows = model_input.to_dict("records") if hasattr(model_input, "to_dict") else list(model_input)
        return pd.DataFrame({"image": [self._png(row) for row in rows]})

    def _png(self, row: dict[str, Any]) -> bytes:
        import torch

        def value(key: str) -> Any:
            found = row.get(key)
            return DEFAULTS[key] if found is None or found != found else found  # NaN: column absent in this row

        image = self.pipe(str(row["prompt"]), num_inference_steps=int(value("steps")),
                          guidance_scale=float(value("guidance")),
                          generator=torch.Generator().manual_seed(int(value("seed")))).images[0]
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()


def signature() -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    inputs = Schema([ColSpec("string", "prompt"), ColSpec("long", "seed", required=False),
                     ColSpec("long", "steps", required=False), ColSpec("double", "guidance", required=False)])
    return ModelSignature(inputs=inputs, outputs=Schema([ColSpec("binary", "image")]))


def _requirements() -> list[str]:
    """Pinned to what this export was made and tested with (no inference: that would load the model)."""
    return [f"{name}=={metadata.version(name)}" for name in REQUIREMENTS]


def check_mlflow(data_manifest: Any, run_id: str | None) -> None:
    """Every check an MLflow model needs: a training run to log to, and the diffusers folder's."""
    from latentforge.conversion.diffusers_folder import check_diffusers

    if not run_id:
        raise ExportRefused("mlflow export refused: the export records no MLflow training run; fix: train with "
                            "MLflow tracking on, or export --format diffusers")
    check_diffusers(data_manifest)


def lineage_tags(source: Source) -> dict[str, str]:
    return {"latentforge.source_sha256": source.digest, "latentforge.data_sha256": str(source.data_digest or ""),
            "latentforge.training_run_id": str(source.model.mlflow_run_id or "")}


def log_export(source: Source, artifact_path: str = "model", register_as: str | None = None,
               sampler: str = "ddim") -> dict[str, Any]:
    """Log ``source`` as a pyfunc on its training run (and register it); returns model uri / version."""
    import mlflow
    import pandas as pd

    from latentforge.conversion.diffusers_folder import write_diffusers_folder
    from latentforge.tracking import tracking_uri

    run_id = source.model.mlflow_run_id
    check_mlflow(source.data_manifest, run_id)
    mlflow.set_tracking_uri(tracking_uri())
    package = str(Path(__file__).resolve().parent.parent)  # latentforge/, importable by the model code
    with tempfile.TemporaryDirectory(prefix="lf-mlflow-export-") as tmp:
        folder = write_diffusers_folder(source, os.path.join(tmp, "pipeline"), sampler)
        code = os.path.join(tmp, "text_to_image.py")
        Path(code).write_text(MODEL_CODE)
        example = pd.DataFrame({"prompt": ["a red circle"], "seed": [0], "steps": [20], "guidance": [4.0]})
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(name=artifact_path, python_model=code, artifacts={"pipeline": str(folder)},
                                           code_paths=[package], signature=signature(), input_example=example,
                                           pip_requirements=_requirements(), tags=lineage_tags(source))
    result: dict[str, Any] = {"model_uri": info.model_uri, "run_id": run_id}
    if register_as:
        version = mlflow.register_model(info.model_uri, register_as, tags=lineage_tags(source))
        result.update(name=register_as, version=version.version, registry_uri=f"models:/{register_as}/{version.version}")
    return result
