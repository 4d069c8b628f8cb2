"""The super-resolution (upscaler) stage: low-res inputs, their noise augmentation, the UNet wiring and sampling.

The recipe of Stable Diffusion's x4 upscaler and DeepFloyd IF stage II: the UNet sees the noisy
high-res latent concatenated channel-wise with the low-res image (pixels, resized to the latent's
size) and the low-res image's noise-augmentation level as its class label.
"""

DEFAULT_MAX_NOISE_LEVEL = 350
"""Train's default ``--max-noise-level`` (SD x4's); here, without torch, so precompute can describe what an
upscaler trained on its latents takes without importing the train stage above it."""
