"""Latent UNet training: config, data order, checkpoints, the Accelerate step loop, export.

Ray-free on purpose (see docs/architecture.md): `pipelines/train.py` runs these parts inside
Ray Train workers; tests run them in-process.
"""
