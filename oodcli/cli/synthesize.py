"""``oodcli synthesize grood|context-labels|synood``: GROOD's prototypes and gradients, SynOOD's
context labels and near-boundary OOD images."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from oodcli.cli.common import _progress, _row_progress, out

synth_app = typer.Typer(help="Synthesize OOD data: GROOD's prototypes and gradients, SynOOD's context labels and near-boundary images.", no_args_is_help=True)


@synth_app.command("grood")
def synthesize_grood(
    store: Path = typer.Option(..., "--store", "-s", help="Store with the ID train split's penultimate features."),
    model: Optional[str] = typer.Option(
        None, "--model", "-m", "--backbone", help="Backbone whose features to use (default: the only one)."
    ),
    weights: Optional[str] = typer.Option(
        None, "--weights", "-w", help="Its checkpoint (default: where the store says the weights came from); must match."
    ),
    ood_prototype: str = typer.Option(
        "mixup", "--ood-prototype", help="mixup (eq. 9), noise (uniform-noise images), val (--val-split rows) or mean (of class prototypes)."
    ),
    quantile: float = typer.Option(
        0.5, "--quantile", "-q", help="Proximity filter: drop candidates nearer to a class prototype than this quantile (0 keeps all)."
    ),
    mixup_lambda: float = typer.Option(0.5, "--lambda", help="Mixup weight of the image's own early map (eq. 9)."),
    val_split: Optional[str] = typer.Option(None, "--val-split", help="With --ood-prototype val: an auxiliary OOD split of the store."),
    samples: int = typer.Option(100, "--samples", help="noise/val: candidate OOD samples before the filter."),
    seed: int = typer.Option(0, "--seed", help="noise/val: random seed."),
    train_split: str = typer.Option("train", "--train", help="ID train split the prototypes come from."),
    early: Optional[str] = typer.Option(
        None, "--early", help="mixup, SOURCE:NAME models: the module whose output is the early map, where the "
        "mixed map re-enters the network (default: the first stage: layer1, stages.0, blocks.0, features.1, ...; "
        "an nn.Sequential: its index, e.g. 2)."
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda[:N]."),
    batch_size: int = typer.Option(128, "--batch-size", min=1),
    workers: int = typer.Option(0, "--workers", min=0, help="DataLoader worker processes."),
    data_root: Optional[str] = typer.Option(None, "--data-root", help="Where data sets live (default $OODCLI_DATA_ROOT or ./data)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """GROOD's class prototypes and OOD prototype (fitted/grood), then the gradients of every split (grads/grood/<split>).

    mixup runs the backbone over the train images again (their early maps are not stored).
    The same command again reuses the prototypes and only writes missing gradients.

    Examples:

      oodcli synthesize grood --store stores/digits.zarr

      oodcli synthesize grood --store stores/cifar10.zarr --ood-prototype val --val-split ood/val/tin

      oodcli synthesize grood --store stores/in-convnext.zarr --early features.3
    """
    from oodcli.store import open_store
    from oodcli.synth.grood import synthesize_grood as run

    bar = _progress()
    try:
        with open_store(store, "r+") as st:
            result = run(
                st, backbone=model, weights=weights, train_split=train_split, ood_prototype=ood_prototype,
                quantile=quantile, mixup_lambda=mixup_lambda, val_split=val_split, samples=samples, seed=seed,
                device=device, batch_size=batch_size, workers=workers, data_root_dir=data_root,
                progress=_row_progress(bar), early=early,
            )
    finally:
        if bar.live.is_started:
            bar.stop()
    if as_json:
        out.print_json(json.dumps(result))
        return
    kept = (f" ({result['kept']} of {result['candidates']} candidates kept at q={result['quantile']}, "
            f"tau {result['tau']:.4g})" if "kept" in result else "")
    early = f", early maps {'x'.join(map(str, result['early_shape']))}" if result.get("early_shape") else ""
    out.print(f"fitted/grood: {result['status']}: {result['ood_prototype']} OOD prototype{kept}, "
              f"{result['classes']} class prototypes, penultimate {result['dim']}-d{early}, "
              f"in {result['seconds']:.2f} s", markup=False)
    for g in result["gradients"]:
        out.print(f"grads/grood/{g['split']}: {g['status']} {g['rows']} rows", markup=False)


@synth_app.command("context-labels")
def synthesize_context_labels(
    store: Path = typer.Option(..., "--store", "-s", help="Store with the ID split (and its CLIP image_embeds for --source clip)."),
    out_path: Path = typer.Option(..., "--out", "-o", help="JSON-lines file to write: a header line, then {id, labels} per image."),
    source: str = typer.Option("clip", "--source", help="clip (zero-shot over WordNet nouns), llava (an MLLM, as the paper) or a JSON-lines FILE."),
    split: str = typer.Option("train", "--split", help="ID split whose images get labels."),
    backbone: Optional[str] = typer.Option(None, "--backbone", help="clip: CLIP backbone in the store (default: the only one)."),
    top_k: int = typer.Option(5, "--top-k", help="clip: labels per image."),
    per_class: Optional[int] = typer.Option(None, "--per-class", help="N images per class, picked by --pick (default: all)."),
    pick: str = typer.Option("complex", "--pick", help="complex: the most complex by JPEG bytes per pixel, as D_in* and 'synthesize synood' (reads the images); random: drawn with --seed."),
    seed: int = typer.Option(0, "--seed"),
    labels: Optional[str] = typer.Option(None, "--labels", help="Class names file (one per line); default: the store's benchmark."),
    model: str = typer.Option("llava-hf/llava-1.5-7b-hf", "--model", help="llava: Hugging Face id or local folder."),
    device: str = typer.Option("auto", "--device", help="llava: auto, cpu or cuda[:N]."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="llava: images per generate call."),
    data_root: Optional[str] = typer.Option(None, "--data-root", help="llava: where data sets live (default $OODCLI_DATA_ROOT or ./data)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """SynOOD's context labels (eq. 3): per ID image, labels of its elements other than the main object.

    Examples:

      oodcli synthesize context-labels --store stores/digits_clip.zarr --split train --per-class 10 --out context.jsonl

      oodcli synthesize context-labels --store stores/imagenet_clip.zarr --source llava --device cuda --per-class 50 --out context.jsonl

      oodcli synthesize context-labels --store stores/imagenet_clip.zarr --source mllm_answers.jsonl --out context.jsonl
    """
    from oodcli.outputs import check_output_file
    from oodcli.store import open_store
    from oodcli.synth.context import context_labels

    check_output_file(out_path)
    bar = _progress()
    try:
        with open_store(store, "r+" if source == "clip" else "r") as st:  # clip caches the nouns' text features
            result = context_labels(
                st, split=split, source=source, backbone=backbone, top_k=top_k, per_class=per_class, seed=seed,
                labels_file=labels, model=model, device=device, batch_size=batch_size, data_root_dir=data_root,
                progress=_row_progress(bar), pick=pick,
            )
    finally:
        if bar.live.is_started:
            bar.stop()
    result.write_jsonl(out_path)
    summary = {**result.summary(), "out": str(out_path)}
    if as_json:
        out.print_json(json.dumps(summary))
        return
    out.print(f"{out_path}: context labels of {summary['images']} images of '{split}' "
              f"({summary['labels_per_image']:.1f} per image) by {summary['provider']}", markup=False)


@synth_app.command("synood")
def synthesize_synood(
    out_dir: Path = typer.Option(..., "--out-dir", "-o", help="Folder for the PNG images, manifest.jsonl and the run record."),
    store: Optional[Path] = typer.Option(None, "--store", "-s", help="Store whose split's images are inpainted (its recorded data source is read)."),
    from_split: str = typer.Option("train", "--from-split", help="ID split to pick the images from."),
    per_class: int = typer.Option(1, "--per-class", "-n", help="Images per class, the most complex by JPEG bytes per pixel (D_in*'s rule, so each pairs with its D_in* image); with neg-image: per word."),
    pipeline: str = typer.Option(
        "stabilityai/stable-diffusion-2-inpainting", "--pipeline",
        help="Inpainting pipeline: a hub id or a folder saved with save_pretrained (e.g. from 'train diffusion').",
    ),
    classifier: str = typer.Option("resnet50", "--classifier", help="Backbone g with logits whose energy guides the noise (see extract --list-models)."),
    classifier_weights: Optional[str] = typer.Option(None, "--classifier-weights", help="Its checkpoint (default: the backbone's default weights)."),
    context_labels: Optional[Path] = typer.Option(
        None, "--context-labels", help='JSON lines {"id": <split image id>, "labels": [...]} from \'oodcli synthesize context-labels\': the prompts; '
        "only listed images are picked (without it: empty prompts, i.e. unconditional inpainting)."
    ),
    strength: float = typer.Option(0.6, "--strength", help="Inpainting strength (eq. 4)."),
    steps: int = typer.Option(20, "--steps", help="Denoising steps of the full schedule."),
    iterations: int = typer.Option(3, "--iterations", help="Inpainting passes in total (the paper's 3), the noise refined (eq. 10) between them; 1 = plain inpainting."),
    step_size: float = typer.Option(10.0, "--step-size", help="r * rho of eq. 10 (gradient w.r.t. the decoder's latent z_0 / scaling_factor, as the authors)."),
    loss: str = typer.Option("authors", "--loss", help="authors: (m_out - (mean g - logsumexp g))^2, m_out -5; energy-hinge: Liu et al.'s max(0, m_out - E)^2, m_out -7. Both push towards OOD."),
    m_out: Optional[float] = typer.Option(None, "--m-out", help="OOD threshold m_out of eq. 7 (default: the --loss's)."),
    tau: float = typer.Option(1.0, "--tau", help="Temperature of eq. 7."),
    guidance: float = typer.Option(8.0, "--guidance", help="Classifier-free guidance scale (the authors' 8)."),
    prompt_template: str = typer.Option("A photo only remain {labels}.", "--prompt-template", help="Inpainting prompt around the context labels (the authors'); '{labels}' = the labels alone."),
    mode: str = typer.Option("inpaint", "--mode", help="inpaint (SynOOD) or neg-image (text-to-image from --prompt-words, no refinement)."),
    prompt_words: Optional[Path] = typer.Option(None, "--prompt-words", help="neg-image: one word per line."),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda[:N]."),
    data_root: Optional[str] = typer.Option(None, "--data-root", help="Where data sets live (default $OODCLI_DATA_ROOT or ./data)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """SynOOD's near-boundary OOD images: inpaint ID images with their context labels as prompts,
    the initial noise refined by a classifier's energy loss (eq. 4-10). The same command again
    resumes; then extract the folder into the store.

    Example:  oodcli synthesize synood --store stores/digits.zarr --per-class 4 --out-dir stores/synood
    --pipeline stores/digits_inpaint --classifier digits_cnn --classifier-weights stores/digits_cnn.safetensors
    --context-labels stores/digits-context.jsonl && oodcli extract --model clip-tiny --weights stores/clip_tiny.safetensors
    --data folder:stores/synood --split synthetic/synood --role synthetic --store stores/digits.zarr
    """
    from oodcli.synth.synood import Settings
    from oodcli.synth.synood import synthesize_synood as run

    settings = Settings(mode=mode, from_split=from_split, per_class=per_class, strength=strength, steps=steps,
                        guidance=guidance, iterations=iterations, step_size=step_size, loss=loss, m_out=m_out, tau=tau,
                        prompt_template=prompt_template, seed=seed)
    bar = _progress()
    task = []

    def progress(done: int, total: int) -> None:
        if not task:
            bar.start()
            task.append(bar.add_task("synood images", total=total))
        bar.update(task[0], completed=done)

    try:
        result = run(out_dir, store=store, settings=settings, pipeline=pipeline, classifier=classifier,
                     classifier_weights=classifier_weights, context_labels=context_labels, prompt_words=prompt_words,
                     device=device, data_root_dir=data_root, progress=progress)
    finally:
        if bar.live.is_started:
            bar.stop()
    if as_json:
        out.print_json(json.dumps(result))
        return
    loss = (f"; energy loss mean {result['energy_loss_before_mean']:.3f} -> {result['energy_loss_after_mean']:.3f} "
            f"(lower for {result['lowered']} of {result['manifest_rows']})" if "manifest_rows" in result else "")
    if "energy_before_mean" in result:
        loss += f", energy E {result['energy_before_mean']:.3f} -> {result['energy_after_mean']:.3f}"
    out.print(f"{result['out_dir']}: {result['written']} images written, {result['skipped']} already there, "
              f"{result['images']} in all{loss} ({result['seconds']:.1f} s)", markup=False)
