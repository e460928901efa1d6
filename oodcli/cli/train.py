"""``oodcli train ...``: classifier, clip and diffusion (the demo's networks), coop, locoop,
negprompt and iim (prompts), synood (projection and negative labels), apex and palm (prototypes)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from oodcli.cli.common import STATE, _progress, _row_progress, err, out
from oodcli.errors import UsageError

train_app = typer.Typer(help="Train classifiers, heads and prompts from data or the store.", no_args_is_help=True)


@train_app.command("classifier")
def train_classifier(
    out_path: Path = typer.Option(Path("stores/digits_cnn.safetensors"), "--out", "-o", help="Where to save the weights."),
    benchmark: str = typer.Option("digits", "--benchmark", "-b", help="Benchmark whose ID train split is used."),
    model: str = typer.Option("digits_cnn", "--model", "-m", help="Architecture to train (digits_cnn)."),
    epochs: int = typer.Option(30, "--epochs", min=1),
    lr: float = typer.Option(2e-3, "--lr", min=0.0),
    seed: int = typer.Option(0, "--seed"),
    data_root: Optional[str] = typer.Option(None, "--data-root"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Train a small classifier from scratch (the demo's backbone).

    Example:  oodcli train classifier --out stores/digits_cnn.safetensors
    """
    from oodcli.train.classifier import train_classifier as run

    log = None if STATE["quiet"] else (lambda msg: err.print(msg, style="dim"))
    result = run(out_path, benchmark=benchmark, model=model, epochs=epochs, lr=lr, seed=seed,
                 data_root_dir=data_root, log=log)
    if as_json:
        out.print_json(json.dumps(result.as_dict()))
        return
    test = f", test accuracy {100 * result.test_accuracy:.1f}%" if result.test_accuracy is not None else ""
    out.print(
        f"saved {result.path}: train accuracy {100 * result.train_accuracy:.1f}%{test} "
        f"({result.epochs} epochs, {result.seconds:.1f} s)"
    )


@train_app.command("clip")
def train_clip(
    out_path: Path = typer.Option(Path("stores/clip_tiny.safetensors"), "--out", "-o", help="Where to save the weights."),
    benchmark: str = typer.Option("digits", "--benchmark", "-b", help="Benchmark whose ID train split and class names are used."),
    model: str = typer.Option("clip-tiny", "--model", "-m", help="CLIP configuration to train (clip-tiny)."),
    epochs: int = typer.Option(40, "--epochs", min=1),
    lr: float = typer.Option(2e-3, "--lr", min=0.0),
    seed: int = typer.Option(0, "--seed"),
    data_root: Optional[str] = typer.Option(None, "--data-root"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Train the tiny CLIP of the offline demo contrastively on images and class-name captions.

    Example:  oodcli train clip --out stores/clip_tiny.safetensors && oodcli extract --model clip-tiny
    --weights stores/clip_tiny.safetensors --benchmark digits --layers image_embeds,patch_values --store stores/digits_clip.zarr
    """
    from oodcli.train.clip import train_clip as run

    log = None if STATE["quiet"] else (lambda msg: err.print(msg, style="dim"))
    result = run(out_path, benchmark=benchmark, model=model, epochs=epochs, lr=lr, seed=seed,
                 data_root_dir=data_root, log=log)
    if as_json:
        out.print_json(json.dumps(result.as_dict()))
        return
    test = f", test {100 * result.test_accuracy:.1f}%" if result.test_accuracy is not None else ""
    out.print(
        f"saved {result.path}: zero-shot accuracy train {100 * result.train_accuracy:.1f}%{test} "
        f"({result.epochs} epochs, {result.seconds:.1f} s)"
    )


@train_app.command("diffusion")
def train_diffusion(
    out_path: Path = typer.Option(Path("stores/digits_inpaint"), "--out", "-o", help="Pipeline folder to write (save_pretrained, safetensors)."),
    steps: Optional[int] = typer.Option(150, "--steps", min=1, help="Optimiser steps per stage (VAE, then U-Net + text encoder); the same steps give the same pipeline on any machine."),
    seconds: Optional[float] = typer.Option(None, "--seconds", help="Or also: a time budget (a third VAE, the rest U-Net), whichever ends first."),
    batch_size: int = typer.Option(32, "--batch-size", min=1),
    lr: float = typer.Option(2e-3, "--lr", min=0.0),
    seed: int = typer.Option(0, "--seed"),
    benchmark: str = typer.Option("digits", "--benchmark", "-b", help="Benchmark whose ID train images are used."),
    preview: bool = typer.Option(True, "--preview/--no-preview", help="Also save OUT-samples.png: source, inpainting, text-to-image per class."),
    data_root: Optional[str] = typer.Option(None, "--data-root"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Train the tiny Stable-Diffusion inpainting pipeline of the offline demo on digits (SynOOD's generator).

    Example:  oodcli train diffusion --out stores/digits_inpaint && oodcli synthesize synood --pipeline stores/digits_inpaint ...
    """
    from oodcli.synth.tiny_diffusion import train_tiny_inpainting as run

    log = None if STATE["quiet"] else (lambda msg: err.print(msg, style="dim"))
    result = run(out_path, seconds=seconds or None, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                 benchmark=benchmark, data_root_dir=data_root, preview="auto" if preview else None, log=log)
    if as_json:
        out.print_json(json.dumps(result.as_dict()))
        return
    shown = f"; samples {result.preview}" if result.preview else ""
    out.print(f"saved {result.path}: VAE {result.vae_steps} steps (loss {result.vae_loss:.4f}), U-Net "
              f"{result.unet_steps} steps (loss {result.unet_loss:.4f}), {result.seconds:.1f} s{shown}", markup=False)


def _print_prompt_result(result, as_json: bool) -> None:
    if as_json:
        out.print_json(json.dumps(result.as_dict()))
        return
    test = f", ID test {100 * result.test_accuracy:.1f}%" if result.test_accuracy is not None else ""
    out.print(
        f"saved {result.path}: {result.method} on {result.classes} classes x {result.shots} shots, "
        f"loss {result.loss:.4f}, few-shot accuracy {100 * result.accuracy_before:.1f}% -> "
        f"{100 * result.accuracy:.1f}%{test} ({result.epochs} epochs, {result.seconds:.1f} s)",
        markup=False,
    )


def _prompt_trainer(method: str):
    """`train coop` / `train locoop`: stage-one prompt learning on the store's cached CLIP features."""

    def command(
        store_path: Path = typer.Option(..., "--store", "-s", help="Store with the CLIP features of the ID train split."),
        out_path: Path = typer.Option(..., "--out", "-o", help="Prompt file to write (safetensors)."),
        backbone: Optional[str] = typer.Option(None, "--backbone", help="CLIP backbone in the store (default: the only one)."),
        split: str = typer.Option("train", "--split", help="ID split to draw the few shots from."),
        shots: int = typer.Option(16, "--shots", min=1, help="Images per class (1, 2, 4, 8, 16 in the papers); "
                                   "from a split made by 'extract --shots', at most the shots it holds."),
        epochs: int = typer.Option(50, "--epochs", min=1),
        batch_size: int = typer.Option(32, "--batch-size", min=1),
        lr: float = typer.Option(0.002, "--lr", min=0.0),
        n_ctx: int = typer.Option(16, "--n-ctx", min=1, help="Learnable context vectors."),
        ctx_init: Optional[str] = typer.Option(None, "--ctx-init", help="Start from this phrase (e.g. 'a photo of a') instead of N(0, 0.02)."),
        temperature: Optional[float] = typer.Option(None, "--temperature", help="tau of cos/tau (default: the CLIP's own, 0.01 for OpenAI)."),
        train_classes: Optional[str] = typer.Option(None, "--train-classes", help="Train on classes FIRST-LAST only (open vocabulary)."),
        fraction: Optional[float] = typer.Option(None, "--train-class-fraction", help="Train on the first share of classes, e.g. 0.1."),
        labels: Optional[str] = typer.Option(None, "--labels", help="Class names file (one per line); default: the store's benchmark."),
        seed: int = typer.Option(0, "--seed", help="Seed of the few-shot draw and the initialisation."),
        lam: float = typer.Option(0.25, "--lambda", help="LoCoOp: weight of the entropy term.", hidden=method != "locoop"),
        top_k: int = typer.Option(200, "--top-k", help="LoCoOp: a patch is ID-irrelevant when its label is not in its top-K classes.",
                                   hidden=method != "locoop"),
        local_layer: str = typer.Option("patch_values", "--local-layer",
                                        help="LoCoOp: the patch features, 'patch_values' (the last block's value path, as "
                                             "LoCoOp's code) or 'patch_tokens' (final-layer tokens).",
                                        hidden=method != "locoop"),
        precision: str = typer.Option("auto", "--precision", help="Training steps: 'auto' (bfloat16 autocast on CUDA, the "
                                     "context kept float32; float32 on a CPU) or 'fp32' everywhere."),
        as_json: bool = typer.Option(False, "--json"),
    ) -> None:
        from oodcli.train.prompts import train_prompts

        log = None if STATE["quiet"] else (lambda msg: err.print(msg, style="dim", markup=False))
        result = train_prompts(
            method, store_path, out_path, backbone=backbone, split=split, shots=shots, epochs=epochs,
            batch_size=batch_size, lr=lr, n_ctx=n_ctx, ctx_init=ctx_init, temperature=temperature,
            train_classes=train_classes, train_class_fraction=fraction, labels=labels, seed=seed,
            locoop_lambda=lam, locoop_top_k=top_k, local_layer=local_layer, precision=precision, log=log,
        )
        _print_prompt_result(result, as_json)

    return command


train_app.command(
    "coop",
    help="Learn CoOp prompts few-shot on the store's cached CLIP features (the image encoder never runs).\n\n"
    "Example:  oodcli train coop --store stores/digits_clip.zarr --shots 16 --epochs 50 --out coop.safetensors "
    "&& oodcli score coop --store stores/digits_clip.zarr --param coop.prompts=coop.safetensors",
)(_prompt_trainer("coop"))
train_app.command(
    "locoop",
    help="Learn LoCoOp prompts: CoOp plus entropy maximisation on ID-irrelevant patches (needs patch_values).\n\n"
    "Example:  oodcli train locoop --store stores/digits_clip.zarr --shots 16 --top-k 2 --out locoop.safetensors",
)(_prompt_trainer("locoop"))


@train_app.command("negprompt")
def train_negprompt(
    store_path: Path = typer.Option(..., "--store", "-s", help="Store with the CLIP features of the ID train split."),
    positive: Path = typer.Option(..., "--positive", "-p", help="Positive prompts from 'oodcli train coop' (kept frozen)."),
    out_path: Path = typer.Option(..., "--out", "-o", help="Prompt file to write (positive + negative prompts)."),
    backbone: Optional[str] = typer.Option(None, "--backbone"),
    split: str = typer.Option("train", "--split"),
    neg_prompts: int = typer.Option(2, "--neg-prompts", min=1, help="p: negative prompts shared by all classes."),
    shots: Optional[int] = typer.Option(None, "--shots", min=1, help="Default: the positive file's."),
    epochs: int = typer.Option(10, "--epochs", min=1),
    batch_size: int = typer.Option(32, "--batch-size", min=1),
    lr: float = typer.Option(0.002, "--lr", min=0.0),
    beta: float = typer.Option(0.1, "--beta", help="Weight of L_NPD (negative-positive distance)."),
    gamma: float = typer.Option(0.05, "--gamma", help="Weight of L_NND (negative-negative distance)."),
    nis_softmax: str = typer.Option("all", "--nis-softmax",
                                    help="L_NIS's softmax: 'all' positive and negative logits (the authors' code, default) "
                                         "or 'negatives' only (eq. 4 as printed)."),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="tau (default: the CLIP's own)."),
    train_classes: Optional[str] = typer.Option(None, "--train-classes", help="Default: the positive file's classes."),
    fraction: Optional[float] = typer.Option(None, "--train-class-fraction"),
    labels: Optional[str] = typer.Option(None, "--labels"),
    seed: Optional[int] = typer.Option(None, "--seed", help="Default: the positive file's (same few shots)."),
    precision: str = typer.Option("auto", "--precision", help="Training steps: 'auto' (bfloat16 autocast on CUDA, the "
                                 "context kept float32; float32 on a CPU) or 'fp32' everywhere."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Learn NegPrompt's negative prompts against frozen positive prompts (stage two).

    Example:  oodcli train negprompt --store stores/digits_clip.zarr --positive coop.safetensors
    --neg-prompts 2 --epochs 10 --out negprompt.safetensors && oodcli score negprompt
    --store stores/digits_clip.zarr --param negprompt.prompts=negprompt.safetensors
    """
    from oodcli.train.prompts import train_prompts

    log = None if STATE["quiet"] else (lambda msg: err.print(msg, style="dim", markup=False))
    result = train_prompts(
        "negprompt", store_path, out_path, backbone=backbone, split=split, shots=shots, epochs=epochs,
        batch_size=batch_size, lr=lr, temperature=temperature, train_classes=train_classes,
        train_class_fraction=fraction, labels=labels, seed=seed, positive=positive, neg_prompts=neg_prompts,
        beta=beta, gamma=gamma, nis_softmax=nis_softmax, precision=precision, log=log,
    )
    _print_prompt_result(result, as_json)


@train_app.command("iim")
def train_iim(
    store_path: Path = typer.Option(..., "--store", "-s", help="Store with the CLIP patch_values of the ID train split."),
    out_path: Path = typer.Option(..., "--out", "-o", help="Prompt file to write (local + OOD prototype prompts)."),
    backbone: Optional[str] = typer.Option(None, "--backbone", help="CLIP backbone in the store (default: the only one)."),
    split: str = typer.Option("train", "--split", help="ID split to draw the few shots from."),
    shots: int = typer.Option(16, "--shots", min=1, help="Images per class; from a split made by 'extract --shots', "
                              "at most the shots it holds."),
    epochs: int = typer.Option(50, "--epochs", min=1),
    batch_size: int = typer.Option(32, "--batch-size", min=1),
    lr: float = typer.Option(2.5e-4, "--lr", min=0.0),
    n_ctx: int = typer.Option(16, "--n-ctx", min=1, help="L: learnable context vectors per prompt."),
    ctx_init: Optional[str] = typer.Option(None, "--ctx-init", help="Start the local prompts from this phrase instead of N(0, 0.02)."),
    k: int = typer.Option(50, "--k", min=1, help="Top-k positive patches per image; the next k are ID-like OOD patches (2k <= patches)."),
    ood_prompts: int = typer.Option(300, "--ood-prompts", min=1, help="C_n: OOD prototype prompts."),
    lambda_neg: float = typer.Option(5.0, "--lambda-neg", min=0.0, help="Weight of L_neg (eq. 9)."),
    lambda_div: float = typer.Option(0.5, "--lambda-div", min=0.0, help="Weight of L_div (eq. 10)."),
    temperature: float = typer.Option(1.0, "--temperature",
                                      help="T of s = exp(logit_scale * cos / T): tau = T / the CLIP's logit scale (0.01 for OpenAI)."),
    csc: bool = typer.Option(True, "--csc/--no-csc",
                             help="Class-specific local contexts (C x n-ctx vectors, the official default) or one shared context."),
    denominators: str = typer.Option("official", "--denominators",
                                     help="L_pos/L_neg denominators: 'official' (the authors' code, their published numbers) "
                                          "or 'paper' (eq. 8-9 as printed)."),
    local_layer: str = typer.Option("patch_values", "--local-layer",
                                    help="The patch features: 'patch_values' (the last block's value path, as the official "
                                         "code) or 'patch_tokens' (final-layer tokens)."),
    train_classes: Optional[str] = typer.Option(None, "--train-classes", help="Train on classes FIRST-LAST only."),
    fraction: Optional[float] = typer.Option(None, "--train-class-fraction", help="Train on the first share of classes."),
    labels: Optional[str] = typer.Option(None, "--labels", help="Class names file (one per line); default: the store's benchmark."),
    seed: int = typer.Option(0, "--seed", help="Seed of the few-shot draw and the initialisation."),
    precision: str = typer.Option("auto", "--precision", help="Training steps: 'auto' (bfloat16 autocast on CUDA, the "
                                 "context kept float32; float32 on a CPU) or 'fp32' everywhere."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Learn IIM's local prompts and OOD prototype prompts from mined patches (needs patch_values).

    Example:  oodcli train iim --store stores/digits_clip.zarr --shots 16 --k 4 --out iim.safetensors
    && oodcli score s-mcm,s-mcm-star --store stores/digits_clip.zarr -p s-mcm.prompts=iim.safetensors
    -p s-mcm-star.prompts=iim.safetensors
    """
    from oodcli.train.iim import train_iim as run

    log = None if STATE["quiet"] else (lambda msg: err.print(msg, style="dim", markup=False))
    result = run(
        store_path, out_path, backbone=backbone, split=split, shots=shots, epochs=epochs, batch_size=batch_size,
        lr=lr, n_ctx=n_ctx, ctx_init=ctx_init, k=k, ood_prompts=ood_prompts, lambda_neg=lambda_neg,
        lambda_div=lambda_div, temperature=temperature, csc=csc, denominators=denominators, local_layer=local_layer,
        train_classes=train_classes,
        train_class_fraction=fraction, labels=labels, seed=seed, precision=precision, log=log,
    )
    _print_prompt_result(result, as_json)


@train_app.command("synood")
def train_synood(
    store_path: Path = typer.Option(..., "--store", "-s", help="Store with the CLIP features of the train and synthetic splits "
                                    "(penultimate for the authors' projection, image_embeds for the linear one)."),
    out_path: Path = typer.Option(..., "--out", "-o", help="File to write (safetensors): projection + negative label features."),
    synthetic: Optional[list[str]] = typer.Option(
        None, "--synthetic", help="Synthetic split(s) (role synthetic) to learn from; default: every one in the store. "
        "Table 4's 'Neg Image' vs 'Grad Image' is which one you name."
    ),
    train: str = typer.Option("train", "--train", help="ID split D_in* is drawn from (most complex images per class)."),
    backbone: Optional[str] = typer.Option(None, "--backbone", help="CLIP backbone in the store (default: the only one)."),
    num_negatives: int = typer.Option(10000, "--num-negatives", min=1, help="M: NegLabel's negative labels."),
    percentile: float = typer.Option(0.95, "--percentile", help="NegMining's percentile."),
    wordnet: Optional[str] = typer.Option(None, "--wordnet", help="Folder with WordNet's data.noun and data.adj (default: found)."),
    labels: Optional[str] = typer.Option(None, "--labels", help="Class names file (one per line); default: the store's benchmark."),
    projection: str = typer.Option(
        "authors", "--projection", help="delta of eq. 11: 'authors' (their code: f + ReLU(LayerNorm(Linear(f))) on the "
        "unnormalised feature, random init) or 'linear' (a linear map of the unit feature, starting at the identity)."
    ),
    proj_epochs: int = typer.Option(3, "--proj-epochs", min=0, help="Epochs of the projection (eq. 12); 0 keeps it untrained."),
    proj_lr: float = typer.Option(1e-3, "--proj-lr", help="Adam learning rate of the projection."),
    proj_schedule: str = typer.Option("cosine", "--proj-schedule", help="'cosine' (the authors': per epoch, down to 1e-5) or 'constant'."),
    weight_decay: float = typer.Option(1e-5, "--weight-decay", help="Adam weight decay of the projection."),
    label_epochs: int = typer.Option(5, "--label-epochs", min=0, help="Epochs of the negative label features (eq. 14); 0 keeps CLIP's."),
    label_lr: float = typer.Option(2e-3, "--label-lr", help="SGD learning rate of the negative label features."),
    batch_size: int = typer.Option(128, "--batch-size", min=1),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="tau (default: the CLIP's own, 0.01 for OpenAI)."),
    seed: int = typer.Option(0, "--seed"),
    data_root: Optional[str] = typer.Option(None, "--data-root", help="Where the train images live (read for their JPEG bytes per pixel)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Train SynOOD's image projection and negative label features on cached CLIP features (no image encoder runs).

    The synthetic images enter the store like any data, with role synthetic (penultimate is the
    unnormalised CLIP feature the authors' projection reads):

      oodcli extract --model clip-tiny --weights W --data folder:DIR --split synthetic/synood --role synthetic --layers image_embeds,penultimate --store S

    Examples:

      oodcli train synood --store stores/digits_clip.zarr --out synood.safetensors

      oodcli score synood,neglabel --store stores/digits_clip.zarr -p synood.prompts=synood.safetensors

      oodcli score synood --store stores/digits_clip.zarr -p synood.prompts=synood.safetensors -p synood.projection=false
    """
    from oodcli.train.synood import train_synood as run

    log = None if STATE["quiet"] else (lambda msg: err.print(msg, style="dim", markup=False))
    bar = _progress()
    try:
        result = run(
            store_path, out_path, synthetic=synthetic, train_split=train, backbone=backbone,
            num_negatives=num_negatives, percentile=percentile, wordnet=wordnet, labels=labels,
            projection=projection, proj_epochs=proj_epochs, proj_lr=proj_lr, proj_schedule=proj_schedule,
            weight_decay=weight_decay, label_epochs=label_epochs,
            label_lr=label_lr, batch_size=batch_size, temperature=temperature, seed=seed, data_root_dir=data_root,
            log=log, progress=_row_progress(bar),
        )
    finally:
        if bar.live.is_started:
            bar.stop()
    if as_json:
        out.print_json(json.dumps(result.as_dict()))
        return
    out.print(
        f"saved {result.path}: projection loss {result.projection_loss:.4f}, label loss {result.label_loss:.4f}, "
        f"{result.synthetic} synthetic + {result.in_star} ID images, {result.learned} of {result.negatives} negative "
        f"labels learned, pairing accuracy {100 * result.pairing_before:.1f}% -> {100 * result.pairing_after:.1f}% "
        f"({result.seconds:.1f} s)",
        markup=False,
    )


def _prototype_trainer(method: str):
    palm = method == "palm"

    def command(
        store: Optional[Path] = typer.Option(None, "--store", "-s", help="With --head-only: store with the frozen backbone's train features."),
        head_only: bool = typer.Option(False, "--head-only", help="Train only the head, on cached features from --store (fast)."),
        backbone: Optional[str] = typer.Option(None, "--backbone", help="Head-only: whose features (default: the only backbone)."),
        layer: Optional[str] = typer.Option(None, "--layer", help="Head-only: which layer (default: cls if stored, else penultimate)."),
        split: str = typer.Option("train", "--split", help="Head-only: the ID split to train on."),
        benchmark: Optional[str] = typer.Option(None, "--benchmark", "-b", help="End to end: benchmark whose ID train images are used."),
        model: Optional[str] = typer.Option(None, "--model", "-m", help="End to end: the encoder, e.g. cifar_resnet34 (paper), digits_cnn."),
        weights: Optional[str] = typer.Option(None, "--weights", "-w", help="End to end: start from this checkpoint (default: random init)."),
        k: Optional[int] = typer.Option(6 if palm else None, "--k", min=1, hidden=not palm, help="Prototypes per class (PALM: 6)."),
        k_from: Optional[Path] = typer.Option(
            None, "--k-from", hidden=palm, help="Store with 'oodcli select-k' results (default: --store)."
        ),
        out_path: Optional[Path] = typer.Option(
            None, "--out", "-o", help=f"Model file (default: <store>-{method}.safetensors, or stores/<benchmark>-{method}.safetensors)."
        ),
        epochs: int = typer.Option(500, "--epochs", min=1),
        batch_size: int = typer.Option(512, "--batch-size", min=1),
        lr: float = typer.Option(0.5, "--lr", help="SGD learning rate, cosine-decayed per step."),
        momentum: float = typer.Option(0.9, "--momentum", help="SGD momentum."),
        weight_decay: float = typer.Option(1e-6, "--weight-decay"),
        tau: float = typer.Option(0.1, "--tau", help="Temperature of the mixture posterior, eq. (3)."),
        tau_p: float = typer.Option(0.1, "--tau-p", help="Temperature of the prototype contrastive loss, eq. (5)."),
        lambda_pc: float = typer.Option(1.0, "--lambda-pc", help="Weight of L_PC, eq. (6)."),
        epsilon: float = typer.Option(0.05, "--epsilon", help="Sinkhorn entropic regularisation, eq. (14)."),
        sinkhorn_iters: int = typer.Option(3, "--sinkhorn-iters", min=1),
        proto_momentum: float = typer.Option(0.999, "--proto-momentum", help="EMA momentum of the prototypes and qualities (1 - beta_p, eq. 15)."),
        embed_dim: int = typer.Option(128, "--embed-dim", min=1, help="Dimension of the hypersphere."),
        seed: int = typer.Option(0, "--seed"),
        flip: bool = typer.Option(True, "--flip/--no-flip", help="End to end: random horizontal flips (off for digits)."),
        device: str = typer.Option("auto", "--device", help="auto, cpu or cuda[:N]."),
        workers: int = typer.Option(0, "--workers", min=0, help="End to end: DataLoader worker processes."),
        data_root: Optional[str] = typer.Option(None, "--data-root", help="Where data sets live (default $OODCLI_DATA_ROOT or ./data)."),
        as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    ) -> None:
        from oodcli.scoring import default_backbone
        from oodcli.select_k import read_k
        from oodcli.store import open_store
        from oodcli.train.apex import ApexConfig, train_end_to_end, train_head_only

        cfg = ApexConfig(embed_dim=embed_dim, tau=tau, tau_p=tau_p, lambda_pc=lambda_pc, epsilon=epsilon,
                         sinkhorn_iters=sinkhorn_iters, proto_momentum=proto_momentum, epochs=epochs,
                         batch_size=batch_size, lr=lr, momentum=momentum, weight_decay=weight_decay, seed=seed)
        cfg.check()
        if palm and k_from is not None:
            raise UsageError("--k-from is for 'train apex'; 'train palm' uses the same --k for every class")
        if not palm and k is not None:
            raise UsageError("'train apex' takes K per class from select-k; use 'train palm --k N' for a fixed K")
        if head_only and store is None:
            raise UsageError("--head-only trains on cached features: pass --store PATH")
        if head_only and (benchmark or model or weights):
            raise UsageError("--benchmark, --model and --weights are for end-to-end training; drop them with --head-only")
        if not head_only and store is not None:
            raise UsageError("--store goes with --head-only; for select-k results from a store use --k-from")
        if not head_only and not (benchmark and model):
            raise UsageError("end-to-end training needs --benchmark and --model (or: --head-only --store PATH)")
        select = None
        source = k_from or store
        if not palm:
            if source is None:
                raise UsageError("'train apex' needs K per class from select-k: pass --k-from STORE")
            with open_store(source, "r") as ks:
                select = read_k(ks)
        log = None if STATE["quiet"] else (lambda msg: err.print(msg, style="dim", markup=False))
        if head_only:
            target = out_path or store.with_name(f"{store.stem}-{method}.safetensors")
            with open_store(store, "r") as st:
                result = train_head_only(st, backbone or default_backbone(st, split), method, layer, split,
                                         None if not palm else k, select, cfg, target, device, log)
        else:
            target = out_path or Path("stores") / f"{benchmark}-{method}.safetensors"
            result = train_end_to_end(benchmark, model, method, weights, None if not palm else k, select, cfg,
                                      target, device, workers, data_root, flip, log)
        if as_json:
            out.print_json(json.dumps(result.as_dict()))
            return
        ks = result.k_per_class
        out.print(
            f"saved {result.path}: {method} {result.mode}, {result.prototypes} prototypes (K {min(ks)}..{max(ks)}), "
            f"{result.epochs} epochs in {result.seconds:.1f} s; loss {result.first_loss:.3f} -> {result.final_loss:.3f}, "
            f"train accuracy {100 * result.train_accuracy:.1f}%, min Q_S {result.min_q_s:.3f}, "
            f"{result.colliding_prototypes} colliding prototypes", markup=False,
        )

    return command


_TRAIN_HELP = (
    "{title} (APEX paper sec. 3; PALM, ICLR 2024): projection head onto the 128-d unit sphere, {k}, "
    "L_MLE + lambda L_PC, Sinkhorn soft assignments, EMA prototypes, prototype qualities. Writes one "
    "safetensors file that 'oodcli extract --model {method} --weights FILE' runs as a backbone.\n\n"
    "Examples:\n\n"
    "  oodcli train {method} --head-only --store stores/digits.zarr --backbone digits_cnn{example}\n\n"
    "  oodcli train {method} --benchmark cifar100 --model cifar_resnet34{e2e} --device cuda --workers 8"
)
train_app.command("apex", help=_TRAIN_HELP.format(
    title="Train APM, the adaptive mixture of prototypes", k="K_c* prototypes per class from 'oodcli select-k'",
    method="apex", example="", e2e=" --k-from stores/cifar100-dinov2.zarr"))(_prototype_trainer("apex"))
train_app.command("palm", help=_TRAIN_HELP.format(
    title="Train PALM, the fixed-K mixture of prototypes", k="the same K (6) prototypes for every class",
    method="palm", example=" --k 6", e2e=""))(_prototype_trainer("palm"))
