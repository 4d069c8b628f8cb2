"""What every export target shares: the source export, refusals, and all-or-nothing output writes.

A source is a train export (dir or MLflow run id, see ``latentforge.trained_model``). Every
output records the sha256 of the source's manifest.json; an existing ``--out`` made from another
source is refused rather than overwritten, one made from the same source is replaced whole.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from latentforge.manifest import MANIFEST_NAME, Manifest
from latentforge.trained_model import ExportedModel, load_export

TEXT_STATES_KEY = "text_states"
"""Data manifest ``extra`` key: how the text states the UNet was trained on were made."""
PIPELINE_TEXT_STATES = "full"
"""diffusers' pipelines feed all context_length states, unmasked."""
LEGACY_TEXT_STATES = "real_tokens"
"""Data made before the choice was recorded: real tokens only, with an attention mask in training."""


class ExportRefused(ValueError):
    """The model cannot be exported to this target; the message says why and what to do."""


@dataclass
class Source:
    """A loaded train export and what every target needs to know about it."""

    model: ExportedModel
    digest: str
    """sha256 of the export's manifest.json: the identity every output records."""

    @property
    def data_manifest(self) -> Manifest:
        return self.model.data_manifest

    @property
    def data_digest(self) -> str | None:
        """sha256 of the latents manifest the model was trained on (the train manifest's input)."""
        inputs = self.model.manifest.inputs if self.model.manifest is not None else []
        return next((i.get("sha256") for i in inputs if i.get("kind") == "manifest"), None)

    @property
    def upscaler(self) -> dict[str, Any] | None:
        """The train manifest's ``extra.upscaler`` (a super-resolution stage); None for a base model."""
        return (self.model.manifest.extra.get("upscaler") if self.model.manifest is not None else None) or None

    @property
    def prediction_type(self) -> str:
        return str(self.model.scheduler_config.get("prediction_type", "epsilon"))

    @property
    def resolution(self) -> int:
        extra = self.data_manifest.extra
        if extra.get("resolution"):
            return int(extra["resolution"])
        sample = self.model.unet.config.sample_size
        return int(sample if isinstance(sample, int) else sample[0]) * int(self.data_manifest.models["vae"]["downsample"])


def text_state_convention(data_manifest: Manifest) -> str:
    return str(data_manifest.extra.get(TEXT_STATES_KEY, LEGACY_TEXT_STATES))


def load_source(model_ref: str) -> Source:
    """Load the train export ``model_ref`` names; refuses one without a finished manifest."""
    model = load_export(model_ref)
    if model.manifest is None or model.manifest_sha256 is None:
        raise ExportRefused(f"{model.export_dir}: no {MANIFEST_NAME} (unfinished export); re-run training's export")
    return Source(model, model.manifest_sha256)


def check_text_states(data_manifest: Manifest, target: str) -> None:
    """Refuse a model conditioned on states the target's pipeline cannot reproduce."""
    convention = text_state_convention(data_manifest)
    if convention != PIPELINE_TEXT_STATES:
        raise ExportRefused(
            f"{target} export refused: the model was trained on text_states={convention!r} (real tokens + "
            f"attention mask) but diffusers' pipeline feeds all context states unmasked; fix: precompute with "
            f"--text-states {PIPELINE_TEXT_STATES} and retrain")


def check_out(out: str, digest: str, read_digest: Any) -> None:
    """Refuse an existing ``out`` made from another source; ``read_digest(out)`` -> its source digest."""
    if not os.path.exists(out):
        return
    try:
        found = read_digest(out)
    except Exception:  # noqa: BLE001 - anything unreadable is "not ours": never overwrite it
        found = None
    if found != digest:
        raise ExportRefused(f"--out {out} exists and was not made from this export (source {digest[:12]}); "
                            "choose another --out or remove it")


@contextmanager
def atomic_dir(out: str) -> Iterator[Path]:
    """Yield a temp folder next to ``out``; on success it replaces ``out`` whole, on error it is removed."""
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent))
    try:
        yield tmp
        if os.path.exists(out):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=parent)
            os.replace(out, os.path.join(old, "x"))
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
