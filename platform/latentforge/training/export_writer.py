"""Writing the train stage's output: STORAGE/RUN_NAME/export/, ready for generation (read by
``latentforge.trained_model``, which owns the layout's names).

    unet/                EMA UNet (`save_pretrained`, safetensors)
    scheduler/           DDPMScheduler config used in training (`save_pretrained`)
    data_manifest.json   the precompute manifest the model was trained on (VAE, text encoder, ...)
    manifest.json        Manifest(stage="train"): config, input digest, extra.{mlflow_run_id, step, data_dir}

manifest.json is removed first and written last, so a reader never trusts a half-written export.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from latentforge import storage
from latentforge.manifest import MANIFEST_NAME, Manifest, manifest_uri, write_manifest
from latentforge.trained_model import DATA_MANIFEST_NAME, SCHEDULER_DIR, UNET_DIR


def write_export(export_uri: str, model: Any, noise_scheduler: Any, data_dir: str, data_digest: str,
                 data_manifest: Manifest, config: dict[str, Any], step: int, mlflow_run_id: str | None,
                 counts: dict[str, int] | None = None, extra: dict[str, Any] | None = None) -> str:
    """Write the export; returns the sha256 of its manifest.json."""
    fs, root = storage.filesystem(export_uri)
    if fs.exists(f"{root}/{MANIFEST_NAME}"):
        fs.rm(f"{root}/{MANIFEST_NAME}")
    with tempfile.TemporaryDirectory(prefix="lf-export-") as tmp:
        model.save_pretrained(os.path.join(tmp, UNET_DIR), safe_serialization=True)
        noise_scheduler.save_pretrained(os.path.join(tmp, SCHEDULER_DIR))
        for path in sorted(Path(tmp).rglob("*")):
            if path.is_file():
                rel = path.relative_to(tmp).as_posix()
                fs.makedirs(f"{root}/{rel}".rsplit("/", 1)[0], exist_ok=True)
                fs.put_file(str(path), f"{root}/{rel}")
    storage.atomic_write_bytes(storage.join(export_uri, DATA_MANIFEST_NAME),
                               _read(manifest_uri(data_dir)))
    unet_config = dict(model.config)
    manifest = Manifest(
        stage="train",
        config=config,
        inputs=[{"uri": manifest_uri(data_dir), "sha256": data_digest, "kind": "manifest"}],
        counts=dict(counts or {}),
        models={
            "unet": {"class": "UNet2DConditionModel", "weights": "ema" if config.get("ema_decay", 0) > 0 else "raw",
                     "in_channels": unet_config.get("in_channels"),
                     "cross_attention_dim": unet_config.get("cross_attention_dim"),
                     "sample_size": unet_config.get("sample_size"),
                     "parameters": int(sum(p.numel() for p in model.parameters()))},
            "vae": data_manifest.models.get("vae", {}),
            "text_encoder": data_manifest.models.get("text_encoder", {}),
        },
        extra={"mlflow_run_id": mlflow_run_id, "step": int(step), "data_dir": data_dir,
               "prediction_type": noise_scheduler.config.prediction_type,
               "latent_shape": data_manifest.extra.get("latent_shape"), **(extra or {})},
    )
    return write_manifest(export_uri, manifest)


def _read(uri: str) -> bytes:
    fs, path = storage.filesystem(uri)
    with fs.open(path, "rb") as handle:
        return handle.read()
