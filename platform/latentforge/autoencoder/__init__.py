"""The autoencoder stage: train or fine-tune a diffusers AutoencoderKL on ingest shards, export it for precompute."""
