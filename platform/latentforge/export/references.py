"""The other names of a train export: a diffusers folder made from it, a registered MLflow model version.

``latentforge.generation.export.resolve_export_dir`` asks these when its argument is not an export
dir or a run id, so jobs/generate.py and jobs/evaluate.py take all four with one loader. Both lead
back to the train export itself (the sampler needs the open_clip tower and the latents' VAE), and
both check that it is still the export they were made from.
"""

from __future__ import annotations

import re

from latentforge import storage
from latentforge.manifest import MANIFEST_NAME

REGISTERED_RE = re.compile(r"^models:/([^/@]+)(?:/(\d+)|@([\w-]+))/?$")


def is_diffusers_folder(model: str) -> bool:
    return storage.exists(storage.join(model, "model_index.json")) and storage.exists(storage.join(model, MANIFEST_NAME))


def source_of_folder(folder: str) -> tuple[str, str]:
    """(export dir, its manifest sha256) recorded in a diffusers folder's manifest.json."""
    from latentforge.manifest import read_manifest

    recorded = read_manifest(folder, stage="export").inputs[0]
    return recorded["uri"].rsplit("/", 1)[0], recorded["sha256"]


def source_of_version(model: str) -> tuple[str, str] | None:
    """(training run id, source sha256) of ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS``; None if not one."""
    match = REGISTERED_RE.match(model.strip())
    if not match:
        return None
    from mlflow.tracking import MlflowClient

    from latentforge.tracking import tracking_uri

    client = MlflowClient(tracking_uri=tracking_uri())
    name, number, alias = match.groups()
    version = client.get_model_version(name, number) if number else client.get_model_version_by_alias(name, alias)
    return version.run_id, version.tags.get("latentforge.source_sha256", "")
