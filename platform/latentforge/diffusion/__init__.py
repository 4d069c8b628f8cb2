"""The latent-diffusion training objective (DDPM forward process, targets, loss weighting)."""
