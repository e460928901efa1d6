"""``oodcli extract``: run a backbone over a data set into the store; its ``--list-models`` and
``--list-benchmarks``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from oodcli.cli.common import _print_wide, _progress, _split_list, err, out


def _list_models(value: bool) -> None:
    if not value:
        return
    from rich.table import Table

    from oodcli.backbones import all_specs

    from rich.markup import escape

    from oodcli.backbones.sources import SOURCES

    sources = Table(title="model sources: --model SOURCE:NAME (layers logits, penultimate, featmap; --layer NAME=PATH)")
    for col in ("source", "model", "--weights"):
        sources.add_column(col)
    for source, (how, weights) in SOURCES.items():
        sources.add_row(source, escape(how), escape(weights))
    _print_wide(sources)
    from oodcli.plugins import load_plugins, origin

    load_plugins()
    table = Table(title="named backbones, built-in or from plugins "
                        "(the -tiny twins are random-initialised test models)")
    for col in ("model", "family", "layers (default first)", "default weights", "from"):
        table.add_column(col)
    for name, spec in sorted(all_specs().items()):
        rest = [layer for layer in spec.layers if layer not in spec.default_layers]
        layers = ", ".join(spec.default_layers) + (f" (+ {', '.join(rest)})" if rest else "")
        weights = "--weights PATH" if spec.needs_weights_file else str(spec.default_weights)
        table.add_row(name, spec.family, layers, weights, origin("backbone", name))
    _print_wide(table)
    raise typer.Exit()


def _list_benchmarks(value: bool) -> None:
    if not value:
        return
    from rich.table import Table

    from oodcli.data.benchmarks import get_benchmark, list_benchmarks

    table = Table(title="benchmarks")
    for col in ("benchmark", "classes", "splits"):
        table.add_column(col)
    for name in list_benchmarks():
        bench = get_benchmark(name)
        table.add_row(name, str(bench.num_classes), ", ".join(s.name + "*" * s.optional for s in bench.splits))
    table.caption = "* extracted only when named with --split (e.g. the cs-ID sets of report --fsood)"
    _print_wide(table)
    raise typer.Exit()


def extract(
    model: str = typer.Option(..., "--model", "-m", help="A built-in backbone or SOURCE:NAME: torchvision:NAME, "
                              "timm:NAME, hf:REPO_OR_FOLDER, open_clip:ARCH@TAG_FILE_OR_random, "
                              "python:FILE.py:FACTORY (see --list-models)."),
    store: Path = typer.Option(..., "--store", "-s", help="Store path: *.zarr (default format) or *.h5."),
    benchmark: Optional[str] = typer.Option(None, "--benchmark", "-b", help="Benchmark name, e.g. digits, cifar10."),
    data: Optional[str] = typer.Option(
        None, "--data", help="A data source instead of a benchmark: folder:DIR, imglist:FILE[@IMAGEDIR], torchvision:NAME:SPLIT, "
        "hf:DATASET[:CONFIG]:SPLIT (save_to_disk folder, parquet/imagefolder files or hub name), "
        "webdataset:SHARDS-{000..099}.tar, csv:FILE or jsonl:FILE (a path and an optional label per row)."
    ),
    image_column: Optional[str] = typer.Option(
        None, "--image-column", help="With --data hf:/webdataset:/csv:/jsonl:, the column (WebDataset: member "
        "extension, e.g. jpg) holding the images (default: the Image feature, the one image member, a path column)."
    ),
    label_column: Optional[str] = typer.Option(
        None, "--label-column", help="With --data hf:/webdataset:/csv:/jsonl:, the column holding the labels "
        "(default: the ClassLabel feature, the cls member, a label column; none = unlabelled)."
    ),
    split: Optional[list[str]] = typer.Option(
        None, "--split", help="Split name(s) to extract, or patterns of a benchmark's split names (e.g. 'ood/*'); "
        "default: every split of the benchmark."
    ),
    role: Optional[str] = typer.Option(
        None, "--role", help="With --data: id, ood-near, ood-far, ood, ood-val (held out for sweep), synthetic "
        "(generated OOD images for training; neither of these two is ever a test set) or csid (covariate-shifted "
        "ID, labelled; see report --fsood). Default: from the split name: ood/near/..., ood/far/..., ood/val/..., "
        "synthetic/..., csid/..., else id."
    ),
    weights: Optional[str] = typer.Option(None, "--weights", "-w", help="Checkpoint file or weights name (default: the model's)."),
    layers: Optional[str] = typer.Option(None, "--layers", help="Comma-separated layers (default: the model's default layers)."),
    batch_size: int = typer.Option(128, "--batch-size", min=1),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda[:N]."),
    dtype: str = typer.Option("float16", "--dtype", help="float16 or float32 for the stored features."),
    workers: int = typer.Option(0, "--workers", min=0, help="DataLoader worker processes (0 = load in the main process)."),
    data_root: Optional[str] = typer.Option(None, "--data-root", help="Where data sets live (default $OODCLI_DATA_ROOT or ./data)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace features made with another model, weights or layers."),
    chunk_rows: Optional[int] = typer.Option(None, "--chunk-rows", min=1, help="Rows per stored chunk (default: ~8 MiB chunks)."),
    shard: Optional[str] = typer.Option(
        None, "--shard", help="I/N: compute shard I (0..N-1) of N, whole chunks each, into one Zarr store shared by "
        "N processes (default under torchrun: RANK/WORLD_SIZE)."
    ),
    featmap_pool: Optional[int] = typer.Option(
        None, "--featmap-pool", min=1, help="With --layers ...,featmap: average-pool the feature map to G x G "
        "(default: the network's own H x W)."
    ),
    perturb: Optional[list[str]] = typer.Option(
        None, "--perturb", help="Also store the output on a perturbed input (repeatable): "
        "odin[:temperature=1000,epsilon=0.0014] -> logits@odin; mahalanobis[:epsilon=0.0014,train=train] -> "
        "penultimate@mahalanobis (needs the train split's penultimate features)."
    ),
    preprocess: Optional[str] = typer.Option(
        None, "--preprocess", help="Override the model's preprocessing: KEY=VALUE,... with keys resize, crop "
        "(pixels), mean, std (three numbers separated by '/') and interpolation (bilinear|bicubic), e.g. "
        "mean=0.507/0.487/0.441,std=0.267/0.256/0.276,crop=32. Default: the model's; cifar_resnet* models take "
        "the mean/std of the benchmark they were trained on (cifar10, cifar100). Recorded in the fingerprint."
    ),
    verify_content: bool = typer.Option(
        False, "--verify-content", help="Hash the images' bytes too (a read of every file): recorded with the split, and "
        "a cache hit only when they match. Without it a split's identity is each file's path, size and modification "
        "time and the folder's absolute path."
    ),
    head: Optional[str] = typer.Option(
        None, "--head", help="SOURCE:NAME models: the module path of the classifier (an nn.Linear) whose input is "
        "penultimate and whose weights are the head (default: the model's final nn.Linear)."
    ),
    layer_paths: Optional[list[str]] = typer.Option(
        None, "--layer", help="SOURCE:NAME models, repeatable: NAME=module.path[:in|:out] stores that submodule's "
        "output (or input) as layer NAME (4-D maps averaged over H x W), e.g. --layer block3=layer3:out."
    ),
    strict: str = typer.Option(
        "true", "--strict", help="true: refuse a --weights file whose keys do not all fit; false: load the keys "
        "that fit and tell the rest."
    ),
    shots: Optional[int] = typer.Option(
        None, "--shots", help="Extract only N images per class of each (ID) split: the few shots CLIP prompt "
        "methods learn from, the same draw as 'train ... --shots N --seed S' makes from a whole split; counts "
        "nest (the 16-shot subset holds the 8-shot one, which 'train --shots 8' then reads)."
    ),
    seed: Optional[int] = typer.Option(None, "--seed", help="With --shots: the draw's seed (default 0)."),
    classes: Optional[str] = typer.Option(
        None, "--classes", help="With --shots: draw from classes FIRST-LAST only (default: all)."
    ),
    store_as: Optional[str] = typer.Option(
        None, "--as", help="Store the features under this backbone name instead of the model's: several "
        "checkpoints of one network side by side in one store (e.g. seeds for 'score ensemble --backbone a,b,c')."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    list_models: bool = typer.Option(
        False, "--list-models", callback=_list_models, is_eager=True, help="List the backbones and exit."
    ),
    list_benchmarks: bool = typer.Option(
        False, "--list-benchmarks", callback=_list_benchmarks, is_eager=True, help="List the benchmarks and exit."
    ),
) -> None:
    """Run a backbone over a data set once and write its layers into the store.

    Re-running the same command is a cache hit; an interrupted run resumes where it stopped.

    Examples:

      oodcli extract --model digits_cnn --weights stores/digits_cnn.safetensors --benchmark digits --store stores/digits.zarr

      oodcli extract --model resnet50 --benchmark imagenet --split test --store stores/imagenet.zarr --device cuda --workers 8

      for i in 0 1 2 3; do oodcli extract --model resnet50 --benchmark imagenet --store stores/imagenet.zarr --shard $i/4 & done; wait

      oodcli extract --model clip-vit-b-16 --benchmark imagenet --split train --shots 16 --seed 1 --layers image_embeds,patch_values --store stores/imagenet_clip.zarr

      oodcli extract --model resnet50 --data hf:my_dataset_dir:test --split test --store stores/mine.zarr

      oodcli extract --model open_clip:ViT-L-14@laion2b_s32b_b82k --benchmark imagenet --layers image_embeds,patch_values --store stores/in-l14.zarr

      oodcli extract --model resnet50 --data 'webdataset:shards/ood-{000..009}.tar' --split ood/far/mine --store stores/mine.zarr

      oodcli extract --model digits_cnn --weights stores/digits_cnn.safetensors --benchmark digits --store stores/digits.zarr --layers logits,penultimate,featmap --perturb odin --perturb mahalanobis

      oodcli extract --model digits_cnn --weights stores/digits_cnn-seed1.safetensors --as digits_cnn-seed1 --benchmark digits --layers logits --store stores/digits.zarr
    """
    from oodcli.api import extract_splits
    from oodcli.errors import UsageError

    if strict not in ("true", "false"):
        raise UsageError(f"--strict {strict}: give true or false")
    results = extract_splits(
        model=model,
        store=store,
        benchmark=benchmark,
        data=data,
        splits=split,
        role=role,
        weights=weights,
        layers=_split_list(layers),
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        workers=workers,
        data_root=data_root,
        overwrite=overwrite,
        chunk_rows=chunk_rows,
        progress=_progress(),
        shard=shard,
        featmap_pool=featmap_pool,
        perturb=perturb,
        preprocess=preprocess,
        verify_content=verify_content,
        image_column=image_column,
        label_column=label_column,
        head=head,
        layer_paths=layer_paths,
        strict=strict == "true",
        shots=shots,
        seed=seed,
        classes=classes,
        store_as=store_as,
    )
    if as_json:
        out.print_json(json.dumps([r.as_dict() for r in results]))
        return
    for r in results:
        rate = f", {r.rows_computed / r.seconds:.0f} img/s" if r.rows_computed and r.seconds > 0 else ""
        out.print(f"{r.split}: {r.status} {r.rows} rows [{r.backbone}: {', '.join(r.layers)}] in {r.seconds:.2f} s{rate}", markup=False)
        for note in r.notes:
            err.print(f"note: {r.split}: {note}", markup=False)
