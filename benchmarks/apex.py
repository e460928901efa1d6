"""APEX costs: select-k, head-only training against the backbone in the loop, PAOS scoring.

Cases, all on synthetic data of the paper's sizes (times do not depend on the values):
  select-k   GMM + BIC per class on N x 768 features (CIFAR-100 train with DINOv2-B:
             100 classes x 500 = 50k rows), default settings (diag, 8 PCA dims, K 1..10,
             3 EM restarts); also reports how many classes got their true K.
  epoch      one training epoch of the same APM model (CIFAR ResNet-18 + MLP head onto the
             128-d sphere, 100 classes x K 1..6 prototypes, SGD) in the same run, three ways:
             head-only on cached penultimate features, the frozen backbone in the loop
             (recomputing those features every epoch), and end to end (backbone trained).
             ratio = backbone-in-the-loop epoch / head-only epoch (goal >= 20x).
  paos       `score apex` through the store: fit (class means, shared covariance, class
             confidences) on the train split, then rows/s over ID test + OOD splits.

--scale multiplies the sizes (1.0 = the sizes above; select-k keeps 500 rows a class and
scales the number of classes; 0.1 for a quick look).
Both epoch modes use one intra-op thread, so they compete alike on a shared CPU.

Usage: python benchmarks/apex.py [--scale 1.0] [--images 1024] [--out benchmarks/results/apex.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from oodcli.select_k import select_k_arrays
from oodcli.store import open_store
from oodcli.train.apex import ApexConfig, PrototypeMixture, ProjectionHead, fit

ROOT = Path(__file__).resolve().parent.parent
CLASSES = 100


def mixture_features(classes: int, per: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``classes`` classes of ``per`` rows, each a mixture of 1..6 Gaussian clusters ~8 sigma apart."""
    rng = np.random.default_rng(seed)
    true_k = rng.integers(1, 7, classes)
    x = np.empty((per * classes, dim), np.float32)
    for c, k in enumerate(true_k):
        means = rng.normal(size=(k, dim))
        means *= 8 / np.sqrt(2) / np.linalg.norm(means, axis=1, keepdims=True)
        x[c * per : (c + 1) * per] = means[rng.integers(0, k, per)] + rng.normal(size=(per, dim))
    return x, np.repeat(np.arange(classes), per), true_k


def bench_select_k(classes: int) -> dict:
    x, y, true_k = mixture_features(classes, 500, 768)
    t0 = time.perf_counter()
    result = select_k_arrays(x, y)
    seconds = time.perf_counter() - t0
    return {"case": "select-k", "rows": len(x), "dim": 768, "classes": classes, "seconds": seconds,
            "true_k_found": int((result.k == true_k).sum()), "settings": result.settings}


def bench_epochs(images: int, batch_size: int = 256) -> dict:
    from oodcli.backbones import get_spec

    torch.manual_seed(0)
    x = torch.randn(images, 3, 32, 32)
    y = torch.arange(images) % CLASSES
    k = list(np.random.default_rng(0).integers(1, 7, CLASSES))
    cfg = ApexConfig(epochs=1, batch_size=batch_size)
    backbone = get_spec("cifar_resnet18").builder("random")
    head = ProjectionHead(512, cfg.embed_dim)
    steps = math.ceil(images / batch_size)

    def batches(source):
        def gen(epoch):
            order = torch.randperm(images)
            for i in range(0, images, batch_size):
                idx = order[i : i + batch_size]
                yield source[idx], y[idx]
        return gen

    def penultimate(images_):
        return backbone.forward_layers(images_, ("penultimate",))["penultimate"]

    def frozen(batch):
        with torch.no_grad():
            h = penultimate(batch[0])
        return head(h), batch[1]

    def epoch(embed, source, params, modules) -> float:
        protos = PrototypeMixture(k, cfg.embed_dim, cfg.proto_momentum)
        t0 = time.perf_counter()
        fit(embed, batches(source), steps, params, protos, cfg, modules)
        return time.perf_counter() - t0

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        backbone.eval()
        t0 = time.perf_counter()
        with torch.no_grad():
            cached = torch.cat([penultimate(x[i : i + batch_size]) for i in range(0, images, batch_size)])
        extract_s = time.perf_counter() - t0
        head_only = min(epoch(lambda b: (head(b[0]), b[1]), cached, list(head.parameters()), [head]) for _ in range(3))
        in_loop = epoch(frozen, x, list(head.parameters()), [head])
        end_to_end = epoch(lambda b: (head(penultimate(b[0])), b[1]), x,
                           list(backbone.parameters()) + list(head.parameters()), [backbone, head])
    finally:
        torch.set_num_threads(threads)
    return {"case": "epoch", "images": images, "batch_size": batch_size, "model": "cifar_resnet18 + head, 32px",
            "prototypes": int(sum(k)), "one_time_feature_pass_s": extract_s, "head_only_s": head_only,
            "frozen_backbone_in_loop_s": in_loop, "end_to_end_s": end_to_end,
            "ratio_frozen": in_loop / head_only, "ratio_end_to_end": end_to_end / head_only}


def bench_paos(train_rows: int, eval_rows: int, dim: int = 512) -> dict:
    from oodcli.scoring import score_store

    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, (CLASSES, dim)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        with open_store(Path(tmp) / "paos.zarr", "a") as st:
            for split, n, role in (("train", train_rows, "id"), ("test", eval_rows, "id"),
                                   ("ood/far/x", eval_rows, "ood-far")):
                labels = np.arange(n) % CLASSES if role == "id" else -np.ones(n, np.int64)
                node = f"splits/{split}"
                st.write_array(f"{node}/labels", labels.astype(np.int64))
                st.write_array(f"{node}/ids", np.arange(n))
                st.set_attrs(node, role=role, n=n)
                st.create_array(f"{node}/m/penultimate", (n, dim), np.float16)
                step = 8192
                for i in range(0, n, step):
                    rows = slice(i, min(n, i + step))
                    block = centres[np.maximum(labels[rows], 0)] + rng.normal(size=(rows.stop - i, dim))
                    st.write_rows(f"{node}/m/penultimate", i, block.astype(np.float16))
                st.set_attrs(f"{node}/m", complete=True, rows_done=n, model_id="m", fingerprint=f"fp-{split}")
            m = 6 * CLASSES
            st.write_array("backbones/m/prototypes/vectors", rng.normal(size=(m, 128)).astype(np.float32))
            st.write_array("backbones/m/prototypes/classes", np.repeat(np.arange(CLASSES), 6))
            st.write_array("backbones/m/prototypes/q_c", rng.uniform(0, 1, m).astype(np.float32))
            st.write_array("backbones/m/prototypes/q_s", rng.uniform(0, 1, m).astype(np.float32))
            st.set_attrs("backbones/m", model_id="m")
            results = score_store(st, ["apex"])
    scored = sum(r.rows for r in results)
    score_s = sum(r.seconds for r in results)
    return {"case": "paos", "train_rows": train_rows, "scored_rows": scored, "dim": dim, "classes": CLASSES,
            "fit_s": results[0].fit_seconds, "score_s": score_s, "rows_per_s": scored / score_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="Multiplies the sizes (1.0 = paper sizes).")
    parser.add_argument("--images", type=int, default=1024, help="Images per training epoch in the epoch case.")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "apex.json")
    args = parser.parse_args()
    rows = [
        bench_select_k(max(1, round(CLASSES * args.scale))),
        bench_epochs(args.images),
        bench_paos(int(50_000 * args.scale), int(10_000 * args.scale)),
    ]
    s, e, p = rows
    print(f"{'case':10} {'size':38} {'result'}")
    print(f"{'select-k':10} {s['rows']:>6} x {s['dim']}, {s['classes']} classes{'':13} "
          f"{s['seconds']:.1f} s ({s['true_k_found']}/{s['classes']} true K found)")
    print(f"{'epoch':10} {e['images']:>6} images 32px, {e['prototypes']} prototypes{'':5} "
          f"head-only {e['head_only_s']:.3f} s | frozen backbone in loop {e['frozen_backbone_in_loop_s']:.2f} s "
          f"({e['ratio_frozen']:.0f}x) | end to end {e['end_to_end_s']:.2f} s ({e['ratio_end_to_end']:.0f}x)")
    print(f"{'paos':10} {p['train_rows']:>6} train + {p['scored_rows']} scored x {p['dim']}{'':6} "
          f"fit {p['fit_s']:.2f} s, score {p['rows_per_s']:,.0f} rows/s")
    meta = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "load_average": os.getloadavg()[0],
        "torch": torch.__version__,
        "scale": args.scale,
        "date": time.strftime("%Y-%m-%d"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
