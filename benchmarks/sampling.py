"""Sampling throughput: images/s for DDIM-50 and DPM-Solver++-20 with the project's Sampler.

    python benchmarks/sampling.py                                   # tiny preset, CPU, 32 px (patchify VAE)
    python benchmarks/sampling.py --preset sd2-base --resolution 256 --device cuda --dtype bf16 --batch-size 8

The tiny case uses the real code path end to end: `build_unet("tiny")` (random weights), the
weight-free patchify VAE and the tiny open_clip text tower, CFG on (2 UNet rows per image).
The sd2-base case builds the SD-2-base-shaped UNet (865 M params) and an SD-shaped AutoencoderKL
(both random weights: nothing is downloaded) and feeds random 77x1024 text states instead of
OpenCLIP ViT-H (text encoding is < 1 % of a 20-50-step sample). Time covers text encoding,
denoising and VAE decoding; model loading and one warm-up batch are excluded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "platform"))
sys.path.insert(0, str(REPO))


class RandomText:
    """A stand-in text encoder with SD 2's shape (77 tokens x 1024), full-length states."""

    def __init__(self, width: int, device: str, dtype: torch.dtype, context_length: int = 77) -> None:
        self.width, self.context_length, self.device, self.dtype = width, context_length, device, dtype
        self.tokenizer = None

    def encode(self, captions):
        g = torch.Generator().manual_seed(len(captions))
        states = torch.randn(len(captions), self.context_length, self.width, generator=g)
        lengths = torch.full((len(captions),), self.context_length, dtype=torch.long)
        return states.to(self.device, self.dtype), lengths, states[:, -1].to(self.device, self.dtype)


def build(args: argparse.Namespace):
    from latentforge.generation.sampler import Sampler
    from latentforge.models.unet import build_unet, count_parameters
    from latentforge.models.vae import VaeSpec, load_vae

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    if args.preset == "tiny":
        from latentforge.models.text_encoder import load_text_encoder, save_tiny_clip_checkpoint

        tmp = tempfile.mkdtemp(prefix="lf-bench-")
        text = load_text_encoder("lf-tiny-clip", save_tiny_clip_checkpoint(os.path.join(tmp, "clip.safetensors")),
                                 device=args.device, dtype=dtype)
        vae = load_vae(VaeSpec("patchify", patch_size=2), device=args.device, dtype=dtype)
        unet = build_unet("tiny", vae.latent_channels, text.width, sample_size=args.resolution // vae.downsample)
        vae_desc, text_desc = "patchify (p=2, weight-free)", "lf-tiny-clip (random init)"
    else:
        from diffusers import AutoencoderKL

        tmp = tempfile.mkdtemp(prefix="lf-bench-")
        AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                      block_out_channels=(128, 256, 512, 512),
                      down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                      sample_size=args.resolution, scaling_factor=0.18215).save_pretrained(tmp)
        vae = load_vae(VaeSpec("autoencoder_kl", id=tmp), device=args.device, dtype=dtype)
        unet = build_unet(args.preset, 4, 1024 if args.preset == "sd2-base" else 768)
        text = RandomText(unet.config.cross_attention_dim, args.device, dtype)
        vae_desc, text_desc = "SD-shaped AutoencoderKL (random init)", "random 77x1024 states (stand-in)"
    unet = unet.to(args.device, dtype).eval().requires_grad_(False)
    sched = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    sampler = Sampler(unet, vae, text, sched, device=args.device, dtype=dtype,
                      text_states="real_tokens" if args.preset == "tiny" else "full",
                      default_resolution=args.resolution)
    return sampler, {"unet_params": count_parameters(unet), "vae": vae_desc, "text": text_desc}


def measure(sampler, name: str, steps: int, args: argparse.Namespace) -> dict:
    from latentforge.generation.sampler import SampleParams

    params = SampleParams(sampler=name, steps=steps, guidance=args.guidance, height=args.resolution,
                          width=args.resolution)
    prompts = [f"a red circle number {i} at the top left" for i in range(args.num_images)]

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    sampler.txt2img(prompts[:args.batch_size], list(range(args.batch_size)), params, batch_size=args.batch_size)
    sync()
    start = time.perf_counter()
    sampler.txt2img(prompts, list(range(len(prompts))), params, batch_size=args.batch_size)
    sync()
    seconds = time.perf_counter() - start
    return {"sampler": name, "steps": steps, "images": len(prompts), "seconds": round(seconds, 3),
            "images_per_s": round(len(prompts) / seconds, 3),
            "unet_evals_per_s": round(len(prompts) * steps * (2 if args.guidance > 1 else 1) / seconds, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=["tiny", "sd15", "sd2-base"])
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-images", type=int, default=32)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sampler, info = build(args)
    results = [measure(sampler, "ddim", 50, args), measure(sampler, "dpmsolver++", 20, args)]
    report = {"preset": args.preset, "resolution": args.resolution, "device": args.device, "dtype": args.dtype,
              "batch_size": args.batch_size, "guidance": args.guidance, "torch_threads": torch.get_num_threads(),
              "machine": f"{platform.machine()} {os.cpu_count()} CPUs" + (
                  f", {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else ""),
              "torch": torch.__version__, "load_average_1m_at_end": round(os.getloadavg()[0], 2),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), **info, "results": results}
    print(json.dumps(report, indent=2))
    print("\n| sampler | steps | images | seconds | images/s | UNet evals/s |\n|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['sampler']} | {r['steps']} | {r['images']} | {r['seconds']} | {r['images_per_s']} | "
              f"{r['unet_evals_per_s']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
