"""SynOOD synthesis speed: seconds per image with and without the energy refinement.

Times one image at a time through ``oodcli.synth.synood.synthesize_one`` (prompt encoding,
the strength-0.6 denoising loop of 20 scheduled steps = 12 U-Net passes with classifier-free
guidance, VAE decode, the classifier's energy loss), with ``--iterations 1`` (plain inpainting)
and ``--iterations 3`` (the paper's setting: 3 denoising loops with 2 skip-gradient updates
between them, so 2 backward passes through the VAE decoder and the classifier).

``--size tiny``: the digits demo's pipeline (random init, or a trained one with
``--pipeline DIR``) at 32x32 with the digits CNN shape. ``--size sd2``: random-initialised
components of Stable Diffusion 2 inpainting's sizes (U-Net 320-640-1280-1280 with 1024-d
cross attention, the 4-level VAE, a 23-layer 1024-wide text encoder) at 512x512 with a
ResNet-50 as g: the real cost per image without downloading the weights (use a GPU:
``--device cuda``). It also reports how well the skip gradient (dL/dz_0) points along the
exact dL/d epsilon (autograd through the whole U-Net chain), as a cosine, on the tiny size.

Usage: python benchmarks/synood_synthesis.py [--size tiny|sd2] [--device cpu|cuda] [--images 3]
       [--pipeline DIR] [--out benchmarks/results/synood_synthesis[-sd2-cuda].json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from oodcli.synth.synood import EnergyLoss, Inpainter, skip_gradient, synthesize_one

ROOT = Path(__file__).resolve().parent.parent


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Logits(torch.nn.Module):
    """A plain torch classifier behind the backbone interface EnergyLoss uses."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward_layers(self, x, layers):
        return {"logits": self.net(x)}


def tiny(pipeline: str | None):
    from oodcli.backbones.base import get_spec
    from oodcli.synth.tiny_diffusion import build_tiny_pipeline, load_pipeline

    pipe = load_pipeline(pipeline) if pipeline else build_tiny_pipeline(0)
    spec = get_spec("digits_cnn-tiny")
    return pipe, spec.build("random"), spec.preprocess, 32


def sd2(image_size: int = 512):
    """Stable Diffusion 2 inpainting's architecture (its published configs), random weights."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionInpaintPipeline, UNet2DConditionModel
    from torchvision.models import resnet50
    from transformers import CLIPTextConfig, CLIPTextModel

    from oodcli.backbones.base import get_spec
    from oodcli.synth.tiny_diffusion import clip_tokenizer

    unet = UNet2DConditionModel(
        sample_size=64, in_channels=9, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
        use_linear_projection=True,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512,
    )
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
        hidden_act="gelu", projection_dim=512, bos_token_id=49406, eos_token_id=49407, pad_token_id=0,
    ))
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tok = clip_tokenizer(Path(tmp))
    pipe = StableDiffusionInpaintPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=scheduler,
                                          safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return pipe, Logits(resnet50()), get_spec("resnet50").preprocess, image_size


def skip_vs_exact(inp: Inpainter, energy: EnergyLoss, image, seeds) -> list[float]:
    """cos(dL/du, dL/d eps) with u = z_0 / scaling_factor, the second by autograd through every U-Net step (eq. 8)."""
    out = []
    for seed in seeds:
        prep = inp.prepare(image, "leaf, railing", seed)
        skip, *_ = skip_gradient(inp, energy, inp.denoise(prep, prep.eps))
        eps = prep.eps.clone().requires_grad_(True)
        with torch.enable_grad():
            loss = energy(inp.decode(inp.denoise(prep, eps, grad=True))).sum()
            (exact,) = torch.autograd.grad(loss, eps)
        out.append(float(torch.nn.functional.cosine_similarity(skip.flatten(), exact.flatten(), dim=0)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("tiny", "sd2"), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=20, help="scheduled denoising steps (20 as the paper)")
    parser.add_argument("--images", type=int, default=3, help="timed images per setting (after one warm-up)")
    parser.add_argument("--pipeline", default=None, help="tiny: a trained pipeline folder instead of random init")
    parser.add_argument("--image-size", type=int, default=512, help="sd2: image side (512 as SD2; smaller to check the code)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or ROOT / "benchmarks" / "results" / (
        "synood_synthesis.json" if args.size == "tiny" else f"synood_synthesis-sd2-{args.device.split(':')[0]}.json")
    dev = torch.device(args.device)
    t0 = time.perf_counter()
    pipe, net, pre, size = tiny(args.pipeline) if args.size == "tiny" else sd2(args.image_size)
    pipe = pipe.to(dev)
    pipe.set_progress_bar_config(disable=True)
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        m.requires_grad_(False)
    net = net.to(dev).eval().requires_grad_(False)
    log(f"built {args.size} pipeline in {time.perf_counter() - t0:.1f} s")
    energy = EnergyLoss(net, pre)
    inp = Inpainter(pipe, 0.6, args.steps, 8.0, height=size, width=size)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    results = {}
    for passes in (1, 3):
        synthesize_one(inp, energy, image, "bamboo, leaf, railing", 0, iterations=passes)  # warm-up
        sync()
        times, drops = [], []
        for k in range(args.images):
            t = time.perf_counter()
            r = synthesize_one(inp, energy, image, "bamboo, leaf, railing", k + 1, iterations=passes)
            sync()
            times.append(time.perf_counter() - t)
            drops.append(r.losses[0] - r.losses[-1])
        results[f"iterations_{passes}"] = {"seconds_per_image": float(np.median(times)), "times": times,
                                      "energy_loss_drop": drops}
        log(f"iterations {passes}: {np.median(times):.3f} s per image")
    cos = skip_vs_exact(inp, energy, image, range(3)) if args.size == "tiny" else None
    if dev.type == "cuda":
        results["peak_cuda_bytes"] = torch.cuda.max_memory_allocated()
    load = os.getloadavg()[0]
    meta = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "load_average_1min": load,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d"),
        "size": args.size,
        "image_size": size,
        "pipeline": args.pipeline or "random init",
        "settings": {"strength": 0.6, "steps": args.steps, "guidance": 8.0, "step_size": 10.0},
    }
    r0, r3 = results["iterations_1"]["seconds_per_image"], results["iterations_3"]["seconds_per_image"]
    print(f"SynOOD synthesis, {args.size} pipeline at {size}x{size} on {meta['device']} "
          f"(strength 0.6, {args.steps} steps, CFG 8):")
    print(f"  plain inpainting (--iterations 1): {r0:8.3f} s/image")
    print(f"  SynOOD (--iterations 3):           {r3:8.3f} s/image  ({r3 / r0:.2f}x)")
    if cos is not None:
        results["cos_skip_vs_exact_gradient"] = cos
        print(f"  cos(skip gradient dL/du, exact dL/d eps): {', '.join(f'{c:.3f}' for c in cos)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, **results}, indent=2))
    print(f"saved {out} (machine load average {load:.1f})")


if __name__ == "__main__":
    main()
