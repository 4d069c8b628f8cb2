"""Precompute stage parts (no Ray): config, preprocessing, encoding, latent shard writer, fidelity gate.

The Ray Data graph that strings them together is `pipelines/precompute.py`; the entry script is
`jobs/precompute_latents.py`. Output format: docs/architecture.md, "Precompute output".
"""
