"""What the store's safety costs: checksums, transactions, verify, the image pre-check.

In one run, on the same machine:
  chunks    - writing and reading a [rows, 512] float16 array chunk by chunk, with
              crc32c checksums (what the store writes) vs the same array with no codec
  commit    - writing 13 methods x 5 splits of scores (100k rows each) through one
              transaction vs written directly in place (what the store did before)
  verify    - `store verify` over that store (every chunk read and checked), GB/s
  images    - checking a folder of 224 px JPEGs before extraction (decode at 1/8 scale)
              vs decoding them fully with the ResNet preprocessing (what extraction does
              anyway) vs a resnet18 forward pass on the CPU
Best of --repeats runs is kept for each timing.

Usage: python benchmarks/store.py [--repeats 3] [--out benchmarks/results/store.json]
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

from oodcli.store import open_store, remove_store
from oodcli.store_info import verify_store

ROOT = Path(__file__).resolve().parent.parent


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def chunk_io(tmp: Path, rows: int, repeats: int) -> dict:
    """Plain zarr with and without the crc32c codec (the checksum's own cost), and the
    store's chunked reader on top (per-chunk lookup and missing-chunk check)."""
    import zarr
    from zarr.codecs import Crc32cCodec

    data = np.random.default_rng(0).normal(size=(rows, 512)).astype(np.float16)
    step = 8192
    gib = data.nbytes / 2**30
    out: dict = {"rows": rows, "gib": gib}
    for name, codec in (("plain", None), ("crc32c", [Crc32cCodec()])):
        path = tmp / f"{name}.zarr"

        def write():
            remove_store(path)
            arr = zarr.create_array(path, shape=data.shape, dtype=data.dtype, chunks=(step, 512), compressors=codec)
            for start in range(0, rows, step):
                arr[start:start + step] = data[start:start + step]

        def read():
            arr = zarr.open_array(path, mode="r")
            for start in range(0, rows, step):
                arr[start:start + step]

        out[f"{name}_write_gib_s"] = gib / best(write, repeats)
        out[f"{name}_read_gib_s"] = gib / best(read, repeats)
    path = tmp / "store.zarr"
    remove_store(path)
    with open_store(path, "a") as st:
        st.create_array("x", data.shape, data.dtype, chunk_rows=step)
        for start in range(0, rows, step):
            st.write_rows("x", start, data[start:start + step])

    def store_read():
        with open_store(path) as st:
            for _ in st.iter_rows("x"):
                pass

    out["store_read_gib_s"] = gib / best(store_read, repeats)
    out["crc32c_read_ratio"] = out["crc32c_read_gib_s"] / out["plain_read_gib_s"]
    out["crc32c_write_ratio"] = out["crc32c_write_gib_s"] / out["plain_write_gib_s"]
    return out


def commits(tmp: Path, rows: int, repeats: int) -> dict:
    scores = np.random.default_rng(1).normal(size=rows).astype(np.float32)
    names = [(f"m{i}", f"ood/s{j}") for i in range(13) for j in range(5)]
    path = tmp / "scores.zarr"

    def direct():
        remove_store(path)
        with open_store(path, "a") as st:
            for method, split in names:
                st.write_array(f"scores/{method}/{split}", scores, method=method)

    def transaction():
        remove_store(path)
        with open_store(path, "a") as st:
            with st.transaction() as txn:
                for method, split in names:
                    st.write_array(txn.stage(f"scores/{method}/{split}"), scores, method=method)

    d_s, t_s = best(direct, repeats), best(transaction, repeats)
    v_s = best(lambda: verify_store(open_store(path)), repeats)
    size = 4 * rows * len(names)
    return {"arrays": len(names), "rows": rows, "direct_s": d_s, "transaction_s": t_s,
            "overhead": t_s / d_s - 1, "verify_s": v_s, "verify_gib_s": size / 2**30 / v_s}


def images(tmp: Path, n: int, repeats: int) -> dict:
    import torch
    from PIL import Image

    from oodcli.backbones import get_spec
    from oodcli.data.base import open_source

    folder = tmp / "jpegs"
    folder.mkdir()
    rng = np.random.default_rng(2)
    base = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    for i in range(n):  # smooth natural-ish images compress like photos
        img = Image.fromarray(base).resize((256, 256), Image.BILINEAR).rotate(i % 360)
        img.save(folder / f"{i:05d}.jpg", quality=90)
    data = open_source(f"folder:{folder}", tmp)
    spec = get_spec("resnet18")
    transform = spec.preprocess.to_transform()
    check_s = best(lambda: data.unreadable(), repeats)
    decode_s = best(lambda: [transform(data.load(i)) for i in range(n)], repeats)
    net = spec.build("random").eval()
    x = torch.stack([transform(data.load(i % n)) for i in range(64)])
    with torch.inference_mode():
        net(x[:8], tuple(spec.default_layers))
        fwd_s = best(lambda: net(x, tuple(spec.default_layers)), repeats) / 64 * n
    return {"images": n, "check_ms_per_image": 1e3 * check_s / n, "decode_ms_per_image": 1e3 * decode_s / n,
            "resnet18_cpu_ms_per_image": 1e3 * fwd_s / n, "check_vs_decode": check_s / decode_s,
            "check_vs_extract": check_s / (decode_s + fwd_s)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "store.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        io = chunk_io(Path(tmp), args.rows, args.repeats)
        print(f"chunks  {io['rows']} x 512 fp16 ({io['gib']:.2f} GiB), GiB/s: write {io['crc32c_write_gib_s']:.2f} with "
              f"crc32c vs {io['plain_write_gib_s']:.2f} without (ratio {io['crc32c_write_ratio']:.2f}); read "
              f"{io['crc32c_read_gib_s']:.2f} vs {io['plain_read_gib_s']:.2f} (ratio {io['crc32c_read_ratio']:.2f}); "
              f"the store's chunk reader {io['store_read_gib_s']:.2f}")
        cm = commits(Path(tmp), 100_000, args.repeats)
        print(f"commit  {cm['arrays']} score arrays x {cm['rows']} rows: direct {cm['direct_s']:.2f} s, "
              f"one transaction {cm['transaction_s']:.2f} s ({100 * cm['overhead']:+.0f}%); verify "
              f"{cm['verify_s']:.2f} s ({cm['verify_gib_s']:.2f} GiB/s)")
        im = images(Path(tmp), args.images, args.repeats)
        print(f"images  {im['images']} JPEGs 256 px: pre-check {im['check_ms_per_image']:.2f} ms/image, full decode + "
              f"preprocess {im['decode_ms_per_image']:.2f} ms, resnet18 CPU forward {im['resnet18_cpu_ms_per_image']:.1f} ms; "
              f"check / decode {im['check_vs_decode']:.2f}, check / extraction {im['check_vs_extract']:.3f}")
    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "chunks": io, "commit": cm, "images": im}, indent=2))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
