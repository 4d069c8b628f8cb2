"""The autoencoder objective and its held-out metrics.

loss = l1_weight * |x - x'| + l2_weight * (x - x')^2     (pixel means, x in [-1, 1])
     + kl_weight * KL(q(z|x) || N(0, I))                  (summed over the latent, mean over the batch,
                                                            as diffusers' train_autoencoderkl example)
     + lpips_weight * LPIPS(x, x')                        (only with a local weights file)
     + disc_weight * -D(x')                               (only with --discriminator, from disc_start)

D is a PatchGAN discriminator trained with the hinge loss on real images and detached
reconstructions (`discriminator_loss`), the adversarial part of SD's VAE recipe.

LPIPS is torchmetrics' network built with `pretrained=False, pnet_rand=True` (which downloads
nothing) and then given the state dict from the local safetensors file, so the perceptual term
never reaches the network. PSNR / SSIM are torchmetrics' on images in [0, 1].
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


class LossConfigError(ValueError):
    """The perceptual-loss weights file is missing or does not fit the chosen network."""


def load_lpips(weights: str, net: str, device: torch.device) -> torch.nn.Module:
    """torchmetrics' LPIPS network with the weights of a local safetensors file, frozen, in eval mode.

    The file is what `safetensors.torch.save_model(lpips_network, path)` writes for torchmetrics'
    `_LPIPS(net=net)` (backbone and linear layers), e.g. converted once from the official weights.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_model
    from torchmetrics.functional.image.lpips import _LPIPS

    model = _LPIPS(pretrained=False, net=net, pnet_rand=True)
    try:
        load_model(model, weights, strict=True)  # save_model's counterpart: the lin*/lins.* aliases share storage
    except (OSError, SafetensorError) as exc:
        raise LossConfigError(f"lpips_weights {weights!r}: not a readable safetensors file ({exc})") from exc
    except RuntimeError as exc:
        raise LossConfigError(f"lpips_weights {weights!r} do not fit torchmetrics' LPIPS {net!r} network: "
                              f"{' '.join(str(exc).split())[:300]}") from exc
    return model.to(device).eval().requires_grad_(False)


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL of N(mean, exp(logvar)) from N(0, I), summed per sample over (C, h, w): (B,)."""
    return 0.5 * torch.sum(mean.pow(2) + logvar.exp() - 1.0 - logvar, dim=(1, 2, 3))


class AutoencoderLoss:
    """The weighted sum of the terms; `__call__` returns every term (for logging) and `total`."""

    def __init__(self, config: Any, device: torch.device) -> None:
        self.l1_weight, self.l2_weight, self.kl_weight = config.l1_weight, config.l2_weight, config.kl_weight
        self.lpips_weight = config.lpips_weight
        self.lpips = load_lpips(config.lpips_weights, config.lpips_net, device) if config.lpips_weights else None

    def __call__(self, pixels: torch.Tensor, reconstruction: torch.Tensor, mean: torch.Tensor,
                 logvar: torch.Tensor) -> dict[str, torch.Tensor]:
        """pixels, reconstruction: (B, 3, H, W) in [-1, 1]; mean, logvar: (B, C, h, w)."""
        pixels, reconstruction = pixels.float(), reconstruction.float()
        terms = {"l1": F.l1_loss(reconstruction, pixels), "l2": F.mse_loss(reconstruction, pixels),
                 "kl": kl_divergence(mean.float(), logvar.float()).mean()}
        total = self.l1_weight * terms["l1"] + self.l2_weight * terms["l2"] + self.kl_weight * terms["kl"]
        if self.lpips is not None:
            terms["lpips"] = self.lpips(reconstruction, pixels).mean()
            total = total + self.lpips_weight * terms["lpips"]
        terms["total"] = total
        return terms


class PatchDiscriminator(torch.nn.Module):
    """PatchGAN (pix2pix; taming-transformers' NLayerDiscriminator): one logit per image patch.

    GroupNorm instead of BatchNorm, so the statistics need no synchronisation across DDP ranks.
    """

    def __init__(self, layers: int = 3, channels: int = 64) -> None:
        super().__init__()
        modules: list[torch.nn.Module] = [torch.nn.Conv2d(3, channels, 4, 2, 1), torch.nn.LeakyReLU(0.2)]
        width = channels
        for level in range(1, layers):
            out = channels * min(2 ** level, 8)
            modules += [torch.nn.Conv2d(width, out, 4, 2, 1, bias=False), torch.nn.GroupNorm(min(32, out // 4), out),
                        torch.nn.LeakyReLU(0.2)]
            width = out
        modules.append(torch.nn.Conv2d(width, 1, 4, 1, 1))
        self.net = torch.nn.Sequential(*modules)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> logits (B, 1, h, w)."""
        return self.net(pixels)


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Hinge loss: mean(relu(1 - D(x))) + mean(relu(1 + D(x')))."""
    return F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()


def to_unit(pixels: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped (what PSNR / SSIM and image files take)."""
    return pixels.float().add(1.0).div(2.0).clamp(0.0, 1.0)


def reconstruction_metrics(pixels: torch.Tensor, reconstruction: torch.Tensor) -> dict[str, float]:
    """PSNR (dB) and SSIM of reconstructions against originals, both (B, 3, H, W) in [-1, 1]."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    target, preds = to_unit(pixels), to_unit(reconstruction)
    # SSIM's Gaussian window (11 px by default) must fit the image; small test images get a smaller one.
    kernel = min(11, (min(target.shape[-2:]) // 2) * 2 - 1)
    return {"psnr": float(peak_signal_noise_ratio(preds, target, data_range=1.0)),
            "ssim": float(structural_similarity_index_measure(preds, target, data_range=1.0, kernel_size=kernel))}


def reconstruction_grid(pixels: torch.Tensor, reconstruction: torch.Tensor, scale: int) -> Any:
    """A PIL image: originals in the top row, reconstructions below, upscaled `scale` x (nearest)."""
    from PIL import Image

    from latentforge.grids import contact_sheet

    pairs = torch.cat([to_unit(pixels), to_unit(reconstruction)]).cpu()  # (2B, 3, H, W)
    images = list(pairs.mul(255).round().byte().permute(0, 2, 3, 1).numpy())
    return Image.fromarray(contact_sheet(images, columns=pixels.shape[0], scale=scale))
