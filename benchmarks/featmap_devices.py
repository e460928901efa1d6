"""Device agreement check: featmap, ODIN and Mahalanobis-perturbed extraction (and the
scores over them) on cuda vs cpu, random-init tiny CNNs, HDF5 stores (no zarr needed on the
GPU machine). Prints max abs differences per array. Run: python3 benchmarks/featmap_devices.py
(env K=8 shrinks the splits, NAMES=digits_cnn-tiny picks backbones)."""
import sys, time, tempfile
from pathlib import Path
import numpy as np
import torch
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root
import oodcli.extract as ex
from oodcli.backbones import get_spec
from oodcli.perturb import parse_perturb
from oodcli.store import open_store
from oodcli.scoring import score_methods

print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")

from oodcli.data.base import ImageDataset
class D(ImageDataset):
    def __init__(self, name, n, seed, labels):
        from PIL import Image
        rng = np.random.default_rng(seed)
        self.name = name
        self._im = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]
        self.labels = np.asarray(labels, dtype=np.int64)
    def load(self, i): return self._im[i]

import os
K = int(os.environ.get("K", "1"))
SPLITS = (("train", "id", 256 // K, 0), ("test", "id", 128 // K, 1), ("ood/far/x", "ood-far", 128 // K, 2))
P = (parse_perturb("odin"), parse_perturb("mahalanobis"))
out = {}
tmp = Path(tempfile.mkdtemp())
NAMES = os.environ.get("NAMES", "digits_cnn-tiny,cifar_resnet18-tiny,resnet18-tiny").split(",")
DEVS = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu", "cpu")
for name in NAMES:
    spec = get_spec(name)
    for dev_i, dev in enumerate(DEVS):
        path = tmp / f"{name}-{dev}{dev_i}.h5"
        t0 = time.perf_counter()
        with open_store(path, "a") as st:
            lazy = ex.LazyModel(spec, None, dev)
            for split, role, n, seed in SPLITS:
                labels = np.arange(n) % 6 if role == "id" else np.full(n, -1)
                ex.extract_split(st, spec, None, D(f"g:{split}", n, seed, labels), split, role, "g", lazy,
                                 ("logits", "penultimate", "featmap"), batch_size=64, dtype="float32", perturbs=P)
            score_methods(st, ["ash-s", "scale", "odin", "mahalanobis-perturbed", "msp"], id_split="test", ood=["ood/far/x"])
            out[(name, dev_i)] = {k: st.read(k) for k in st.walk_arrays("splits/test") if "/" in k} | \
                {f"scores/{m}": st.read(f"scores/{m}/test") for m in ("ash-s", "scale", "odin", "mahalanobis-perturbed")}
        print(name, dev, f"{time.perf_counter() - t0:.1f}s", flush=True)
    a, b = out[(name, 0)], out[(name, 1)]
    for k in a:
        if k.endswith("labels") or k.endswith("ids"):
            continue
        diff = np.abs(a[k].astype(np.float64) - b[k].astype(np.float64))
        scale = np.abs(a[k]).max() + 1e-12
        print(f"  {k:55s} shape {a[k].shape} max|cpu-cuda| {diff.max():.3g} (rel {diff.max() / scale:.3g})")
