"""CUDA checks and GPU figures, for a machine with a GPU; everything else runs on CPUs.

1. ``extract --device cuda`` (fp16 autocast) against ``--device cpu`` for each backbone
   family's tiny twin on the digits benchmark's test split, both stored as float32: the
   largest relative difference per layer, max|cuda - cpu| / max|cpu|; the CNNs with their
   feature maps and the ODIN / Mahalanobis perturbed layers too.
2. Throughput of real-size architectures with random weights at batch 256, 224 x 224,
   through the extractor's own forward (``run_backbone`` under fp16 autocast): images/s
   (median of timed batches after warm-up) and peak GPU memory. The image decoding and
   resizing of a real extraction run on CPU workers beside it and are not counted here.
3. Every trainer with a CUDA path, run on CUDA through the CLI on the digits benchmark
   (few epochs: a check that it runs and learns, not a training recipe): APEX/PALM head-only
   and end to end, CoOp / LoCoOp / NegPrompt / IIM prompt learning, SynOOD's energy-guided
   diffusion refinement and its projection / negative-label training.

Usage: python benchmarks/gpu.py [--out benchmarks/results/gpu.json] [--steps extract,throughput,trainers,synood]
Each step is run on its own; a failure is recorded (with the end of its output) and the
run goes on.
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
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TWINS = ["digits_cnn-tiny", "resnet18-tiny", "vit-tiny", "cifar_resnet18-tiny", "dinov2-tiny", "clip-tiny"]
#: CNN twins also store their feature maps and the ODIN / Mahalanobis perturbed layers (float32 gradient passes)
CNN_EXTRAS = ["--split", "train", "--layers", "logits,penultimate,featmap",
              "--perturb", "odin", "--perturb", "mahalanobis"]
CNNS = {"digits_cnn-tiny", "resnet18-tiny", "cifar_resnet18-tiny"}
DEVICE = "cuda"  # --device cpu runs the same steps on a CPU (to check the script itself)
REAL = ["resnet50", "vit_b_16", "dinov2-base", "clip-vit-b-16"]


def oodcli(*args: str, timeout: int = 600) -> dict:
    """Run one CLI command; its exit code, seconds and output tail."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "oodcli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-6:]
    return {"command": "oodcli " + " ".join(args), "rc": proc.returncode,
            "seconds": round(time.perf_counter() - t0, 2), "tail": tail}


def step(results: dict, name: str, fn, out: Path) -> None:
    print(f"== {name}", flush=True)
    try:
        results[name] = fn()
    except Exception as exc:  # keep going: one broken step must not hide the others
        results[name] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc().splitlines()[-4:]}
    print(json.dumps(results[name], indent=1)[:2000], flush=True)
    out.write_text(json.dumps(results, indent=1) + "\n")  # after every step: a run cut short keeps what it did


def extract_cpu_vs_cuda(work: Path, models: list[str]) -> dict:
    from oodcli.store import features_node, open_store

    out = {}
    for model in models:
        stores = {}
        for device in ("cpu", DEVICE):
            path = work / f"{model}-{device}.zarr"
            r = oodcli("extract", "--model", model, "--benchmark", "digits", "--split", "test", "--device", device,
                       "--dtype", "float32", "--store", str(path), "--overwrite", *(CNN_EXTRAS if model in CNNS else []))
            if r["rc"] != 0:
                raise RuntimeError(f"{model} on {device}: {r['tail']}")
            stores[device] = path
        diffs = {}
        with open_store(stores["cpu"], "r") as a, open_store(stores[DEVICE], "r") as b:
            node = features_node("test", model)
            for layer in a.children(node):
                x, y = a.read(f"{node}/{layer}").astype(np.float64), b.read(f"{node}/{layer}").astype(np.float64)
                diffs[layer] = float(np.abs(y - x).max() / max(np.abs(x).max(), 1e-12))
        out[model] = diffs
    return out


def throughput(batch: int = 256, timed: int = 10) -> dict:
    import torch

    from oodcli.backbones.spec import get_spec
    from oodcli.extraction import run_backbone

    out = {}
    for name in REAL:
        spec = get_spec(name)
        net = spec.build("random").cuda().eval()
        layers = tuple(spec.default_layers)
        x = torch.randn(batch, 3, 224, 224, device="cuda")
        torch.cuda.reset_peak_memory_stats()
        times = []
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16):
            for i in range(3 + timed):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                run_backbone(net, x, layers)
                torch.cuda.synchronize()
                if i >= 3:
                    times.append(time.perf_counter() - t0)
        out[name] = {"layers": list(layers), "batch": batch, "images_per_s": round(batch / float(np.median(times)), 1),
                     "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20)}
        del net
        torch.cuda.empty_cache()
    return out


def trainers(work: Path) -> dict:
    out = {}
    cnn, store = work / "digits_cnn.safetensors", work / "digits.zarr"
    out["classifier (cpu only)"] = oodcli("train", "classifier", "--out", str(cnn), "--epochs", "10")
    out["extract digits_cnn"] = oodcli("extract", "--model", "digits_cnn", "--weights", str(cnn), "--benchmark", "digits",
                                       "--store", str(store), "--device", DEVICE)
    out["select-k"] = oodcli("select-k", "--store", str(store), "--model", "digits_cnn", "--layer", "penultimate")
    for m in ("apex", "palm"):
        out[f"{m} head-only"] = oodcli("train", m, "--head-only", "--store", str(store), "--backbone", "digits_cnn",
                                       "--out", str(work / f"{m}-head.safetensors"), "--epochs", "20", "--device", DEVICE, "--json")
    out["apex end to end"] = oodcli("train", "apex", "--benchmark", "digits", "--model", "digits_cnn", "--weights", str(cnn),
                                    "--k-from", str(store), "--out", str(work / "apex-e2e.safetensors"), "--epochs", "3",
                                    "--no-flip", "--device", DEVICE, "--json")
    clip = work / "digits_clip.zarr"
    out["extract clip-tiny"] = oodcli("extract", "--model", "clip-tiny", "--benchmark", "digits",
                                      "--layers", "image_embeds,patch_values", "--store", str(clip), "--device", DEVICE)
    coop = str(work / "coop.safetensors")
    out["coop"] = oodcli("train", "coop", "--store", str(clip), "--shots", "16", "--epochs", "3", "--out", coop, "--json")
    out["locoop"] = oodcli("train", "locoop", "--store", str(clip), "--shots", "16", "--epochs", "3", "--top-k", "2",
                           "--out", str(work / "locoop.safetensors"), "--json")
    out["negprompt"] = oodcli("train", "negprompt", "--store", str(clip), "--positive", coop, "--epochs", "2",
                              "--out", str(work / "neg.safetensors"), "--json")
    out["iim"] = oodcli("train", "iim", "--store", str(clip), "--shots", "16", "--k", "4", "--epochs", "3",
                        "--out", str(work / "iim.safetensors"), "--json")
    return out


def synood(work: Path) -> dict:
    """SynOOD's CUDA paths: the diffusion refinement and the projection / negative-label training."""
    out = {}
    cnn, clip = work / "digits_cnn.safetensors", work / "digits_clip.zarr"
    if not cnn.exists():
        out["classifier (cpu only)"] = oodcli("train", "classifier", "--out", str(cnn), "--epochs", "10")
    if not clip.exists():
        out["extract clip-tiny"] = oodcli("extract", "--model", "clip-tiny", "--benchmark", "digits",
                                          "--layers", "image_embeds,patch_values", "--store", str(clip), "--device", DEVICE)
    pipe, images = work / "inpaint", work / "synood"
    out["train diffusion (cpu only)"] = oodcli("train", "diffusion", "--out", str(pipe), "--steps", "40")
    context = work / "context.jsonl"
    out["context labels"] = oodcli("synthesize", "context-labels", "--store", str(clip), "--split", "train",
                                   "--per-class", "2", "--out", str(context))
    out["synthesize synood"] = oodcli("synthesize", "synood", "--store", str(clip), "--from-split", "train",
                                      "--per-class", "2", "--out-dir", str(images), "--pipeline", str(pipe),
                                      "--context-labels", str(context),
                                      "--classifier", "digits_cnn", "--classifier-weights", str(cnn), "--device", DEVICE)
    out["extract synthetic"] = oodcli("extract", "--model", "clip-tiny", "--data", f"folder:{images}", "--split",
                                      "synthetic/synood", "--role", "synthetic", "--store", str(clip), "--device", DEVICE)
    out["train synood"] = oodcli("train", "synood", "--store", str(clip), "--out", str(work / "synood.safetensors"), "--json")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu.json")
    ap.add_argument("--steps", default="extract,throughput,trainers,synood",
                    help="comma-separated subset of: extract, throughput, trainers, synood")
    ap.add_argument("--models", default=",".join(TWINS), help="the tiny twins the extract step compares")
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    args = ap.parse_args()
    import torch

    global DEVICE
    DEVICE = args.device
    steps = set(args.steps.split(","))
    if DEVICE == "cpu":
        steps.discard("throughput")
    elif not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py needs a CUDA device")
    results = {"machine": {"gpu": torch.cuda.get_device_name(0) if DEVICE != "cpu" else "none", "torch": torch.__version__,
                           "python": platform.python_version(), "cpus": os.cpu_count()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "extract" in steps:
            step(results, "extract cpu vs cuda (max relative difference)",
                 lambda: extract_cpu_vs_cuda(work, args.models.split(",")), args.out)
        if "throughput" in steps:
            step(results, "throughput batch 256 fp16 (random weights)", throughput, args.out)
        if "trainers" in steps:
            step(results, "trainers on cuda", lambda: trainers(work), args.out)
        if "synood" in steps:
            step(results, "synood on cuda", lambda: synood(work), args.out)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
