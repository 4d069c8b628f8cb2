"""Models that leave the platform: diffusers folders, single-file LDM checkpoints, MLflow models."""
