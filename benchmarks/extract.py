"""Extraction throughput against the bare forward pass, and the cost of a cache hit.

For each case, in the same run and on the same data loader settings:
  bare     - DataLoader + preprocessing + forward pass, outputs discarded
  extract  - oodcli's extract (forward + device->host copy + fp16 cast + chunked
             background writes + fingerprinting), into a fresh store each repeat
  ratio    - extract throughput / bare throughput (goal >= 0.95)
  cache    - a re-run of the same extract on the finished store (goal < 1 s), timed
             in-process and as a whole `oodcli extract` command (Python start-up and
             imports included; a cache hit imports no torch).
  shards   - the same extraction as whole `oodcli extract` processes: one process with
             every core vs `--shard 0/2` and `--shard 1/2` side by side, one thread each.
  adapters - SOURCE:NAME models of real size with random weights (torchvision convnext_tiny,
             timm resnet50, a Hugging Face ViT-B/16 config saved with save_pretrained) at 224 px:
             the bare forward is the library's own module (``HookedBackbone.net``, no hooks),
             against oodcli's extract through the hook-based adapter, --adapter-rows images.
  folder   - what a cache hit of an image folder costs at --files (default 100,000) files in
             1,000 class folders: listing them (the baseline, needed anyway for the labels),
             the identity (a stat per file: path, size, mtime), and --verify-content's read
             of every byte (files of --file-bytes each).
Best of --repeats runs is kept for each timing.

Usage: python benchmarks/extract.py [--repeats 3] [--files 100000] [--adapter-rows 64] [--only all|adapters|folder]
       [--out benchmarks/results/extract.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from oodcli.api import extract_splits
from oodcli.backbones import get_spec
from oodcli.data.base import TransformedDataset, open_source
from oodcli.data.benchmarks import get_benchmark
from oodcli.store import remove_store

ROOT = Path(__file__).resolve().parent.parent
CKPT = ROOT / "stores" / "digits_cnn.safetensors"


def bare_forward(model_name: str, weights, splits, batch_size: int) -> tuple[float, int]:
    t0 = time.perf_counter()  # building the network counts, as it does for extract
    spec = get_spec(model_name)
    net = spec.build(weights).eval()
    layers = tuple(spec.default_layers)
    bench = get_benchmark("digits")
    rows = 0
    with torch.inference_mode():
        for split in splits:
            d = bench.split(split)
            data = open_source(d.source, Path("data"), d.is_ood)
            loader = torch.utils.data.DataLoader(
                TransformedDataset(data, spec.preprocess.to_transform()), batch_size=batch_size, shuffle=False
            )
            for images, _ in loader:
                net(images, layers)
                rows += len(images)
    return time.perf_counter() - t0, rows


def run_extract(model_name: str, weights, splits, batch_size: int, store: Path) -> tuple[float, int]:
    t0 = time.perf_counter()
    results = extract_splits(
        model_name, store, benchmark="digits", splits=splits, weights=weights, batch_size=batch_size, device="cpu"
    )
    return time.perf_counter() - t0, sum(r.rows_computed for r in results)


def case(name: str, model: str, weights, splits, batch_size: int, repeats: int, tmp: Path) -> dict:
    # warm-up: first-touch costs (data generation, weight loading, allocator) out of the timings
    bare_forward(model, weights, splits[:1], batch_size)
    bare, ext = [], []
    store = tmp / f"{name}.zarr"
    for _ in range(repeats):  # interleaved, so drift on the machine hits both alike
        bare.append(bare_forward(model, weights, splits, batch_size))
        remove_store(store)
        ext.append(run_extract(model, weights, splits, batch_size, store))
    rows = bare[0][1]
    bare_s, ext_s = min(t for t, _ in bare), min(t for t, _ in ext)
    t0 = time.perf_counter()
    hits = extract_splits(model, store, benchmark="digits", splits=splits, weights=weights, batch_size=batch_size)
    cache_s = time.perf_counter() - t0
    assert all(r.status == "cached" for r in hits)
    cmd = [sys.executable, "-m", "oodcli", "-q", "extract", "--model", model, "--benchmark", "digits",
           "--store", str(store), "--batch-size", str(batch_size)]
    for s in splits:
        cmd += ["--split", s]
    if weights:
        cmd += ["--weights", str(weights)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    cli_s = time.perf_counter() - t0
    return {
        "case": name,
        "model": model,
        "rows": rows,
        "batch_size": batch_size,
        "bare_img_per_s": rows / bare_s,
        "extract_img_per_s": rows / ext_s,
        "ratio": bare_s / ext_s,
        "cache_hit_s_in_process": cache_s,
        "cache_hit_s_cli": cli_s,
    }


def shards_case(model: str, weights, splits, batch_size: int, repeats: int, tmp: Path) -> dict:
    """Wall time of one extract process vs two shards at once (whole processes, start-up included)."""
    base = [sys.executable, "-m", "oodcli", "-q", "extract", "--model", model, "--benchmark", "digits",
            "--batch-size", str(batch_size), "--device", "cpu"] + [a for s in splits for a in ("--split", s)]
    if weights:
        base += ["--weights", str(weights)]
    one, two = [], []
    for r in range(repeats):
        store = tmp / f"one-{r}.zarr"
        t0 = time.perf_counter()
        subprocess.run(base + ["--store", str(store)], check=True, capture_output=True)
        one.append(time.perf_counter() - t0)
        store = tmp / f"two-{r}.zarr"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        t0 = time.perf_counter()
        procs = [subprocess.Popen(base + ["--store", str(store), "--shard", f"{i}/2"], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for i in range(2)]
        for p in procs:
            assert p.wait() == 0, p.stderr.read()
        two.append(time.perf_counter() - t0)
    return {"model": model, "splits": splits, "one_process_s": min(one), "two_shards_s": min(two),
            "speedup": min(one) / min(two)}


def adapter_case(name: str, model: str, weights, rows: int, batch_size: int, repeats: int, tmp: Path) -> dict:
    """extract through the hook-based adapter vs the library module's own forward, same images."""
    from PIL import Image

    folder = tmp / f"{name}-images"
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(rows):
        Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(folder / f"{i:04d}.png")
    spec = get_spec(model, weights)
    data = open_source(f"folder:{folder}", tmp)
    module = spec.requesting(tuple(spec.default_layers)).build(weights).net.eval()

    def bare() -> float:
        t0 = time.perf_counter()
        loader = torch.utils.data.DataLoader(TransformedDataset(data, spec.preprocess.to_transform()), batch_size=batch_size)
        with torch.inference_mode():
            for images, _ in loader:
                module(images)
        return time.perf_counter() - t0

    def extract() -> float:
        store = tmp / f"{name}.zarr"
        remove_store(store)
        t0 = time.perf_counter()
        extract_splits(model, store, data=f"folder:{folder}", splits=["ood/far/x"], weights=weights,
                       batch_size=batch_size, device="cpu")
        return time.perf_counter() - t0

    bare()  # warm-up
    times = [(bare(), extract()) for _ in range(repeats)]
    bare_s, ext_s = min(b for b, _ in times), min(e for _, e in times)
    return {"case": name, "model": model, "rows": rows, "bare_img_per_s": rows / bare_s,
            "extract_img_per_s": rows / ext_s, "ratio": bare_s / ext_s}


def hf_vit_folder(tmp: Path) -> Path:
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    folder = tmp / "hf-vit-b16"
    ViTForImageClassification(ViTConfig(num_labels=1000)).eval().save_pretrained(folder)
    ViTImageProcessor().save_pretrained(folder)
    return folder


def folder_case(files: int, file_bytes: int, tmp: Path) -> dict:
    """Listing, identity and content hash of a big ImageNet-style folder (no image is decoded)."""
    root = tmp / "folder"
    classes = 1000
    payload = os.urandom(file_bytes)
    for c in range(classes):
        sub = root / f"n{c:08d}"
        sub.mkdir(parents=True)
        for i in range(files // classes):
            (sub / f"{i:05d}.JPEG").write_bytes(payload)
    t0 = time.perf_counter()
    data = open_source(f"folder:{root}", tmp)
    listed = time.perf_counter() - t0
    t0 = time.perf_counter()
    data.identity()
    identity = time.perf_counter() - t0
    t0 = time.perf_counter()
    data.content_hash()
    content = time.perf_counter() - t0
    n = len(data)
    return {"files": n, "file_bytes": file_bytes, "list_s": listed, "identity_s": identity, "content_hash_s": content,
            "identity_us_per_file": 1e6 * identity / n, "identity_over_list": identity / listed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--adapter-rows", type=int, default=64)
    parser.add_argument("--only", choices=["all", "adapters", "folder"], default="all")
    parser.add_argument("--file-bytes", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "extract.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    all_splits = [s.name for s in get_benchmark("digits").splits]
    if CKPT.exists():
        cnn, cnn_weights = "digits_cnn", str(CKPT)
    else:
        cnn, cnn_weights = "digits_cnn-tiny", None
    rows, adapters, sharded, folder = [], [], None, None
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.only == "all":
            rows.append(case("digits-cnn-32px", cnn, cnn_weights, all_splits, 256, args.repeats, tmp))
            rows.append(case("resnet18-224px", "resnet18", "random", ["test"], 64, max(1, args.repeats - 1), tmp))
            sharded = shards_case("resnet18", "random", ["test", "ood/far/noise"], 64, max(1, args.repeats - 1), tmp)
        if args.only in ("all", "adapters"):
            for name, model, weights in (("torchvision-convnext_tiny", "torchvision:convnext_tiny", "random"),
                                         ("timm-resnet50", "timm:resnet50", "random"),
                                         ("hf-vit-b16", f"hf:{hf_vit_folder(tmp)}", "random")):
                adapters.append(adapter_case(name, model, weights, args.adapter_rows, 16, max(1, args.repeats - 1), tmp))
        if args.only in ("all", "folder"):
            folder = folder_case(args.files, args.file_bytes, tmp)
    header = f"{'case':18} {'rows':>6} {'bare img/s':>11} {'extract img/s':>14} {'ratio':>6} {'hit (lib)':>10} {'hit (CLI)':>10}"
    print(header)
    for r in rows:
        print(
            f"{r['case']:18} {r['rows']:6d} {r['bare_img_per_s']:11.1f} {r['extract_img_per_s']:14.1f} "
            f"{r['ratio']:6.3f} {r['cache_hit_s_in_process']:9.3f}s {r['cache_hit_s_cli']:9.2f}s"
        )
    for r in adapters:
        print(f"{r['case']:26} {r['rows']:6d} bare module {r['bare_img_per_s']:7.2f} img/s, extract through the "
              f"adapter {r['extract_img_per_s']:7.2f} img/s, ratio {r['ratio']:.3f}")
    if sharded:
        print(f"shards  resnet18 224 px, {', '.join(sharded['splits'])}: one process {sharded['one_process_s']:.1f} s, "
              f"two shards at once {sharded['two_shards_s']:.1f} s (x{sharded['speedup']:.2f})")
    if folder:
        print(f"folder  {folder['files']:,} files: listing {folder['list_s']:.2f} s, identity (stat each) "
              f"{folder['identity_s']:.2f} s ({folder['identity_us_per_file']:.1f} us/file, x{folder['identity_over_list']:.2f} "
              f"of the listing), --verify-content {folder['content_hash_s']:.2f} s at {folder['file_bytes']} B/file")
    meta = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": rows, "adapters": adapters, "shards": sharded, "folder": folder}, indent=2))
    print(f"saved {args.out}")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
