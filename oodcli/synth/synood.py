"""SynOOD's near-boundary OOD images: energy-guided diffusion inpainting (paper 003, sec. 3.3).

Each picked ID image x_in is inpainted with the all-ones mask M at strength 0.6 over 20
DDIM-style steps (eq. 4-6), prompted with its context labels (what else is in the image,
the main object left out, e.g. "bamboo, leaf, railing"), so the object is repainted
into something else. The initial noise epsilon is then refined for a few iterations by
the energy loss of a classifier g on the synthesized image (eq. 7-10).

Reading of the paper where it is open:

* Loss (eq. 7): the paper writes ``L = m_out - tau * logsumexp(g(x_syn) / tau)``, linear;
  descending that raises logsumexp, i.e. makes the image *more* ID-like, and leaves m_out
  without effect, against the paper's own narrative (the subject is replaced, the image
  "shifts away from the core theme") and its description of m_out as "the OOD threshold ...
  as used in [3]" (Liu et al.'s energy hinge). Two readings that push towards OOD:
  ``loss="authors"`` (the default, because it made the paper's numbers: the authors'
  ``--method energy``): s = mean_i g_i - logsumexp(g), which is -CE(uniform, softmax g),
  and L = (m_out - s)^2 with m_out = -5; for C classes s <= -log C (-6.9 for ImageNet), so
  descent flattens the softmax (raises the energy) and m_out sets the pull's strength.
  ``loss="energy-hinge"``: Liu et al.'s OOD term, L = max(0, m_out - E(x))^2 with
  E = -tau * logsumexp(g / tau) and Liu's m_out = -7: a confident image (E << m_out) has its
  energy raised until it reaches the OOD threshold m_out, then no more. ``tau`` = 1 (the
  authors use none; with tau != 1, s = mean g - tau * logsumexp(g / tau)). The manifest keeps
  the loss and E before (plain inpainting) and after (the saved image) per image.
* Skip gradient (eq. 9-10): we take the gradient of L with respect to the final denoised
  latent in the decoder's scale, u = z_0 / scaling_factor (through the VAE decoder h, the
  differentiable torch version of g's preprocessing and g itself), as the authors do, and let
  it stand in for the gradient with respect to epsilon: the U-Net chain's Jacobian is
  skipped, i.e. treated as rho * I. The update is ``epsilon := epsilon - r*rho * dL/du`` with
  r*rho = 10 (``step_size``, sec. 4.1); dL/dz_0 would be 1/scaling_factor (5.5x for SD2)
  larger. The authors' script averages the loss over its batch of 2, which halves each
  image's step; ``step_size=5`` reproduces their per-image update exactly.
* Passes (sec. 4.1, "the inpainting process iterates 3 times"): ``iterations`` = 3
  inpaintings in total, each from the current epsilon, with 2 noise updates between them;
  the saved image is that of the last pass (as in the authors' loop, whose third gradient is
  never used). "Energy loss before" is that of the plain inpainting (pass 1), "after" that of
  the saved image (both on the decoded float image, before the 8-bit PNG rounding).
* The loop below is the inpainting pipeline's own ``__call__`` taken apart (its
  encode_prompt, prepare_latents, prepare_mask_latents, get_timesteps, scheduler.step,
  vae, image processor), because the pipeline's ``latents=`` argument is taken as
  full-strength noise, which is wrong at strength 0.6. With refinement off it makes the
  same image as the pipeline with the same seed (a test checks this): the random draws
  come in the pipeline's order (VAE posterior sample of x_in, then epsilon, then the
  masked-image posterior sample).
* Does the skip gradient descend? On the trained digits pipeline the cosine between dL/dz_0
  and the exact dL/d epsilon (autograd through all U-Net steps) was 0.86-0.89
  (benchmarks/synood_synthesis.py, measured with the earlier linear loss); a large step can
  overshoot where the exact Jacobian is far from rho * I, so L is not always monotone.
* Classifier-free guidance 8 (the authors' default; the paper does not say). Prompt: the
  authors' "A photo only remain {labels}." with the context labels cut to 73 characters
  (``prompt_template``; "{labels}" gives the bare labels).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from oodcli.errors import OodError, UsageError

RUN_FILE = "synood-run.json"
MANIFEST = "manifest.jsonl"
DEFAULT_PIPELINE = "stabilityai/stable-diffusion-2-inpainting"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class Settings:
    """Everything that decides the images; a folder holds the images of one Settings only."""

    mode: str = "inpaint"  # or "neg-image" (text-to-image from word prompts, Table 4's ablation)
    from_split: str = "train"
    per_class: int = 1
    strength: float = 0.6
    steps: int = 20
    guidance: float = 8.0  # the authors' default
    iterations: int = 3  # inpainting passes in total ("iterates 3 times"): 2 noise updates
    step_size: float = 10.0  # r * rho of eq. 10
    loss: str = "authors"  # or "energy-hinge"
    m_out: float | None = None  # None: the loss's default (authors -5, energy-hinge -7)
    tau: float = 1.0
    prompt_template: str = "A photo only remain {labels}."  # the authors'; "{labels}" = the labels alone
    seed: int = 0

    def check(self) -> "Settings":
        if self.mode not in ("inpaint", "neg-image"):
            raise UsageError(f"unknown --mode '{self.mode}'; use inpaint or neg-image")
        if not 0.0 < self.strength <= 1.0:
            raise UsageError(f"--strength must be in (0, 1]; got {self.strength}")
        if self.steps < 1 or int(self.steps * self.strength) < 1:
            raise UsageError(f"--steps {self.steps} at --strength {self.strength} leaves no denoising step")
        if self.per_class < 1:
            raise UsageError("--per-class must be at least 1")
        if self.iterations < 1:
            raise UsageError("--iterations must be at least 1 (1 = plain inpainting)")
        if self.tau <= 0:
            raise UsageError("--tau must be positive")
        if self.loss not in LOSSES:
            raise UsageError(f"unknown --loss '{self.loss}'; use {' or '.join(LOSSES)}")
        if self.prompt_template.count("{labels}") != 1:
            raise UsageError("--prompt-template needs exactly one '{labels}'")
        return self if self.m_out is not None else replace(self, m_out=M_OUT[self.loss])

    def prompt(self, labels: list[str]) -> str:
        """The inpainting prompt: the template around the comma-joined labels, cut to 73
        characters as the authors cut theirs; empty without labels (unconditional inpainting)."""
        return self.prompt_template.replace("{labels}", ", ".join(labels)[:73]) if labels else ""


# ---- the differentiable pieces ------------------------------------------------------------------


def preprocess_tensor(x01, pre):
    """``Preprocess.to_transform`` (resize shorter side, centre crop, normalise) on a float
    tensor in [0, 1], differentiably, so the loss gradient reaches the decoded image."""
    import torch
    import torch.nn.functional as F

    h, w = x01.shape[-2:]
    if getattr(pre, "resize_mode", "shortest") == "squash" and (h, w) != (pre.resize, pre.resize):
        x01 = F.interpolate(x01, size=(pre.resize, pre.resize), mode=pre.interpolation, align_corners=False,
                            antialias=True)
        h, w = pre.resize, pre.resize
    if min(h, w) != pre.resize:
        if h <= w:
            size = (pre.resize, int(pre.resize * w / h))
        else:
            size = (int(pre.resize * h / w), pre.resize)
        x01 = F.interpolate(x01, size=size, mode=pre.interpolation, align_corners=False, antialias=True)
        h, w = size
    top, left = int(round((h - pre.crop) / 2.0)), int(round((w - pre.crop) / 2.0))
    x = x01[..., top : top + pre.crop, left : left + pre.crop]
    mean = torch.tensor(pre.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(pre.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


LOSSES = ("authors", "energy-hinge")
M_OUT = {"authors": -5.0, "energy-hinge": -7.0}  # each loss's m_out default


class EnergyLoss:
    """Eq. 7 on a decoded image in the pipeline's [-1, 1] range: one loss per image.

    ``authors`` (default): the authors' ``--method energy``, L = (m_out - s)^2 with
    s = mean_i g_i - tau * logsumexp(g / tau) (= -CE(uniform, softmax g) at tau = 1), m_out = -5.
    ``energy-hinge``: Liu et al.'s OOD hinge, L = max(0, m_out - E)^2 with E = -tau * logsumexp(g / tau),
    m_out = -7. Both raise a confident image's energy (flatter softmax) towards the threshold m_out."""

    def __init__(self, net, preprocess, m_out: float | None = None, tau: float = 1.0, loss: str = "authors"):
        if loss not in LOSSES:
            raise UsageError(f"unknown --loss '{loss}'; use {' or '.join(LOSSES)}")
        self.net, self.pre, self.tau, self.loss = net, preprocess, tau, loss
        self.m_out = M_OUT[loss] if m_out is None else m_out

    def logits(self, x):
        x01 = (x.float() / 2 + 0.5).clamp(0, 1)  # what the pipeline's postprocess keeps
        return self.net.forward_layers(preprocess_tensor(x01, self.pre), ("logits",))["logits"]

    def energy(self, logits):
        """E(x) = -tau * logsumexp(g / tau): low for ID, high for OOD (Liu et al.)."""
        import torch

        return -self.tau * torch.logsumexp(logits / self.tau, dim=1)

    def from_logits(self, logits):
        import torch

        energy = self.energy(logits)
        if self.loss == "authors":
            return (self.m_out - (logits.mean(dim=1) + energy)) ** 2
        return torch.relu(self.m_out - energy) ** 2

    def __call__(self, x):
        return self.from_logits(self.logits(x))


@dataclass
class Prepared:
    """What one image's inpainting fixes before the loop: prompt embeddings, x_in's latents,
    the mask and masked-image latents, and the initial noise epsilon."""

    prompt_embeds: object
    image_latents: object | None
    mask: object
    masked_latents: object
    eps: object
    generator: object


class Inpainter:
    """StableDiffusionInpaintPipeline's ``__call__`` with the all-ones mask, split so that
    the initial noise can be chosen (eq. 4) and the final latent z_0 is reachable (eq. 6)."""

    def __init__(self, pipe, strength: float = 0.6, steps: int = 20, guidance: float = 8.0,
                 height: int | None = None, width: int | None = None):
        self.pipe, self.strength, self.steps, self.guidance = pipe, strength, steps, guidance
        size = pipe.unet.config.sample_size * pipe.vae_scale_factor
        self.height, self.width = height or size, width or size
        self.device = pipe._execution_device
        self.dtype = pipe.unet.dtype

    @property
    def cfg(self) -> bool:
        return self.guidance > 1 and self.pipe.unet.config.time_cond_proj_dim is None

    def _timesteps(self):
        pipe = self.pipe
        pipe.scheduler.set_timesteps(self.steps, device=self.device)
        timesteps, n = pipe.get_timesteps(self.steps, self.strength, self.device)
        return timesteps

    def prepare(self, image, prompt: str, seed: int) -> Prepared:
        import torch
        from PIL import Image

        pipe = self.pipe
        gen = torch.Generator().manual_seed(int(seed))  # on the CPU: the same noise on every device
        with torch.no_grad():
            pos, neg = pipe.encode_prompt(prompt, self.device, 1, self.cfg, None)
            embeds = torch.cat([neg, pos]) if self.cfg else pos
            timesteps = self._timesteps()
            init = pipe.image_processor.preprocess(image, height=self.height, width=self.width).to(torch.float32)
            mask_image = Image.new("L", (self.width, self.height), 255)
            full = self.strength == 1.0
            outs = pipe.prepare_latents(
                1, pipe.vae.config.latent_channels, self.height, self.width, embeds.dtype, self.device, gen,
                None, image=init, timestep=timesteps[:1], is_strength_max=full, return_noise=True,
                return_image_latents=not full,
            )
            image_latents = None if full else outs[2]
            mask_cond = pipe.mask_processor.preprocess(mask_image, height=self.height, width=self.width)
            mask, masked = pipe.prepare_mask_latents(
                mask_cond, init * (mask_cond < 0.5), 1, self.height, self.width, embeds.dtype, self.device, gen, self.cfg
            )
        return Prepared(embeds, image_latents, mask, masked, outs[1], gen)

    @property
    def scaling(self) -> float:
        return self.pipe.vae.config.scaling_factor

    def denoise(self, prep: Prepared, eps, grad: bool = False):
        """z_0 = gamma(chi(z_in, T, eps), T, P, M) of eq. 4-6; ``grad=True`` keeps the whole
        U-Net chain's graph (the exact eq. 8 gradient, for measuring the skip gradient)."""
        import torch

        pipe = self.pipe
        with torch.set_grad_enabled(grad):
            timesteps = self._timesteps()
            if self.strength == 1.0:
                latents = eps * pipe.scheduler.init_noise_sigma
            else:
                latents = pipe.scheduler.add_noise(prep.image_latents, eps, timesteps[:1])
            extra = pipe.prepare_extra_step_kwargs(prep.generator, 0.0)
            for t in timesteps:
                model_in = torch.cat([latents] * 2) if self.cfg else latents
                model_in = pipe.scheduler.scale_model_input(model_in, t)
                model_in = torch.cat([model_in, prep.mask, prep.masked_latents], dim=1)
                pred = pipe.unet(model_in, t, encoder_hidden_states=prep.prompt_embeds, return_dict=False)[0]
                if self.cfg:
                    uncond, text = pred.chunk(2)
                    pred = uncond + self.guidance * (text - uncond)
                latents = pipe.scheduler.step(pred, t, latents, **extra, return_dict=False)[0]
        return latents

    def decode(self, z0):
        """h(z_0): the VAE decoder, image in [-1, 1]; differentiable when z0 requires grad."""
        return self.pipe.vae.decode(z0 / self.scaling, return_dict=False)[0]

    def to_pil(self, x):
        return self.pipe.image_processor.postprocess(x.detach(), output_type="pil")[0]


def skip_gradient(inpainter: Inpainter, energy: EnergyLoss, z0):
    """(dL/du, L, E) with u = z_0 / scaling_factor, the latent the VAE decoder reads: eq. 9's
    stand-in for dL/d epsilon, through h and g only, in the authors' scale (they divide the
    latents by the scaling factor and differentiate there; dL/dz_0 would be 1/0.18215 = 5.5x larger
    for SD2 at the same r*rho)."""
    import torch

    u = (z0 / inpainter.scaling).detach().requires_grad_(True)
    with torch.enable_grad():
        logits = energy.logits(inpainter.pipe.vae.decode(u, return_dict=False)[0])
        loss = energy.from_logits(logits)
        (grad,) = torch.autograd.grad(loss.sum(), u)
    return grad, loss.detach(), energy.energy(logits.detach())


@dataclass
class Synthesized:
    image: object  # PIL
    losses: list[float] = field(default_factory=list)  # loss of each inpainting pass, [0] = plain inpainting
    eps: object = None  # the noise of the last pass
    energies: list[float] = field(default_factory=list)  # E(x) = -tau * logsumexp(g / tau) of each pass


def synthesize_one(inpainter: Inpainter, energy: EnergyLoss | None, image, prompt: str, seed: int,
                   iterations: int = 3, step_size: float = 10.0) -> Synthesized:
    """One SynOOD image: ``iterations`` inpainting passes, the noise updated (eq. 10) between
    them (so iterations - 1 updates); the image of the last pass is kept, as in the authors' loop."""
    import torch

    prep = inpainter.prepare(image, prompt, seed)
    eps, losses, energies = prep.eps, [], []
    for k in range(iterations):
        z0 = inpainter.denoise(prep, eps)
        if k == iterations - 1:
            with torch.no_grad():
                x = inpainter.decode(z0)
                if energy is not None:
                    logits = energy.logits(x)
                    losses.append(float(energy.from_logits(logits)[0]))
                    energies.append(float(energy.energy(logits)[0]))
            return Synthesized(inpainter.to_pil(x), losses, eps, energies)
        grad, loss, e = skip_gradient(inpainter, energy, z0)
        losses.append(float(loss[0]))
        energies.append(float(e[0]))
        eps = (eps - step_size * grad).to(eps.dtype)
    raise UsageError("--iterations must be at least 1")


# ---- inputs: the split's images and their context labels -----------------------------------------


def read_context_labels(path: Path) -> tuple[dict[int, list[str]], dict]:
    """``{"id": <split image id>, "labels": [...]}`` per line -> ({id: labels}, who made them).

    Who made them: a line without "id" (a header), or keys besides id/labels that every
    line shares with one value (e.g. "provider", "model")."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--context-labels {path} not found")
    labels: dict[int, list[str]] = {}
    header: dict = {}
    shared: dict | None = None
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise UsageError(f"--context-labels {path} line {n} is not JSON") from None
            if not isinstance(row, dict):
                raise UsageError(f"--context-labels {path} line {n} is not a JSON object")
            if "id" not in row:
                header.update(row)
                continue
            words = row.get("labels")
            if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
                raise UsageError(f"--context-labels {path} line {n}: 'labels' must be a list of strings")
            try:
                labels[int(row["id"])] = [w.strip() for w in words if w.strip()]
            except (TypeError, ValueError):
                raise UsageError(f"--context-labels {path} line {n}: id {row['id']!r} is not an integer") from None
            extra = {k: v for k, v in row.items() if k not in ("id", "labels")}
            shared = extra if shared is None else {k: v for k, v in shared.items() if extra.get(k) == v}
    if not labels:
        raise UsageError(f"--context-labels {path} has no {{\"id\": ..., \"labels\": [...]}} lines")
    return labels, {**(shared or {}), **header}


@dataclass
class Item:
    file: str
    seed: int
    prompt: str
    labels: list[str]
    source_row: int | None = None
    source_id: int | None = None
    source_class: int | None = None


def source_rows(data, ids: np.ndarray, labels: np.ndarray, per_class: int, progress=None) -> np.ndarray:
    """The images to inpaint: D_in*'s rule (``oodcli.train.synood.complex_rows``, JPEG bytes per
    pixel), m = per_class x classes, so each synthetic image pairs one-to-one with an image of
    the D_in* that ``train synood`` draws for the same m (the authors inpaint exactly their
    cleaned top-50 files and take the same files as D_in*). Sorted rows."""
    from oodcli.train.synood import complex_rows, jpeg_bytes_per_pixel

    rows = np.flatnonzero(labels >= 0)
    complexity = np.array([jpeg_bytes_per_pixel(data, int(ids[r])) for r in rows], np.float64)
    m = per_class * len(np.unique(labels[rows]))
    return rows[complex_rows(complexity, labels[rows], m)]


def _split_items(store_path: Path, settings: Settings, context: dict[int, list[str]] | None, data_root_dir):
    """The picked images of the split (reopened through the split's recorded source) and what
    identifies the split's data."""
    from oodcli.data.base import data_root, open_source
    from oodcli.store import open_store, split_is_whole, split_node

    split = settings.from_split
    with open_store(store_path, "r") as st:
        if not split_is_whole(st, split):
            raise UsageError(f"store {store_path} has no whole split '{split}'; extract it first")
        attrs = st.node_attrs(split_node(split))
        labels = st.read(f"{split_node(split)}/labels")
        ids = st.read(f"{split_node(split)}/ids")
    if "source" not in attrs:
        raise OodError(f"split '{split}' records no data source to read its images from")
    data = open_source(attrs["source"], data_root(data_root_dir), is_ood=False)
    if data.identity() != attrs.get("data"):
        raise OodError(f"the images at {attrs['source']} are not the ones split '{split}' was extracted from; "
                       "check --data-root")
    if context is not None:
        unknown = sorted(set(context) - set(int(i) for i in ids))
        if unknown:
            more = f" (+{len(unknown) - 3} more)" if len(unknown) > 3 else ""
            raise UsageError(f"--context-labels names ids not in split '{split}': "
                             f"{', '.join(map(str, unknown[:3]))}{more}; were they made for another split?")
    rows = source_rows(data, ids, labels, settings.per_class)
    if not len(rows):
        raise UsageError(f"split '{split}' has no labelled ID images to pick from")
    if context is not None:
        missing = [int(ids[r]) for r in rows if int(ids[r]) not in context]
        if missing:
            raise UsageError(f"--context-labels has no labels for {len(missing)} of the {len(rows)} images to inpaint "
                             f"(the most complex per class, as D_in*; e.g. id {missing[0]}); make them with "
                             f"'oodcli synthesize context-labels --per-class {settings.per_class}' or for the whole split")
    items = []
    for r in rows:
        sid, c = int(ids[r]), int(labels[r])
        words = (context or {}).get(sid, [])
        items.append(Item(file=f"synood_c{c}_id{sid}.png", seed=settings.seed * 1_000_003 + sid,
                          prompt=settings.prompt(words), labels=words, source_row=int(r), source_id=sid, source_class=c))
    return items, data, {"path": str(Path(store_path).resolve()), "split": split, "source": attrs["source"],
                         "data": attrs.get("data")}


def _word_items(path: Path, settings: Settings):
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--prompt-words {path} not found")
    words = [w.strip() for w in path.read_text(encoding="utf-8").splitlines() if w.strip() and not w.startswith("#")]
    if not words:
        raise UsageError(f"--prompt-words {path} has no words")
    items = []
    for w, word in enumerate(words):
        for k in range(settings.per_class):
            items.append(Item(file=f"negimage_w{w}_{k}.png", seed=settings.seed * 1_000_003 + w * 1000 + k,
                              prompt=word, labels=[word]))
    return items


# ---- the output folder -----------------------------------------------------------------------------


def pipeline_identity(pipeline: str) -> str:
    from oodcli.backbones.spec import sha256_dir

    local = Path(pipeline).expanduser()
    if local.is_dir():
        return f"dir:{local.name}:sha256={sha256_dir(local)}"
    return f"hub:{pipeline}"


def _check_folder(out_dir: Path, record: dict) -> set[str]:
    """Refuse a folder holding another run's images; return the files already finished."""
    from oodcli.outputs import atomic_write, check_output_folder

    check_output_folder(out_dir, "--out-dir")
    run_file = out_dir / RUN_FILE
    if run_file.is_file():
        try:
            old = json.loads(run_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise OodError(f"{run_file} is damaged; use a new --out-dir") from None
        differs = [key for key in ("settings", "pipeline", "classifier", "source", "context_labels")
                   if old.get(key) != record[key]]
        if not differs:
            return _finished(out_dir)
        if _holds_images(out_dir):
            raise UsageError(
                f"--out-dir {out_dir} holds another run's images (its {differs[0]} differs); "
                "use a new --out-dir or the same settings to resume"
            )
        # a run that made no image (e.g. its pipeline could not be loaded): this one starts afresh
    elif _holds_images(out_dir):
        raise UsageError(f"--out-dir {out_dir} already holds images of something else; use a new folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(run_file, lambda tmp: tmp.write_text(json.dumps(record, indent=2), encoding="utf-8"))
    return set()


def _holds_images(out_dir: Path) -> bool:
    """Any image file, or a manifest with a line in it."""
    if not out_dir.is_dir():
        return False
    manifest = out_dir / MANIFEST
    return (any(p.suffix.lower() in IMAGE_SUFFIXES for p in out_dir.iterdir())
            or (manifest.is_file() and manifest.stat().st_size > 0))


def _finished(out_dir: Path) -> set[str]:
    """Files with a whole manifest line and their image on disk; a torn last line is dropped."""
    path = out_dir / MANIFEST
    if not path.is_file():
        return set()
    good, done = [], set()
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and (out_dir / str(row.get("file"))).is_file() and row["file"] not in done:
            good.append(line)
            done.add(row["file"])
    text = "".join(g + "\n" for g in good)
    if text != path.read_text(encoding="utf-8"):
        from oodcli.outputs import atomic_write

        atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return done


def _append_line(path: Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


# ---- the run -----------------------------------------------------------------------------------


def synthesize_synood(
    out_dir: str | Path,
    store: str | Path | None = None,
    settings: Settings = Settings(),
    pipeline: str = DEFAULT_PIPELINE,
    classifier: str = "resnet50",
    classifier_weights: str | None = None,
    context_labels: str | Path | None = None,
    prompt_words: str | Path | None = None,
    device: str = "auto",
    data_root_dir: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Write SynOOD images, ``manifest.jsonl`` and the run record into ``out_dir``; resumable.

    ``progress(done, total)`` is called as images finish. Returns a summary dict."""
    from oodcli.backbones.base import get_spec
    from oodcli.extraction import check_device

    settings = settings.check()
    if settings.mode == "neg-image":  # Table 4's "Neg Image": plain text-to-image, nothing refined
        settings = replace(settings, strength=1.0, iterations=1)
    check_device(device)
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    spec = get_spec(classifier).for_weights(classifier_weights)
    if "logits" not in spec.layers:  # the energy loss is reported even without refinement
        raise UsageError(f"--classifier {classifier} has no logits layer; pick a classifier backbone")
    record = {
        "method": "synood",
        "settings": asdict(settings),
        "pipeline": pipeline_identity(pipeline),
        "classifier": {"backbone": spec.name, "weights": spec.weights_identity(classifier_weights),
                       "preprocess": json.loads(json.dumps(spec.preprocess.describe()))},
        "source": None,
        "context_labels": None,
        # where to load them again; not compared on resume (the identities above are)
        "pipeline_source": str(Path(pipeline).expanduser().resolve()) if Path(pipeline).expanduser().is_dir() else pipeline,
        "classifier_weights_source": classifier_weights,
    }
    data = None
    if settings.mode == "inpaint":
        if store is None:
            raise UsageError("--store is needed to pick the ID images to inpaint")
        context, made_by = (None, None)
        if context_labels is not None:
            from oodcli.backbones.spec import sha256_file

            context, made_by = read_context_labels(Path(context_labels))
            record["context_labels"] = {"file": Path(context_labels).name, "sha256": sha256_file(Path(context_labels)),
                                        "made_by": made_by or None}
        items, data, record["source"] = _split_items(Path(store), settings, context, data_root_dir)
    else:
        if prompt_words is None:
            raise UsageError("--mode neg-image needs --prompt-words FILE (one word per line)")
        from oodcli.backbones.spec import sha256_file

        items = _word_items(Path(prompt_words), settings)
        record["source"] = {"prompt_words": Path(prompt_words).name, "sha256": sha256_file(Path(prompt_words))}
    done = _check_folder(out_dir, record)
    todo = [it for it in items if it.file not in done]
    summary = {"out_dir": str(out_dir), "images": len(items), "skipped": len(items) - len(todo), "written": 0}
    if todo:  # the bar appears once the models are loaded (a pipeline that fails to load: one line)
        _run(todo, data, out_dir, settings, pipeline, spec, classifier_weights, device, summary, progress, len(items))
    elif progress:
        progress(summary["skipped"], len(items))
    summary["seconds"] = time.perf_counter() - t0
    summary.update(_loss_means(out_dir))
    return summary


def _run(todo, data, out_dir, settings, pipeline, spec, weights, device, summary, progress, total):
    from PIL import Image

    from oodcli.extraction import resolve_device
    from oodcli.outputs import atomic_write
    from oodcli.synth.tiny_diffusion import load_pipeline

    dev = resolve_device(device)
    pipe = load_pipeline(pipeline, dev)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)
    net = spec.build(weights).to(dev).eval().requires_grad_(False)
    energy = EnergyLoss(net, spec.preprocess, settings.m_out, settings.tau, settings.loss)
    inpainter = Inpainter(pipe, settings.strength, settings.steps, settings.guidance)
    if progress:
        progress(summary["skipped"], total)
    blank = Image.new("RGB", (inpainter.width, inpainter.height))
    for it in todo:
        image = data.load(it.source_id) if data is not None else blank
        result = synthesize_one(inpainter, energy, image, it.prompt, it.seed, settings.iterations, settings.step_size)
        atomic_write(out_dir / it.file, lambda tmp: result.image.save(tmp, format="PNG"))
        _append_line(out_dir / MANIFEST, {
            "file": it.file, "source_split": settings.from_split if data is not None else None,
            "source_id": it.source_id, "source_row": it.source_row, "source_class": it.source_class,
            "context_labels": it.labels, "prompt": it.prompt, "seed": it.seed,
            "energy_loss_before": result.losses[0], "energy_loss_after": result.losses[-1],
            "energy_losses": result.losses, "energy_before": result.energies[0], "energy_after": result.energies[-1],
            "energies": result.energies,
        })
        summary["written"] += 1
        if progress:
            progress(summary["skipped"] + summary["written"], total)


def _loss_means(out_dir: Path) -> dict:
    rows = [json.loads(line) for line in (out_dir / MANIFEST).read_text(encoding="utf-8").splitlines() if line.strip()] \
        if (out_dir / MANIFEST).is_file() else []
    if not rows:
        return {}
    before = [r["energy_loss_before"] for r in rows]
    after = [r["energy_loss_after"] for r in rows]
    energy = [(r.get("energy_before"), r.get("energy_after")) for r in rows if r.get("energy_before") is not None]
    means = {"energy_before_mean": float(np.mean([b for b, _ in energy])),
             "energy_after_mean": float(np.mean([a for _, a in energy]))} if energy else {}
    return {**means, "energy_loss_before_mean": float(np.mean(before)), "energy_loss_after_mean": float(np.mean(after)),
            "lowered": int(sum(a < b for a, b in zip(after, before))), "manifest_rows": len(rows)}
