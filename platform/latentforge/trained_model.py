"""A trained model (the train stage's export): resolving a reference to it, loading it, its identity.

Train export contract (docs/architecture.md): `EXPORT/{unet/, scheduler/, data_manifest.json,
manifest.json}`; the export manifest's `extra` holds `mlflow_run_id`, `step`, `data_dir`; the MLflow
training run carries the tag `latentforge.export_uri`.

A model is named by its export dir (or the training run dir holding `export/`), an MLflow run id, a
diffusers folder made from it or a registered MLflow model version (`models:/NAME/VERSION`,
`models:/NAME@ALIAS`). The last two lead back to the export itself (the sampler needs the open_clip
tower and the latents' VAE) and are checked to still be the export they were made from. Everything
above generation, evaluation, conversion and the upscaler loads a model through this one module.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

from latentforge import storage
from latentforge.conditioning.spec import ConditionSet
from latentforge.manifest import MANIFEST_NAME, Manifest, ManifestError, manifest_digest, read_manifest

if TYPE_CHECKING:  # torch is imported on first load, not here: configs import EXPORT_FORMATS
    import torch

EXPORT_URI_TAG = "latentforge.export_uri"
RUN_ID_RE = re.compile(r"^(runs:/)?([0-9a-f]{32})/?$")
REGISTERED_RE = re.compile(r"^models:/([^/@]+)(?:/(\d+)|@([\w-]+))/?$")
UNET_DIR = "unet"
SCHEDULER_DIR = "scheduler"
DATA_MANIFEST_NAME = "data_manifest.json"
EXPORT_FORMATS = ("diffusers", "single-file", "mlflow")
"""The forms ``latentforge.conversion`` turns an export into (train's ``--export-formats``, export's ``--format``)."""


class ExportError(RuntimeError):
    """The model reference is not an export dir nor a run with an export."""


@dataclass
class ExportedModel:
    """A loaded export: the EMA UNet, the training noise schedule and the data manifest."""

    export_dir: str
    unet: Any
    scheduler_config: dict[str, Any]
    data_manifest: Manifest
    manifest: Manifest | None
    mlflow_run_id: str | None
    step: int | None
    data_dir: str | None

    @property
    def manifest_sha256(self) -> str | None:
        uri = storage.join(self.export_dir, MANIFEST_NAME)
        return storage.sha256_file(uri) if storage.exists(uri) else None

    def sampler(self, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                text_states: str = "auto", unet: Any = None) -> Any:
        """A `Sampler` with the manifest's VAE and text encoder on `device` in `dtype` (None: float32); text_states "auto" = the
        convention the data manifest records (absent: real_tokens, data made before it was recorded).
        `unet`: a wrapper of this export's UNet to sample with instead (an upscaler's image condition)."""
        import torch

        from latentforge.generation.sampler import Sampler
        from latentforge.models.text_encoder import load_text_encoder_from_manifest
        from latentforge.models.vae import load_vae_from_manifest

        dtype = dtype or torch.float32
        vae = load_vae_from_manifest(self.data_manifest, device=device, dtype=dtype)
        text_encoder = load_text_encoder_from_manifest(self.data_manifest, device=device, dtype=dtype)
        if text_states == "auto":
            text_states = self.data_manifest.extra.get("text_states", "real_tokens")
        unet = unet if unet is not None else self.unet
        return Sampler(unet, vae, text_encoder, self.scheduler_config, device=device, dtype=dtype,
                       text_states=text_states, default_resolution=self.data_manifest.extra.get("resolution"),
                       conditions=ConditionSet.from_manifest(self.data_manifest))


@contextlib.contextmanager
def _local_copy(uri: str) -> Iterator[str]:
    """A local directory with the export: local ones in place; remote ones (s3://, gs://, ...) copied
    to a temp dir that is removed again once the caller has read what it needs into memory."""
    if "://" not in uri or uri.startswith("file://"):
        yield uri[len("file://"):] if uri.startswith("file://") else uri
        return
    fs, path = storage.filesystem(uri)
    with tempfile.TemporaryDirectory(prefix="lf-export-") as target:
        fs.get(path.rstrip("/") + "/", target, recursive=True)
        yield target


def resolve_export_dir(model: str) -> str:
    """An export dir (or a training run dir holding `export/`), or an MLflow run id -> the export dir."""
    for candidate in (model, storage.join(model, "export")):
        if storage.exists(storage.join(candidate, UNET_DIR)) and storage.exists(storage.join(candidate, DATA_MANIFEST_NAME)):
            return candidate
    other = _other_reference(model)
    if other is not None:
        return other
    match = RUN_ID_RE.match(model.strip())
    if match:
        from mlflow.tracking import MlflowClient

        from latentforge.tracking import tracking_uri

        try:
            run = MlflowClient(tracking_uri=tracking_uri()).get_run(match.group(2))
        except Exception as exc:  # noqa: BLE001 - report which store was asked
            raise ExportError(f"MLflow run {match.group(2)} not found in {tracking_uri()} ({exc})") from exc
        uri = run.data.tags.get(EXPORT_URI_TAG)
        if not uri:
            raise ExportError(f"MLflow run {match.group(2)} has no {EXPORT_URI_TAG} tag (did training finish its export?)")
        return resolve_export_dir(uri) if uri != model else uri
    raise ExportError(f"{model!r} is neither an export dir (unet/, scheduler/, data_manifest.json), an MLflow run id, "
                      "a diffusers folder from jobs/export_model.py nor models:/NAME/VERSION")


def _other_reference(model: str) -> str | None:
    """A diffusers folder or a registered model version -> the export dir it was made from (still unchanged)."""
    if is_diffusers_folder(model):
        export_dir, digest = source_of_folder(model)
        what = f"diffusers folder {model}"
    else:
        found = source_of_version(model)
        if found is None:
            return None
        export_dir, digest = resolve_export_dir(found[0]), found[1]
        what = model
    manifest = storage.join(export_dir, MANIFEST_NAME)
    if not storage.exists(manifest) or storage.sha256_file(manifest) != digest:
        raise ExportError(f"{what} was made from {export_dir}, which is gone or changed since")
    return export_dir


def is_diffusers_folder(model: str) -> bool:
    return storage.exists(storage.join(model, "model_index.json")) and storage.exists(storage.join(model, MANIFEST_NAME))


def source_of_folder(folder: str) -> tuple[str, str]:
    """(export dir, its manifest sha256) recorded in a diffusers folder's manifest.json."""
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


def read_data_manifest(export_dir: str) -> Manifest:
    data = storage.read_json(storage.join(export_dir, DATA_MANIFEST_NAME))
    try:
        return Manifest(**data)
    except (TypeError, ValueError) as exc:
        raise ManifestError(f"{export_dir}/{DATA_MANIFEST_NAME}: malformed ({exc})") from exc


def export_identity(export_dir: str) -> tuple[int | None, str | None, str | None]:
    """(step, MLflow run id, manifest sha256) of an export from its manifest alone, no weights read;
    (None, None, None) for an export without a readable manifest."""
    try:
        extra = read_manifest(export_dir).extra
    except (ManifestError, OSError):
        return None, None, None
    step = extra.get("step")
    return (int(step) if step is not None else None), extra.get("mlflow_run_id"), manifest_digest(export_dir)


def load_export(model: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> ExportedModel:
    """Load `model` (export dir or MLflow run id): UNet in eval mode on `device`/`dtype` (None: float32)."""
    import torch
    from diffusers import UNet2DConditionModel

    dtype = dtype or torch.float32
    export_uri = resolve_export_dir(model)
    with _local_copy(export_uri) as local:
        unet = UNet2DConditionModel.from_pretrained(os.path.join(local, UNET_DIR), torch_dtype=dtype,
                                                    use_safetensors=True)  # never unpickle weights
        sched_path = os.path.join(local, SCHEDULER_DIR, "scheduler_config.json")
        scheduler_config = storage.read_json(sched_path) if os.path.exists(sched_path) else {}
        data_manifest = read_data_manifest(local)
        try:
            manifest = read_manifest(local)
        except ManifestError:
            manifest = None
    unet = unet.to(device).eval().requires_grad_(False)
    extra = manifest.extra if manifest is not None else {}
    step = extra.get("step")
    return ExportedModel(export_dir=export_uri, unet=unet, scheduler_config=scheduler_config,
                         data_manifest=data_manifest, manifest=manifest, mlflow_run_id=extra.get("mlflow_run_id"),
                         step=int(step) if step is not None else None, data_dir=extra.get("data_dir"))
