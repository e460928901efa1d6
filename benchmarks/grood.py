"""GROOD's speed: scoring against KNN on one CIFAR-size store, and faiss IVF against exact search.

1. Score time on one synthetic CIFAR-10-size store (float16 post-ReLU-like features:
   50k x 512 train in 10 classes, 10k ID test, OOD sets): GROOD through its default
   IVF index, GROOD through an exact (flat) index, and KNN (k = 50, exact, which builds
   its index inside every ``score`` run). ``--scale full`` uses OpenOOD v1.5's CIFAR-10
   OOD set sizes (CIFAR-100 10k, TIN 7,793, MNIST 70k, SVHN 26,032, Textures 5,640,
   Places365 35,195: 154,660 rows), the setting of the paper's App. A.4 (130 s GROOD vs
   434 s KNN on a GPU, with the backbone passes); the default uses two 10k OOD sets.
   GROOD's one-time steps (gradients of every split, the index) are reported apart. The
   OOD prototype is 'mean' (no backbone needed; it does not change the cost). The mean
   AUROC (synthetic data, so only the IVF-vs-exact difference means anything) shows what
   the approximate search costs in detection.
2. IVF against exact search at 100k and 1M train gradients of dimension 512 (eq. 5
   gradients of the same kind of synthetic features; queries: half ID-like, half
   OOD-like): build and search times, recall@1 (the same nearest row as exact search)
   and how much farther the neighbour found is than the true one, for the default
   nprobe and others.

The synthetic features are class centre + isotropic noise (ID) or 0.7 x a centre +
noise (OOD). How well IVF does depends on the data: with OOD features spread away from
every class, recall@1 at the default nprobe fell to ~0.75 (distances still within 0.2%).

Times are wall-clock on this machine (CPU faiss unless it sees a GPU; see "meta"),
shared with other work: load average in "meta".

Usage: python benchmarks/grood.py [--scale small|full] [--queries 2000] [--out benchmarks/results/grood.json]
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

import numpy as np

from oodcli import index as faiss_index
from oodcli.metrics import ood_metrics
from oodcli.scorers.grood import ood_gradients
from oodcli.scoring import score_store
from oodcli.store import open_store
from oodcli.synth.grood import synthesize_grood

ROOT = Path(__file__).resolve().parent.parent
BACKBONE, MODEL_ID, DIM, CLASSES = "synthetic", "synthetic-model", 512, 10
OPENOOD_CIFAR10 = {"ood/near/cifar100": 10_000, "ood/near/tin": 7_793, "ood/far/mnist": 70_000,
                   "ood/far/svhn": 26_032, "ood/far/texture": 5_640, "ood/far/places365": 35_195}
SMALL = {"ood/near/set0": 10_000, "ood/far/set1": 10_000}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- synthetic data ----------------------------------------------------------------------------


CENTRES = np.random.default_rng(1).normal(0, 1, (CLASSES, DIM)).astype(np.float32)


def features(rng, n: int, ood: bool) -> tuple[np.ndarray, np.ndarray]:
    """Post-ReLU-like features: class centre + noise for ID; for OOD a weaker pull (0.7x)
    towards a random class centre, so that OOD is near the ID data but not on it."""
    classes = rng.integers(0, CLASSES, n)
    noise = rng.standard_normal((n, DIM), dtype=np.float32)
    x = np.maximum((0.7 if ood else 1.0) * CENTRES[classes] + noise, 0)
    return x, np.full(n, -1) if ood else classes


def write_split(st, split: str, n: int, rng, chunk: int = 8192) -> None:
    role = "id" if not split.startswith("ood/") else ("ood-near" if "/near/" in split else "ood-far")
    node = f"splits/{split}"
    st.create_array(f"{node}/{BACKBONE}/penultimate", (n, DIM), np.float16)
    labels = np.zeros(n, np.int64)
    for start in range(0, n, chunk):
        x, y = features(rng, min(chunk, n - start), role != "id")
        st.write_rows(f"{node}/{BACKBONE}/penultimate", start, x.astype(np.float16))
        labels[start:start + len(y)] = y
    st.write_array(f"{node}/labels", labels)
    st.write_array(f"{node}/ids", np.arange(n, dtype=np.int64))
    st.set_attrs(node, role=role, n=n)
    st.set_attrs(f"{node}/{BACKBONE}", complete=True, rows_done=n, model_id=MODEL_ID, fingerprint=f"{split}-{n}",
                 parts={"weights": MODEL_ID, "preprocess": "none"})


def gradients(rng, n: int, protos: np.ndarray, ood_proto: np.ndarray, ood_share: float = 0.0,
              chunk: int = 65_536) -> np.ndarray:
    out = np.empty((n, DIM), np.float32)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        k = int(round(m * ood_share))
        x = np.vstack([features(rng, m - k, False)[0], features(rng, k, True)[0]])
        out[start:start + m] = ood_gradients(x, protos, ood_proto)
    return out


# ---- 1. GROOD vs KNN score time ----------------------------------------------------------------


def score_case(tmp: Path, oods: dict[str, int]) -> dict:
    path = tmp / "cifar.zarr"
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    with open_store(path, "a") as st:
        for split, n in {"train": 50_000, "test": 10_000, **oods}.items():
            write_split(st, split, n, rng)
    log(f"[score] synthetic store written in {time.perf_counter() - t0:.1f} s")
    with open_store(path, "r+") as st:
        t0 = time.perf_counter()
        synth = synthesize_grood(st, BACKBONE, ood_prototype="mean")
        grads_s = time.perf_counter() - t0
        info = faiss_index.build_in_store(st, "grads/grood/train")
        faiss_index.build_in_store(st, "grads/grood/train", name="exact", kind="flat")
        log(f"[score] gradients {grads_s:.1f} s, index ({info['kind']}) {info['seconds']:.1f} s")
        runs = {"grood": ("grood", {}), "grood-exact": ("grood", {"grood": {"index": "exact"}}), "knn": ("knn", {})}
        timings, aurocs = {}, {}
        for label, (method, hparams) in runs.items():
            t0 = time.perf_counter()
            score_store(st, [method], backbone=BACKBONE, hparams=hparams)
            timings[label] = time.perf_counter() - t0
            test = st.read(f"scores/{method}/test")
            aurocs[label] = float(np.mean([ood_metrics(test, st.read(f"scores/{method}/{o}")).auroc for o in oods]))
            log(f"[score] {label}: {timings[label]:.1f} s, mean AUROC {aurocs[label]:.4f}")
    queries = 10_000 + sum(oods.values())
    return {
        "train": [50_000, DIM],
        "ood_sets": oods,
        "scored_rows": queries,
        "gradient_rows": 50_000 + queries,
        "grood_gradients_s": grads_s,
        "grood_index_s": info["seconds"],
        "grood_index": {k: info[k] for k in ("kind", "nlist", "nprobe")},
        "score_s": timings,
        "mean_auroc": aurocs,
        "grood_total_s": grads_s + info["seconds"] + timings["grood"],
        "knn_k": 50,
        "score_speedup_vs_knn": timings["knn"] / timings["grood"],
        "prototype": synth["ood_prototype"],
    }


# ---- 2. IVF vs exact ----------------------------------------------------------------------------


def ivf_case(n: int, queries: int, nprobes: list[int]) -> dict:
    rng = np.random.default_rng(n)
    protos = CENTRES.astype(np.float64) * 0.8  # roughly where the class means of the features lie
    ood_proto = protos.mean(0)
    t0 = time.perf_counter()
    train = gradients(rng, n, protos, ood_proto)
    q = gradients(rng, queries, protos, ood_proto, ood_share=0.5)
    log(f"[ivf {n}] {n} x {DIM} gradients made in {time.perf_counter() - t0:.1f} s")

    t0 = time.perf_counter()
    flat = faiss_index.build(lambda: [train], n, DIM, kind="flat")
    flat_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    exact_d, exact_i = faiss_index.search(flat, q, 1)
    exact_s = time.perf_counter() - t0
    del flat
    log(f"[ivf {n}] exact: build {flat_build:.1f} s, search {exact_s:.1f} s")

    cfg = faiss_index.resolve(n, "ivf")
    t0 = time.perf_counter()
    ivf = faiss_index.build(lambda: (train[i:i + 65_536] for i in range(0, n, 65_536)), n, DIM, kind="ivf")
    ivf_build = time.perf_counter() - t0
    rows = []
    for nprobe in sorted(set(nprobes + [cfg["nprobe"]])):
        if nprobe > cfg["nlist"]:
            continue
        faiss_index.set_nprobe(ivf, nprobe)
        t0 = time.perf_counter()
        d, i = faiss_index.search(ivf, q, 1)
        s = time.perf_counter() - t0
        rows.append({
            "nprobe": nprobe,
            "default": nprobe == cfg["nprobe"],
            "search_s": s,
            "speedup": exact_s / s,
            "recall_at_1": float(np.mean(i[:, 0] == exact_i[:, 0])),
            # what the score sees: how much farther the neighbour found is than the true nearest
            "distance_excess": float(np.mean(d[:, 0] / np.maximum(exact_d[:, 0], 1e-12) - 1.0)),
        })
        log(f"[ivf {n}] nprobe {nprobe}: search {s:.2f} s, recall@1 {rows[-1]['recall_at_1']:.4f}")
    return {"train": [n, DIM], "queries": queries, "nlist": cfg["nlist"], "exact_build_s": flat_build,
            "exact_search_s": exact_s, "ivf_build_s": ivf_build, "ivf": rows}


# ---- report ----------------------------------------------------------------------------------------


def print_tables(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False, width=200)
    s = result["score"]
    table = Table(title=f"score time on a CIFAR-size store: train 50k x 512, {s['scored_rows']:,} rows scored "
                        f"({len(s['ood_sets'])} OOD sets + 10k ID test)")
    for col in ("method", "score s", "vs KNN", "mean AUROC"):
        table.add_column(col, justify="left" if col == "method" else "right")
    ivf = s["grood_index"]
    names = {"grood": f"GROOD, IVF (nlist {ivf['nlist']}, nprobe {ivf['nprobe']})", "grood-exact": "GROOD, exact (flat)",
             "knn": "KNN (k = 50, exact; builds its index in score)"}
    for key, label in names.items():
        table.add_row(label, f"{s['score_s'][key]:.1f}", f"{s['score_s']['knn'] / s['score_s'][key]:.1f}x",
                      f"{s['mean_auroc'][key]:.4f}")
    console.print(table)
    console.print(f"GROOD one-time steps: gradients of {s['gradient_rows']:,} rows {s['grood_gradients_s']:.1f} s, "
                  f"IVF index {s['grood_index_s']:.1f} s")
    table = Table(title="faiss IVF vs exact search, dim 512 (recall@1: same nearest row as exact; "
                        "distance +%: how much farther the neighbour found is, on average)")
    for col in ("train rows", "queries", "nlist", "nprobe", "exact search s", "IVF search s", "speed-up",
                "recall@1", "distance +%", "IVF build s", "exact build s"):
        table.add_column(col, justify="right")
    for case in result["ivf"]:
        for r in case["ivf"]:
            table.add_row(f"{case['train'][0]:,}", f"{case['queries']:,}", str(case["nlist"]),
                          f"{r['nprobe']}{' (default)' if r['default'] else ''}", f"{case['exact_search_s']:.2f}",
                          f"{r['search_s']:.3f}", f"{r['speedup']:.1f}x", f"{r['recall_at_1']:.4f}",
                          f"{100 * r['distance_excess']:.3f}", f"{case['ivf_build_s']:.1f}",
                          f"{case['exact_build_s']:.1f}")
    console.print(table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=("small", "full"), default="small",
                    help="small: 2 x 10k OOD sets, 1M case with --queries/4 queries; full: OpenOOD CIFAR-10 OOD sizes")
    ap.add_argument("--queries", type=int, default=2000, help="queries for the IVF recall/speed cases")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "grood.json")
    args = ap.parse_args()
    import faiss
    import torch

    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "faiss": faiss.__version__,
            "faiss_gpu": faiss_index.gpu_available(), "torch": torch.__version__, "scale": args.scale,
            "date": time.strftime("%Y-%m-%d"), "load_average_1min_at_start": os.getloadavg()[0]}
    nprobes = [1, 8, 32, 64]
    one_m_queries = args.queries if args.scale == "full" else max(1, args.queries // 4)
    with tempfile.TemporaryDirectory(prefix="oodcli-grood-bench-") as tmp:
        score = score_case(Path(tmp), OPENOOD_CIFAR10 if args.scale == "full" else SMALL)
    ivf = [ivf_case(100_000, args.queries, nprobes), ivf_case(1_000_000, one_m_queries, nprobes)]
    meta["load_average_1min_at_end"] = os.getloadavg()[0]
    result = {"meta": meta, "score": score, "ivf": ivf}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print_tables(result)
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
