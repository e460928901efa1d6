"""A tiny Stable-Diffusion inpainting pipeline for the offline digits demo and the tests.

The same diffusers classes as ``stabilityai/stable-diffusion-2-inpainting`` (AutoencoderKL,
UNet2DConditionModel with 9 input channels = latents + mask + masked-image latents, a
CLIPTextModel with a CLIPTokenizer, a DDIM scheduler with SD's beta schedule), only
small: 32x32 RGB images, 8x8x4 latents. So the SynOOD code path that drives SD2 runs
unchanged on it. The tokenizer is OpenAI CLIP's BPE, rebuilt offline from the vocabulary
open_clip ships (``bpe_simple_vocab_16e6.txt.gz``), so no hub download is needed.

``train_tiny_inpainting`` fits it on the digits train images in about a minute on a CPU:
first the VAE (reconstruction + a small KL term), then the U-Net (epsilon prediction,
SD's inpainting recipe: random masks, a quarter of them all-ones, the masked image's
latents as conditioning) jointly with the text encoder on captions such as
"a photo of the digit three" (10% empty captions, for classifier-free guidance).
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from oodcli.errors import OodError, UsageError

IMAGE_SIZE = 32
LATENT_FACTOR = 4  # the digits are 8x8 images upsampled to 32x32: 8x8x4 latents lose nothing
CAPTION = "a photo of the digit {}"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


@lru_cache(maxsize=1)
def _clip_bpe() -> tuple[dict[str, int], list[str]]:
    """OpenAI CLIP's vocabulary (49408 tokens) and merges, built as its tokenizer builds them."""
    import importlib.util

    spec = importlib.util.find_spec("open_clip")  # the file only; importing open_clip would pull in timm
    if spec is None or not spec.submodule_search_locations:
        raise OodError("the CLIP tokenizer's vocabulary comes with open_clip_torch; install it")
    path = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(path).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}, merges


def clip_tokenizer(folder: Path):
    """A ``CLIPTokenizer`` with CLIP's BPE, its files written to ``folder``."""
    from transformers import CLIPTokenizer

    vocab, merges = _clip_bpe()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def build_tiny_pipeline(seed: int = 0, work_dir: Path | None = None):
    """A random-initialised ``StableDiffusionInpaintPipeline`` for 32x32 images."""
    import tempfile

    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionInpaintPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8, sample_size=IMAGE_SIZE,
    )
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // LATENT_FACTOR, in_channels=9, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=64,
        attention_head_dim=8, norm_num_groups=16,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=64, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    ))
    scheduler = DDIMScheduler(  # Stable Diffusion's schedule
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = clip_tokenizer(Path(work_dir or tmp) / "tokenizer")
    return StableDiffusionInpaintPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def load_pipeline(source: str | Path, device=None):
    """``StableDiffusionInpaintPipeline.from_pretrained`` of a hub id or a save_pretrained folder,
    in float32 on every device: the energy gradient runs back through the VAE decoder, where
    float16 overflows easily (SD2: 5 GB of weights, which a GPU holds in float32 anyway).
    A missing or broken source is one clear error."""
    from diffusers import StableDiffusionInpaintPipeline
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()  # the CLI draws its own progress
    device = torch.device(device or "cpu")
    dtype = torch.float32
    local = Path(source).expanduser()
    if local.exists() and not (local / "model_index.json").is_file():
        raise OodError(f"--pipeline {source} is not a diffusers pipeline folder (no model_index.json)")
    try:
        pipe = StableDiffusionInpaintPipeline.from_pretrained(
            str(local) if local.exists() else str(source), dtype=dtype, safety_checker=None,
            requires_safety_checker=False, low_cpu_mem_usage=False,  # True needs accelerate, and says so at length
        )
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OodError(f"cannot load the inpainting pipeline '{source}': {first}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


# ---- training on digits ------------------------------------------------------------------------


@dataclass
class DiffusionTrainResult:
    path: str
    vae_steps: int
    unet_steps: int
    vae_loss: float
    unet_loss: float
    scaling_factor: float
    seconds: float  # data, model building and training; saving and the preview not counted
    preview: str | None

    def as_dict(self) -> dict:
        return asdict(self)


def _digit_tensors(benchmark: str, root) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    from oodcli.data.base import open_source
    from oodcli.data.benchmarks import get_benchmark

    bench = get_benchmark(benchmark)
    names = bench.resolve_prompt_names()
    data = open_source(bench.split("train").source, root)
    arr = np.stack([np.asarray(data.load(i).convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE))) for i in range(len(data))])
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # the pipeline's [-1, 1]
    return x, torch.as_tensor(np.asarray(data.labels), dtype=torch.long), list(names)


def random_masks(n: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """[n, 1, size, size] in {0, 1} (1 = repaint): a quarter all-ones (SynOOD's mask), the rest
    one random rectangle, as SD's inpainting fine-tuning does."""
    masks = torch.zeros(n, 1, size, size)
    for i in range(n):
        if torch.rand((), generator=gen) < 0.25:
            masks[i] = 1
            continue
        h, w = (torch.randint(size // 4, size + 1, (2,), generator=gen)).tolist()
        y, x = torch.randint(0, size - h + 1, (), generator=gen).item(), torch.randint(0, size - w + 1, (), generator=gen).item()
        masks[i, :, y : y + h, x : x + w] = 1
    return masks


def _budget(steps: int | None, seconds: float | None, t0: float, done: int) -> bool:
    if steps is not None and done >= steps:
        return False
    if seconds is not None and time.perf_counter() - t0 >= seconds:
        return False
    return True


def train_tiny_inpainting(
    out: str | Path,
    seconds: float | None = None,
    steps: int | None = 150,
    batch_size: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
    benchmark: str = "digits",
    data_root_dir: str | None = None,
    preview: str | Path | None = "auto",
    log=None,
) -> DiffusionTrainResult:
    """Train the tiny pipeline on the benchmark's ID train images and save it with save_pretrained.

    ``steps`` caps each stage's optimiser steps (150: about 80 s on two CPU cores, and the
    same pipeline on every machine); ``seconds`` adds a time budget (a third to the VAE, the
    rest to the U-Net), whichever ends first. The folder is written beside
    ``out`` and renamed into place, so ``out`` is the old pipeline or the new one, whole.
    """
    from oodcli.data.base import data_root

    out = Path(out)
    if out.exists() and not (out.is_dir() and (out / "model_index.json").is_file()):
        raise UsageError(f"--out {out} exists and is not a pipeline folder; pick a new path")
    if seconds is None and steps is None:
        raise UsageError("give --seconds or --steps")
    t0 = time.perf_counter()
    x, y, names = _digit_tensors(benchmark, data_root(data_root_dir))
    pipe = build_tiny_pipeline(seed)
    gen = torch.Generator().manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model's ops are too small to split; extra threads only spin
    try:
        vae_steps, vae_loss = _train_vae(pipe.vae, x, batch_size, lr, gen, steps, None if seconds is None else seconds / 3, log)
        pipe.vae.eval()
        with torch.no_grad():
            lat = torch.cat([pipe.vae.encode(x[i : i + 256]).latent_dist.mode() for i in range(0, len(x), 256)])
        scaling = float(1.0 / lat.std())
        pipe.vae.register_to_config(scaling_factor=scaling)
        left = None if seconds is None else max(seconds - (time.perf_counter() - t0), 1.0)
        unet_steps, unet_loss = _train_unet(pipe, x, lat * scaling, y, names, batch_size, lr, gen, steps, left, log)
        pipe.unet.eval()
        pipe.text_encoder.eval()
        seconds_trained = time.perf_counter() - t0
        _save_atomically(pipe, out)
        shown = None
        if preview is not None:
            shown = Path(str(out).rstrip("/") + "-samples.png") if preview == "auto" else Path(preview)
            save_preview(pipe, x, y, names, shown, seed)
    finally:
        torch.set_num_threads(threads)
    return DiffusionTrainResult(str(out), vae_steps, unet_steps, vae_loss, unet_loss, scaling,
                                seconds_trained, None if shown is None else str(shown))


def _train_vae(vae, x, batch_size, lr, gen, steps, seconds, log) -> tuple[int, float]:
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    vae.train()
    t0, done, ema = time.perf_counter(), 0, None
    while _budget(steps, seconds, t0, done):
        idx = torch.randint(0, len(x), (batch_size,), generator=gen)
        post = vae.encode(x[idx]).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        loss = F.l1_loss(rec, x[idx]) + 0.5 * F.mse_loss(rec, x[idx]) + 1e-5 * post.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        done += 1
        ema = loss.item() if ema is None else 0.9 * ema + 0.1 * loss.item()
        if log and done % 25 == 0:
            log(f"vae step {done}  loss {ema:.4f}")
    return done, float(ema or 0.0)


def _train_unet(pipe, x, latents, y, names, batch_size, lr, gen, steps, seconds, log) -> tuple[int, float]:
    """``latents``: every image's scaled VAE latent, encoded once; only partly masked images
    are encoded per step (an all-ones mask leaves a black image, whose latent is fixed)."""
    vae, unet, text, tok, sched = pipe.vae, pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.scheduler
    sf = vae.config.scaling_factor
    with torch.no_grad():
        black = vae.encode(torch.zeros(1, *x.shape[1:])).latent_dist.mode() * sf
    captions = [CAPTION.format(n) for n in names] + [""]
    ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    unet.train()
    text.train()
    t0, done, ema = time.perf_counter(), 0, None
    while _budget(steps, seconds, t0, done):
        idx = torch.randint(0, len(x), (batch_size,), generator=gen)
        img = x[idx]
        masks = random_masks(batch_size, IMAGE_SIZE, gen)
        z0 = latents[idx]
        masked = black.expand_as(z0).clone()
        part = masks.flatten(1).amin(1) < 1
        if part.any():
            with torch.no_grad():
                masked[part] = vae.encode(img[part] * (masks[part] < 0.5)).latent_dist.mode() * sf
        m = F.interpolate(masks, size=z0.shape[-2:])
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch_size,), generator=gen)
        zt = sched.add_noise(z0, noise, t)
        which = y[idx].clone()
        which[torch.rand(batch_size, generator=gen) < 0.1] = len(names)  # empty caption
        cond = text(ids[which])[0]
        pred = unet(torch.cat([zt, m, masked], dim=1), t, encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        done += 1
        ema = loss.item() if ema is None else 0.9 * ema + 0.1 * loss.item()
        if log and done % 25 == 0:
            log(f"unet step {done}  loss {ema:.4f}")
    return done, float(ema or 0.0)


def _save_atomically(pipe, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial")
    old = out.with_name(f".{out.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    pipe.save_pretrained(str(tmp), safe_serialization=True)
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


@torch.no_grad()
def save_preview(pipe, x: torch.Tensor, y: torch.Tensor, names: list[str], path: Path, seed: int = 0) -> Path:
    """A PNG grid: rows of (source image, its inpainting with the all-ones mask at strength 0.6,
    a pure text-to-image sample of the same class), upscaled 4x to be visible."""
    from PIL import Image

    from oodcli.outputs import atomic_write

    pipe.set_progress_bar_config(disable=True)
    mask = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 255)
    rows = []
    for c in range(len(names)):
        i = int((y == c).nonzero()[0])
        src = Image.fromarray(((x[i].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy())
        kw = dict(prompt=CAPTION.format(names[c]), image=src, mask_image=mask, num_inference_steps=20,
                  height=IMAGE_SIZE, width=IMAGE_SIZE)
        inpaint = pipe(strength=0.6, generator=torch.Generator().manual_seed(seed + c), **kw).images[0]
        fresh = pipe(strength=1.0, generator=torch.Generator().manual_seed(seed + c), **kw).images[0]
        rows.append([src, inpaint, fresh])
    grid = Image.new("RGB", (3 * IMAGE_SIZE * 4, len(rows) * IMAGE_SIZE * 4))
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            grid.paste(im.resize((IMAGE_SIZE * 4, IMAGE_SIZE * 4), Image.NEAREST), (c * IMAGE_SIZE * 4, r * IMAGE_SIZE * 4))
    return atomic_write(Path(path), lambda tmp: grid.save(tmp, format="PNG"))
