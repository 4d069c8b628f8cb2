"""Scalar and class conditions: metadata columns kept by precompute, embedded through the UNet's class
embedding in training, chosen with `--condition NAME=VALUE` at generation (docs/conditioning.md)."""
