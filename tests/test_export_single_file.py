"""--format single-file: one LDM-layout .safetensors with ModelSpec metadata; from_single_file with the
exported folder as config holds the folder's tensors."""

from __future__ import annotations

import json

import pytest
import torch

from latentforge.conversion.config import ExportConfig
from latentforge.conversion.target import ExportRefused
from pipelines.export import run
from tests.harness.tiny_export import build_tiny_export


def _export(root, layer: str = "last", **kwargs):
    source = build_tiny_export(root, vae=kwargs.pop("vae", "autoencoder_kl"), resolution=32, text_states="full",
                               **kwargs)
    manifest = source.dir / "data_manifest.json"
    data = json.loads(manifest.read_text())
    data["models"]["text_encoder"]["layer"] = layer
    manifest.write_text(json.dumps(data))
    return source


def _both(source, root) -> tuple:
    folder = run(ExportConfig(model=str(source.dir), format="diffusers", out=str(root / "sd"))).out
    file = run(ExportConfig(model=str(source.dir), format="single-file", out=str(root / "m.safetensors"))).out
    return folder, file


@pytest.mark.parametrize("layer", ["last", "penultimate"])
def test_from_single_file_equals_the_folder(tmp_path, layer) -> None:
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    folder, file = _both(_export(tmp_path / "src", layer), tmp_path)
    with safe_open(file, framework="pt") as handle:
        keys, meta = set(handle.keys()), handle.metadata()
    assert {"model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.output_blocks.1.1.conv.weight",
            "first_stage_model.decoder.up.1.upsample.conv.weight", "first_stage_model.encoder.mid.attn_1.q.weight",
            "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight"} <= keys  # all blocks, as SD 2
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-512" and meta["modelspec.resolution"] == "32x32"
    assert meta["modelspec.prediction_type"] == "epsilon" and meta["modelspec.title"] == "src"
    ours = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    theirs = StableDiffusionPipeline.from_single_file(file, config=folder, local_files_only=True)
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(ours, name).state_dict(), getattr(theirs, name).state_dict()
        assert set(a) == set(b), name
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert theirs.text_encoder.config.num_hidden_layers == (2 if layer == "last" else 1)


def test_v_prediction_metadata_fp16_and_refusals(tmp_path) -> None:
    from safetensors import safe_open

    source = _export(tmp_path / "v", prediction_type="v_prediction", mlflow_run_id="ab" * 16)
    out = tmp_path / "v.safetensors"
    run(ExportConfig(model=str(source.dir), format="single-file", out=str(out), dtype="fp16", title="tiny v"))
    with safe_open(str(out), framework="pt") as handle:
        meta = handle.metadata()
        assert handle.get_tensor("model.diffusion_model.out.2.weight").dtype == torch.float16
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v" and meta["modelspec.prediction_type"] == "v"
    assert meta["latentforge.mlflow_run_id"] == "ab" * 16 and meta["modelspec.title"] == "tiny v"
    before = out.read_bytes()
    other = _export(tmp_path / "other", seed=1)
    with pytest.raises(ExportRefused, match="not made from this export"):
        run(ExportConfig(model=str(other.dir), format="single-file", out=str(out)))
    assert out.read_bytes() == before
    taesd = _export(tmp_path / "taesd", vae="autoencoder_tiny")
    with pytest.raises(ExportRefused, match="AutoencoderKL only"):
        run(ExportConfig(model=str(taesd.dir), format="single-file", out=str(tmp_path / "t.safetensors")))
    assert not (tmp_path / "t.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
