"""Throughput of scoring new images with a store's method (``Detector`` / ``oodcli predict``)
against the bare forward pass of the same backbone on the same images, in the same run.

For each backbone (random-initialised: ``cifar_resnet18-tiny`` at 32x32 and ``resnet18-tiny``)
a temporary store of the embedded digits (train, val, test, noise) is extracted and scored with one
method per family: a logit score (msp), a fitted linear-algebra score (mahalanobis, vim) and
a nearest-neighbour search (knn). Then, on ``--images`` preprocessed test images in batches of
``--batch-size`` (default 64):

- bare forward: ``net(x, layers)`` alone (images/s), the baseline;
- ``Detector.score(tensor)``: forward + rounding to the stored dtype + the scorer (images/s
  and the ratio to the bare forward; the goal is >= 0.9);
- the scorer alone on precomputed features (images/s), its own cost;
- ``Detector.predict(source)`` from the data source: decoding and preprocessing included.

Every timing is the best of ``--repeats`` runs after one warm-up. Results are printed and
saved as JSON.

Usage: python benchmarks/predict.py [--images 512] [--batch-size 64] [--repeats 3] [--out benchmarks/results/predict.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from oodcli.cli import main
from oodcli.data.base import open_source
from oodcli.deploy import Detector

ROOT = Path(__file__).resolve().parent.parent
BACKBONES = ("cifar_resnet18-tiny", "resnet18-tiny")
METHODS = ("msp", "mahalanobis", "vim", "knn")


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def run_backbone(model: str, root: Path, n_images: int, batch: int, repeats: int) -> dict:
    store = root / f"{model}.zarr"
    assert main(["-q", "extract", "--model", model, "--benchmark", "digits", "--layers", "logits,penultimate",
                 "--split", "train", "--split", "val", "--split", "test", "--split", "ood/far/noise",
                 "--store", str(store)]) == 0
    assert main(["-q", "score", ",".join(METHODS), "--store", str(store), "-p", "vim.dim=32"]) == 0
    data = open_source("digits:test", root)
    first = Detector.from_store(store, METHODS[0], threshold=None, batch_size=batch)
    transform = first.spec.preprocess.to_transform()
    rows = [i % len(data) for i in range(n_images)]
    x = torch.stack([transform(data.load(i)) for i in rows])
    net = first.network()
    layers = ("logits", "penultimate")  # what the store holds: the bare pass computes all of it

    def bare():
        with torch.inference_mode():
            for i in range(0, len(x), batch):
                net(x[i : i + batch], layers)

    bare_s = best_of(bare, repeats)
    out = {"model": model, "images": n_images, "batch_size": batch, "input": list(x.shape[1:]),
           "bare_forward_img_s": n_images / bare_s, "methods": {}}
    print(f"{model}: bare forward {n_images / bare_s:,.0f} img/s (input {tuple(x.shape[1:])})")
    for method in METHODS:
        det = Detector.from_store(store, method, threshold=None, batch_size=batch)
        det._net = net  # the same module: the comparison is the detector's own overhead
        feats = det.forward(x)
        score_s = best_of(lambda: det.score(x), repeats)
        scorer_s = best_of(lambda: det.score_features(feats), repeats)
        predict_s = best_of(lambda: det.predict("digits:test"), 1)
        row = {
            "detector_score_img_s": n_images / score_s,
            "ratio_to_bare_forward": bare_s / score_s,
            "scorer_only_img_s": n_images / scorer_s,
            "predict_from_source_img_s": len(data) / predict_s,
        }
        out["methods"][method] = row
        print(f"  {method:12s} Detector.score {row['detector_score_img_s']:9,.0f} img/s "
              f"({row['ratio_to_bare_forward']:.2f} x bare)  scorer alone {row['scorer_only_img_s']:11,.0f} img/s  "
              f"predict(source) {row['predict_from_source_img_s']:8,.0f} img/s")
    return out


def main_cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "predict.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    results = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                           "torch": torch.__version__}, "backbones": []}
    with tempfile.TemporaryDirectory() as tmp:
        for model in BACKBONES:
            results["backbones"].append(run_backbone(model, Path(tmp), args.images, args.batch_size, args.repeats))
    results["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"peak RSS {results['peak_rss_mib']:.0f} MiB; saved {args.out}")


if __name__ == "__main__":
    main_cli()
