"""The super-resolution (upscaler) stage: low-res inputs, their noise augmentation, the UNet wiring and sampling.

The recipe of Stable Diffusion's x4 upscaler and DeepFloyd IF stage II: the UNet sees the noisy
high-res latent concatenated channel-wise with the low-res image (pixels, resized to the latent's
size) and the low-res image's noise-augmentation level as its class label.
"""
