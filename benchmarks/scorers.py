"""Scorer speed and memory, and what extracting once saves. Three parts in one run:

1. CIFAR-size: synthetic float16 features in a temporary store (50k x 512 train,
   10 classes, 10k ID test, 4 x 10k OOD). Every scorer: fit time (the ID train
   split: statistics, percentiles, KNN's index) and score time (all 5 splits), and
   peak memory by tracemalloc (peak of traced allocations above the level before
   the step: every numpy buffer is traced; faiss's C++ index is not, so KNN's
   index size is added, computed as rows x dim x 4 bytes).
2. ImageNet-size: 1.28M x 2048 float16 train, 1000 classes, 50k ID test and
   2 x 10k OOD, times ``--scale`` (default 0.1; the full size takes well over
   5 minutes on 2 cores, mostly the 2048 x 2048 float64 scatter passes, each
   ~10 TFLOP at full size). The streaming scorers (all but KNN, whose index holds
   the train split by design) each run in a child process of their own under a
   fixed address-space cap (RLIMIT_AS = the child's size after its imports +
   ``--cap-mib``, default 768 MiB, whatever the scale; the train split alone is
   500 MiB as float16 and 1000 MiB as float32 at the default scale), and must finish;
   one child per scorer, so each is measured alone and none inherits another's heap; the
   libraries scorers use (faiss, scikit-learn) are imported before the cap.
   Per scorer the tracemalloc peaks as above, its child's RSS after imports, peak RSS
   (VmHWM) and peak address space above the imports (VmPeak).
3. End to end on the embedded digits benchmark with the digits CNN: "extract once
   + N scorers" against "N x (extract + score one)", N = every baseline, both
   measured in this run, each extract into a fresh store.

Usage: python benchmarks/scorers.py [--scale 0.1] [--cap-mib 768] [--out benchmarks/results/scorers.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

from oodcli.scorers import get_scorer
from oodcli.store import open_store, remove_store

ROOT = Path(__file__).resolve().parent.parent
CKPT = ROOT / "stores" / "digits_cnn.safetensors"
BACKBONE, MODEL_ID = "synthetic", "synthetic-model"
MIB = 1 << 20
BASELINES = ["msp", "maxlogit", "energy", "gen", "mahalanobis", "rmds", "knn", "vim", "residual", "react",
             "ash-p", "ash-s", "ash-b", "temp-scaling", "entropy", "klm", "weighted-energy", "gradnorm", "dice",
             "openmax", "she", "fdbd", "nci", "vra", "nnguide", "relation", "gmm", "ssd", "mds-ensemble", "neco",
             "caref", "cadref", "cfood", "lts", "pnml", "gradnorm-kl", "maxcosine", "l1norm"]
# rankfeat reads a featmap and ensemble several backbones, which these synthetic stores do not hold
# KNN's index, Relation's bank and CF-OOD's reference set hold (part of) the train split by design; the
# ImageNet-size train split has no logits (2.5 GB at full size)
STREAMING = [m for m in BASELINES if m not in ("knn", "relation", "cfood") and not (get_scorer(m).needs_fit and "logits" in get_scorer(m).layers)]


# ---- synthetic stores -------------------------------------------------------------------


def write_split(st, split, n, dim, head, rng, role, logits=True, chunk=2048):
    """Post-ReLU-like float16 features (class centre + noise; OOD shifted), written chunk by chunk."""
    weight, bias = head
    classes = weight.shape[0]
    centres = np.random.default_rng(1).normal(0, 1, (classes, dim)).astype(np.float32)
    labels = np.full(n, -1, np.int64) if role != "id" else rng.integers(0, classes, n)
    node = f"splits/{split}"
    st.write_array(f"{node}/labels", labels)
    st.write_array(f"{node}/ids", np.arange(n, dtype=np.int64))
    st.set_attrs(node, role=role, n=n)
    layers = ["penultimate"] + (["logits"] if logits else [])
    for layer, d in zip(layers, (dim, classes)):
        st.create_array(f"{node}/{BACKBONE}/{layer}", (n, d), np.float16)
    for start in range(0, n, chunk):
        y = labels[start : start + chunk]
        noise = rng.standard_normal((len(y), dim), dtype=np.float32)
        x = np.maximum(centres[np.maximum(y, 0)] * (role == "id") + noise + (0.3 if role != "id" else 0.0), 0)
        st.write_rows(f"{node}/{BACKBONE}/penultimate", start, x.astype(np.float16))
        if logits:
            st.write_rows(f"{node}/{BACKBONE}/logits", start, (x @ weight.T + bias).astype(np.float16))
    st.set_attrs(f"{node}/{BACKBONE}", complete=True, rows_done=n, model_id=MODEL_ID, fingerprint=f"{split}-{n}-{dim}",
                 parts={"weights": MODEL_ID, "preprocess": "none"})


def ood_names(count: int) -> list[str]:
    return [f"ood/{'near' if i < count // 2 else 'far'}/set{i}" for i in range(count)]


def make_store(path, train, test, oods, dim, classes, train_logits=True):
    rng = np.random.default_rng(0)
    head = (rng.normal(0, 1 / np.sqrt(dim), (classes, dim)).astype(np.float32),
            rng.normal(0, 0.1, classes).astype(np.float32))
    with open_store(path, "a") as st:
        st.write_array(f"backbones/{BACKBONE}/head/weight", head[0])
        st.write_array(f"backbones/{BACKBONE}/head/bias", head[1])
        st.set_attrs(f"backbones/{BACKBONE}", model_id=MODEL_ID)
        write_split(st, "train", train, dim, head, rng, "id", logits=train_logits)
        write_split(st, "test", test, dim, head, rng, "id")
        for name, n in zip(ood_names(len(oods)), oods):
            write_split(st, name, n, dim, head, rng, "ood-near" if "/near/" in name else "ood-far")
    return ["test"] + ood_names(len(oods))


# ---- one scorer, measured --------------------------------------------------------------------


def measure(store, name: str, splits: list[str]) -> dict:
    """Fit (or just load the head) and score every split, with tracemalloc peaks for each step."""
    scorer = get_scorer(name)
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    t0 = time.perf_counter()
    scorer.prepare(store, BACKBONE, "train", MODEL_ID)
    fit_s = time.perf_counter() - t0
    fit_peak = tracemalloc.get_traced_memory()[1] - base
    index_bytes = scorer.index.ntotal * scorer.index.d * 4 if name == "knn" else 0
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    t0 = time.perf_counter()
    rows = sum(len(scorer.score(store, BACKBONE, s)) for s in splits)
    score_s = time.perf_counter() - t0
    score_peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    scorer.release()
    return {
        "method": name,
        "fit_s": fit_s if scorer.needs_fit else None,
        "fit_peak_mib": (fit_peak + index_bytes) / MIB if scorer.needs_fit else None,
        "score_s": score_s,
        "score_rows_per_s": rows / score_s,
        "score_peak_mib": (score_peak + index_bytes) / MIB,  # the index stays in RAM while scoring
    }


def cifar_case(tmp: Path) -> dict:
    path = tmp / "cifar.zarr"
    t0 = time.perf_counter()
    splits = make_store(path, 50_000, 10_000, [10_000] * 4, 512, 10)
    print(f"[cifar] synthetic store written in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    with open_store(path) as st:
        rows = [measure(st, name, splits) for name in BASELINES]
    remove_store(path)
    return {"train": [50_000, 512], "classes": 10, "scored_rows": 50_000, "dtype": "float16", "results": rows}


def _status_bytes(field: str) -> int:
    """A size from /proc/self/status (VmSize: address space now, VmPeak: its high-water mark, VmHWM: peak RSS)."""
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(field)).split()[1]) * 1024


def child_main(store: str, cap_mib: int, name: str) -> None:
    """Run one streaming scorer under an address-space cap; print its measurements as JSON."""
    # the libraries scorers import, before the cap: scikit-learn's import alone maps ~440 MiB of address
    # space (scipy's BLAS), a fixed cost of the library, not of the data a scorer holds
    import faiss  # noqa: F401
    import sklearn.linear_model  # noqa: F401  (mds-ensemble's layer weights)
    import sklearn.mixture  # noqa: F401  (gmm)

    vm, rss = _status_bytes("VmSize"), _status_bytes("VmRSS")
    cap = vm + cap_mib * MIB
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    with open_store(store) as st:
        row = measure(st, name, ["test"] + ood_names(2))
    print(json.dumps({
        **row,
        "rss_after_imports_mib": rss / MIB,
        "max_rss_mib": _status_bytes("VmHWM") / MIB,  # not ru_maxrss, which keeps the parent's across exec
        "vm_peak_above_imports_mib": (_status_bytes("VmPeak") - vm) / MIB,
    }))


def imagenet_case(tmp: Path, scale: float, cap_mib: int) -> dict:
    train, test, ood = round(1_281_167 * scale), round(50_000 * scale), round(10_000 * scale)
    path = tmp / "imagenet.zarr"
    t0 = time.perf_counter()
    make_store(path, train, test, [ood, ood], 2048, 1000, train_logits=False)
    print(f"[imagenet x{scale}] synthetic store ({train} x 2048 train) written in {time.perf_counter() - t0:.1f} s",
          file=sys.stderr)
    # glibc: few arenas (each reserves 64 MiB of address space), and big arrays always mmapped and returned
    env = {**os.environ, "MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    rows, failed = [], []
    for name in STREAMING:
        proc = subprocess.run([sys.executable, __file__, "--child", str(path), str(cap_mib), name],
                              capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            print(f"[imagenet x{scale}] {name} failed under the {cap_mib} MiB cap: {last}", file=sys.stderr)
            failed.append({"method": name, "error": last})
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"[imagenet x{scale}] {name}: peak address space {rows[-1]['vm_peak_above_imports_mib']:.0f} MiB "
              "above imports", file=sys.stderr)
    remove_store(path)
    return {"scale": scale, "train": [train, 2048], "classes": 1000, "scored_rows": test + 2 * ood,
            "train_mib_on_disk": train * 2048 * 2 / MIB, "cap_mib_above_imports": cap_mib, "results": rows,
            "failed": failed}


# ---- extract once vs extract per scorer --------------------------------------------------------


def end_to_end(tmp: Path) -> dict:
    from oodcli.api import extract_splits
    from oodcli.scoring import score_store

    if not CKPT.exists():
        subprocess.run([sys.executable, "-m", "oodcli", "-q", "train", "classifier", "--out", str(CKPT)], check=True)
    methods = [m for m in BASELINES if m != "temp-scaling"]  # the digits CNN gets every train sample right: no T

    def extract(path):
        t0 = time.perf_counter()
        extract_splits("digits_cnn", path, benchmark="digits", weights=str(CKPT), device="cpu")
        return time.perf_counter() - t0

    def score(path, method):
        t0 = time.perf_counter()
        with open_store(path, "r+") as st:
            score_store(st, [method])
        return time.perf_counter() - t0

    extract(tmp / "warmup.zarr")  # first-touch costs (digits data, torch kernels) out of both timings
    once_path = tmp / "once.zarr"
    once_extract = extract(once_path)
    once_scores = [score(once_path, m) for m in methods]
    separate = []
    for m in methods:
        path = tmp / f"sep-{m}.zarr"
        separate.append(extract(path) + score(path, m))
        remove_store(path)
    once = once_extract + sum(once_scores)
    return {"n_scorers": len(methods), "extract_s": once_extract, "scores_s": sum(once_scores), "once_s": once,
            "separate_s": sum(separate), "ratio_separate_over_once": sum(separate) / once}


# ---- output ---------------------------------------------------------------------------------------


def _f(v, fmt):
    return "-" if v is None else format(v, fmt)


def print_table(title: str, rows: list[dict]) -> None:
    capped = any("vm_peak_above_imports_mib" in r for r in rows)
    print(title)
    print(f"{'method':12} {'fit s':>8} {'fit MiB':>8} {'score s':>8} {'rows/s':>10} {'score MiB':>9}"
          + (f" {'peak RSS':>8} {'peak VM+':>8}" if capped else ""))
    for r in rows:
        print(f"{r['method']:12} {_f(r['fit_s'], '8.2f')} {_f(r['fit_peak_mib'], '8.1f')} {r['score_s']:8.2f} "
              f"{r['score_rows_per_s']:10.0f} {r['score_peak_mib']:9.1f}"
              + (f" {r['max_rss_mib']:8.0f} {r['vm_peak_above_imports_mib']:8.0f}" if capped else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=0.1, help="ImageNet-size case at this fraction (1 = 1.28M rows)")
    parser.add_argument("--cap-mib", type=int, default=768, help="address space allowed above a child's imports")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "scorers.json")
    args = parser.parse_args()
    t_start, load_before = time.perf_counter(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        cifar = cifar_case(Path(tmp))
        imagenet = imagenet_case(Path(tmp), args.scale, args.cap_mib)
        e2e = end_to_end(Path(tmp))
    print_table("CIFAR-size: 50k x 512 train (float16), 10 classes; scored 10k ID + 4 x 10k OOD; "
                "peak MiB by tracemalloc (+ faiss index)", cifar["results"])
    print()
    i = imagenet
    print_table(f"ImageNet-size x{i['scale']}: {i['train'][0]} x 2048 train (float16, {i['train_mib_on_disk']:.0f} MiB "
                f"on disk), 1000 classes; scored {i['scored_rows']} rows; each streaming scorer in a child process "
                f"capped at its imports + {i['cap_mib_above_imports']} MiB of address space (peak RSS MiB, peak "
                "address space MiB above the imports)", i["results"])
    for f in i["failed"]:
        print(f"{f['method']:12} FAILED under the cap: {f['error']}")
    if i["results"]:
        worst = max(i["results"], key=lambda r: r["vm_peak_above_imports_mib"])
        print(f"largest peak address space above imports: {worst['vm_peak_above_imports_mib']:.0f} MiB ({worst['method']}; "
              f"cap {i['cap_mib_above_imports']} MiB); child RSS after imports {worst['rss_after_imports_mib']:.0f} MiB")
    print()
    print(f"End to end, digits CNN, {e2e['n_scorers']} scorers: extract once {e2e['extract_s']:.2f} s + scoring "
          f"{e2e['scores_s']:.2f} s = {e2e['once_s']:.2f} s; N x (extract + score) = {e2e['separate_s']:.2f} s; "
          f"ratio {e2e['ratio_separate_over_once']:.1f}x")
    meta = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "numpy": np.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "total_s": time.perf_counter() - t_start,
        "load_average_before_after": [load_before, os.getloadavg()[0]],  # other work on the machine skews timings
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "cifar": cifar, "imagenet": imagenet, "end_to_end": e2e}, indent=2))
    print(f"total {meta['total_s']:.0f} s (1-min load average {load_before:.1f} before, "
          f"{meta['load_average_before_after'][1]:.1f} after, on {os.cpu_count()} cores); saved {args.out}")
    if imagenet["failed"]:
        raise SystemExit(f"{len(imagenet['failed'])} streaming scorer(s) exceeded the {args.cap_mib} MiB cap: "
                         + ", ".join(f["method"] for f in imagenet["failed"]))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_main(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    else:
        main()
