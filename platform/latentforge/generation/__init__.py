"""Sampling from a trained export: txt2img / img2img with diffusers schedulers.

    from latentforge.generation import load_export, SampleParams
    model = load_export("STORAGE/RUN/export")          # or an MLflow run id
    sampler = model.sampler(device="cpu")
    images = sampler.txt2img(["a red circle"], seeds=[0], params=SampleParams(sampler="ddim", steps=50))
"""

from latentforge.generation.sampler import GeneratedImage, SampleParams, Sampler, TextCondition
from latentforge.trained_model import ExportedModel, ExportError, load_export, resolve_export_dir

__all__ = ["ExportError", "ExportedModel", "GeneratedImage", "SampleParams", "Sampler", "TextCondition",
           "load_export", "resolve_export_dir"]
