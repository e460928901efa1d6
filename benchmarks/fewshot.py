"""Few-shot extraction (``extract --shots``) against extracting the whole train split.

An ImageNet-shaped train split made of synthetic images (``--classes`` classes of ``--per-class``
images each, default ImageNet-1K's 1,000 x 1,281 divided by ``--scale`` in the number of classes,
so every class still holds its 1,281 images), through the tiny CLIP with the layers IIM reads
(image_embeds + patch_values, float16), in the same run:
  whole  - the whole split: time, rows and bytes on disk
  shots  - the --shots subset (default 16 per class, seed 0) of the same split
  ratio  - whole / shots, for time and disk
  draw   - the draw itself at full ImageNet-1K size (1,281,167 labels, 1,000 classes; no images)
  imagenet_vit_b16 - what the two take on disk for ImageNet-1K with CLIP ViT-B/16 (196 patch
           values + 1 image embedding of 512 float16 each per image), computed, not measured
Best of --repeats runs is kept for each timing.

Usage: python benchmarks/fewshot.py [--scale 50] [--shots 16] [--repeats 1] [--out benchmarks/results/fewshot.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from oodcli.api import extract_splits
from oodcli.data.base import ImageDataset, register_source
from oodcli.fewshot import few_shot_rows
from oodcli.store import remove_store

ROOT = Path(__file__).resolve().parent.parent
IMAGENET_TRAIN, IMAGENET_CLASSES = 1_281_167, 1000
LAYERS = ["image_embeds", "patch_values"]


class SyntheticImages(ImageDataset):
    """``classes`` x ``per_class`` random 32 x 32 images, made on demand from their index."""

    def __init__(self, classes: int, per_class: int):
        self.name = f"synthetic-imagenet:{classes}x{per_class}"
        self.labels = np.repeat(np.arange(classes, dtype=np.int64), per_class)
        self.class_names = [f"class {c}" for c in range(classes)]

    def load(self, i: int):
        return Image.fromarray(np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8))


@register_source("synthetic-imagenet")
def _source(arg: str, root: Path, is_ood: bool) -> ImageDataset:
    classes, per_class = (int(v) for v in arg.split("x"))
    return SyntheticImages(classes, per_class)


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run(data: str, store: Path, shots: int | None, batch_size: int) -> dict:
    remove_store(store)
    t0 = time.perf_counter()
    [result] = extract_splits("clip-tiny", store, data=data, splits=["train"], layers=LAYERS, batch_size=batch_size,
                              device="cpu", shots=shots)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "rows": result.rows, "disk_bytes": disk_bytes(store), "img_per_s": result.rows / seconds}


def best(runs: list[dict]) -> dict:
    return min(runs, key=lambda r: r["seconds"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scale", type=int, default=50, help="ImageNet-1K's classes divided by this")
    parser.add_argument("--per-class", type=int, default=IMAGENET_TRAIN // IMAGENET_CLASSES)
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fewshot.json")
    args = parser.parse_args()
    classes = IMAGENET_CLASSES // args.scale
    data = f"synthetic-imagenet:{classes}x{args.per_class}"
    with tempfile.TemporaryDirectory() as tmp:
        shots = best([run(data, Path(tmp) / "shots.zarr", args.shots, args.batch_size) for _ in range(args.repeats)])
        whole = best([run(data, Path(tmp) / "whole.zarr", None, args.batch_size) for _ in range(args.repeats)])
    labels = np.repeat(np.arange(IMAGENET_CLASSES), -(-IMAGENET_TRAIN // IMAGENET_CLASSES))[:IMAGENET_TRAIN]
    t0 = time.perf_counter()
    rows = few_shot_rows(labels, list(range(IMAGENET_CLASSES)), args.shots, 0)
    draw_s = time.perf_counter() - t0
    per_image = (196 + 1) * 512 * 2  # ViT-B/16: patch_values [196, 512] + image_embeds [512], float16
    result = {
        "meta": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                 "model": "clip-tiny (32 px, 16 patches of 32 values)", "layers": LAYERS, "dtype": "float16",
                 "split": f"{classes} classes x {args.per_class} images (ImageNet-1K / {args.scale})",
                 "shots": args.shots, "repeats": args.repeats},
        "whole": whole,
        "shots": shots,
        "ratio": {"seconds": whole["seconds"] / shots["seconds"], "disk": whole["disk_bytes"] / shots["disk_bytes"]},
        "draw": {"labels": IMAGENET_TRAIN, "classes": IMAGENET_CLASSES, "rows": len(rows), "seconds": draw_s},
        "imagenet_vit_b16": {"whole_gb": IMAGENET_TRAIN * per_image / 1e9,
                             "shots_gb": IMAGENET_CLASSES * args.shots * per_image / 1e9},
    }
    print(f"whole split : {whole['rows']:>7} rows  {whole['seconds']:7.2f} s  {whole['disk_bytes'] / 1e6:8.1f} MB")
    print(f"{args.shots}-shot     : {shots['rows']:>7} rows  {shots['seconds']:7.2f} s  {shots['disk_bytes'] / 1e6:8.1f} MB")
    print(f"ratio       : {result['ratio']['seconds']:.1f}x time, {result['ratio']['disk']:.1f}x disk")
    print(f"draw of {args.shots} shots from {IMAGENET_TRAIN:,} labels: {draw_s * 1e3:.0f} ms")
    print(f"ImageNet-1K, ViT-B/16 patch values: whole {result['imagenet_vit_b16']['whole_gb']:.0f} GB, "
          f"{args.shots}-shot {result['imagenet_vit_b16']['shots_gb']:.1f} GB")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
