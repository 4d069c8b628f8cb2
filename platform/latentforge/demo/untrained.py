"""The demo's baseline: the trained model's architecture at initialisation (step 0), in the export layout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from latentforge.manifest import MANIFEST_NAME


def write_untrained_export(trained_export: Path, out: Path, preset: str, seed: int) -> Path:
    """The same architecture at initialisation (step 0), in the export layout `generate` loads.

    Scheduler and data manifest are copied from the trained export; the UNet is `build_unet`'s
    freshly initialised one, so the two models differ only by training.
    """
    import torch

    from latentforge import storage
    from latentforge.models.unet import build_unet

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for item in ("scheduler", "data_manifest.json", MANIFEST_NAME):
        src = trained_export / item
        if src.is_dir():
            shutil.copytree(src, out / item)
        elif src.exists():
            shutil.copy2(src, out / item)
    data = json.loads((trained_export / "data_manifest.json").read_text())
    latent_channels = int(data["models"]["vae"]["latent_channels"])
    width = int(data["models"]["text_encoder"]["width"])
    torch.manual_seed(seed)
    build_unet(preset, latent_channels, width).save_pretrained(out / "unet")
    manifest_path = out / MANIFEST_NAME
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        extra = manifest.setdefault("extra", {})
        extra.update(step=0, mlflow_run_id=None, untrained=True)
        storage.atomic_write_json(str(manifest_path), manifest)
    return out
