"""Prompt learning from cached features vs with the image encoder in the loop, and NegPrompt scoring.

Training step (CoOp, 16 context vectors, batch 32, ViT-B/16's text tower with random
weights: the same cost as the real one): the text tower's forward and backward over
every class prompt, the loss and the optimiser step, timed apart. "In the loop" adds what
training without a feature store pays on every step: ViT-B/16's image encoder over the 32
images (forward only, it is frozen; decoding and augmenting the images not counted).
An epoch of 16 shots x C classes is C/2 steps; it is estimated from the measured steps
(a full ImageNet epoch on a CPU takes hours, so only --steps are run).

IIM step (--iim-classes local prompts plus 300 OOD prototype prompts through the text
tower, the mined-patch losses over 32 x 196 cached patch tokens) vs the same with the
image encoder in the loop.

Scoring: ``s-mcm`` over --smcm-rows x 196 x 512 float16 patch tokens (5,000 by default; the
50,000 of ImageNet val take ten times as long and 10 GB of disk), streamed chunk by chunk,
peak RSS against --ram-cap-gib. ``negprompt`` over an ImageNet-val-sized split (50,000 x 512 float16 image_embeds,
1000 classes, p = 2 negative prompts) whose text features are already cached, as a
second scoring run finds them; rows per second and peak RSS.

Usage: python benchmarks/prompts.py [--classes 100,1000] [--steps 2] [--out benchmarks/results/prompts.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from oodcli import text
from oodcli.backbones.base import get_spec
from oodcli.store import digest, open_store
from oodcli.train import prompts as P

ROOT = Path(__file__).resolve().parent.parent
BACKBONE, DIM, ROWS, CHUNK = "clip-vit-b-16", 512, 50_000, 8192
BATCH, SHOTS = 32, 16


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _image_encoder_s(visual) -> float:
    """One forward of the frozen image encoder over a batch: what a step pays without a feature store."""
    pixels = torch.randn(BATCH, 3, 224, 224)
    with torch.no_grad():
        t0 = time.perf_counter()
        visual(pixels)
        return time.perf_counter() - t0


def training(classes: int, steps: int, tower, visual) -> dict:
    names = text.imagenet_clip_names()[:classes]
    learner = P.PromptLearner(tower, torch.randn(1, 16, tower.width) * 0.02)
    optimizer = torch.optim.SGD([learner.ctx], lr=0.002, momentum=0.9)
    image = F.normalize(torch.randn(BATCH, DIM), dim=-1)
    labels = torch.randint(0, classes, (BATCH,))
    learner.name_tokens(names)  # tokenised once per label set, as in training
    text_s, rest_s, encoder_s = [], [], []
    for step in range(steps + 1):  # the first step warms up and is not counted
        t0 = time.perf_counter()
        feats = learner(names)[0]
        loss = P.coop_loss(image, feats, labels, 0.01)
        loss.backward()
        t1 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad()
        t2 = time.perf_counter()
        encoder = _image_encoder_s(visual)
        if step:
            text_s.append(t1 - t0)
            rest_s.append(t2 - t1)
            encoder_s.append(encoder)
    text_step, rest_step, encoder_step = (float(np.mean(x)) for x in (text_s, rest_s, encoder_s))
    cached_step = text_step + rest_step
    steps_per_epoch = classes * SHOTS // BATCH
    return {
        "classes": classes,
        "measured_steps": steps,
        "text_tower_fwd_bwd_s": text_step,
        "loss_and_optimizer_s": rest_step,
        "image_encoder_s": encoder_step,
        "step_cached_s": cached_step,
        "step_in_the_loop_s": cached_step + encoder_step,
        "speedup_cached": (cached_step + encoder_step) / cached_step,
        "steps_per_epoch": steps_per_epoch,
        "epoch_cached_estimate_s": steps_per_epoch * cached_step,
        "epoch_in_the_loop_estimate_s": steps_per_epoch * (cached_step + encoder_step),
    }


def iim_step(classes: int, steps: int, tower, visual) -> dict:
    """One IIM training step (text tower over local + OOD prompts, eq. 8-10) vs the image encoder."""
    from oodcli.train import iim as I

    names = text.imagenet_clip_names()[:classes]
    learner = P.PromptLearner(tower, torch.randn(1, 16, tower.width) * 0.02)
    ood_ctx = torch.nn.Parameter(torch.randn(300, 16, tower.width) * 0.02)
    optimizer = torch.optim.SGD([learner.ctx, ood_ctx], lr=2.5e-4, momentum=0.9)
    patches = F.normalize(torch.randn(BATCH, 196, DIM), dim=-1)
    labels = torch.randint(0, classes, (BATCH,))
    step_s, encoder_s = [], []
    for step in range(steps + 1):
        t0 = time.perf_counter()
        local = learner(names)[0]
        ood = I.ood_features(learner, ood_ctx, grad=True)
        l_pos, l_neg = I.iim_terms(patches, local, ood, labels, 50)
        (l_pos + 5 * l_neg + 0.5 * I.diversity_term(ood, local)).backward()
        optimizer.step()
        optimizer.zero_grad()
        t1 = time.perf_counter()
        encoder = _image_encoder_s(visual)
        if step:
            step_s.append(t1 - t0)
            encoder_s.append(encoder)
    cached, encoder = float(np.mean(step_s)), float(np.mean(encoder_s))
    steps_per_epoch = classes * SHOTS // BATCH
    return {"classes": classes, "ood_prompts": 300, "measured_steps": steps, "step_cached_s": cached,
            "image_encoder_s": encoder, "step_in_the_loop_s": cached + encoder, "speedup_cached": (cached + encoder) / cached,
            "steps_per_epoch": steps_per_epoch, "epoch_cached_estimate_s": steps_per_epoch * cached,
            "epoch_in_the_loop_estimate_s": steps_per_epoch * (cached + encoder)}


def smcm_scoring(tmp: Path, rows: int, ram_cap: int) -> dict:
    """s-mcm over cached patch tokens (the store benchmarks/clip.py builds), text features cached."""
    from clip import BACKBONE as CLIP_BACKBONE, make_store  # benchmarks/clip.py, beside this script

    store = tmp / "imagenet_patches.zarr"
    make_store(store, rows)
    rng = np.random.default_rng(1)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    names = text.imagenet_clip_names()
    prompt_file = tmp / "iim.safetensors"
    meta = {"method": "iim", "backbone": CLIP_BACKBONE, "weights": "clip:openai", "class_names": names}
    P.write_prompt_file(prompt_file, {"ctx": torch.zeros(1, 16, DIM), "ood_ctx": torch.zeros(300, 16, DIM)}, meta)
    sha = P.file_hash(prompt_file)
    with open_store(store, "r+") as st:
        key = {"weights": "clip:openai", "names": digest(names), "prompts": sha}
        embeds = unit(rng.standard_normal((len(names) + 300, DIM), np.float32))
        text.write_cached(st, text.text_node(CLIP_BACKBONE, "imagenet-mos", f"iim-{sha[:12]}"), key, embeds)
    from oodcli.scorers import get_scorer

    scorer = get_scorer("s-mcm", prompts=str(prompt_file))
    with open_store(store, "r") as st:
        t0 = time.perf_counter()
        status = scorer.prepare(st, CLIP_BACKBONE, "train", "bench")
        scores = scorer.score(st, CLIP_BACKBONE, "test")
        seconds = time.perf_counter() - t0
    assert status == "cached" and np.isfinite(scores).all() and len(scores) == rows
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"method": "s-mcm", "rows": rows, "patches": 196, "classes": len(names), "ood_prompts": 300,
            "patch_token_bytes": rows * 196 * DIM * 2, "seconds": seconds, "rows_per_s": rows / seconds,
            "full_50k_estimate_s": 50_000 * seconds / rows, "peak_rss_bytes": peak, "under_ram_cap": peak <= ram_cap}


def scoring(tmp: Path) -> dict:
    """negprompt over 50,000 cached image embeddings, text features from the cache."""
    rng = np.random.default_rng(0)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    identity, names = "clip:openai", text.imagenet_clip_names()
    prompt_file = tmp / "negprompt.safetensors"
    meta = {"method": "negprompt", "backbone": BACKBONE, "weights": identity, "class_names": names, "temperature": 0.01}
    P.write_prompt_file(prompt_file, {"ctx": torch.zeros(1, 16, DIM), "neg_ctx": torch.zeros(2, 16, DIM)}, meta)
    sha = P.file_hash(prompt_file)
    store = tmp / "imagenet_clip.zarr"
    with open_store(store, "a") as st:
        st.set_attrs("", benchmark="imagenet-mos")
        st.write_array("splits/test/labels", np.zeros(ROWS, np.int64))
        st.write_array("splits/test/ids", np.arange(ROWS, dtype=np.int64))
        st.set_attrs("splits/test", role="id", n=ROWS)
        node = f"splits/test/{BACKBONE}"
        st.create_array(f"{node}/image_embeds", (ROWS, DIM), np.float16, chunk_rows=CHUNK)
        for start in range(0, ROWS, CHUNK):
            n = min(CHUNK, ROWS - start)
            st.write_rows(f"{node}/image_embeds", start, unit(rng.standard_normal((n, DIM), np.float32)).astype(np.float16))
        st.set_attrs(node, complete=True, rows_done=ROWS, model_id="bench", weights_source="openai",
                     parts={"weights": identity}, layer_shapes={"image_embeds": [DIM]})
        key = {"weights": identity, "names": digest(names), "prompts": sha}
        embeds = unit(rng.standard_normal((3 * len(names), DIM), np.float32))
        text.write_cached(st, text.text_node(BACKBONE, "imagenet-mos", f"prompts-{sha[:12]}"), key, embeds)
    from oodcli.scorers import get_scorer

    scorer = get_scorer("negprompt", prompts=str(prompt_file))
    with open_store(store, "r") as st:
        t0 = time.perf_counter()
        status = scorer.prepare(st, BACKBONE, "train", "bench")
        scores = scorer.score(st, BACKBONE, "test")
        seconds = time.perf_counter() - t0
    assert status == "cached" and np.isfinite(scores).all() and len(scores) == ROWS
    return {"method": "negprompt", "rows": ROWS, "classes": len(names), "negative_prompts": 2,
            "seconds": seconds, "rows_per_s": ROWS / seconds,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", default="100,1000", help="label-set sizes to time a training step at")
    parser.add_argument("--steps", type=int, default=2, help="measured steps per size (after one warm-up step)")
    parser.add_argument("--iim-classes", type=int, default=100, help="local prompts in the timed IIM step")
    parser.add_argument("--smcm-rows", type=int, default=5000, help="rows of patch tokens s-mcm scores")
    parser.add_argument("--ram-cap-gib", type=float, default=3.0, help="peak RSS allowed while scoring")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "prompts.json")
    args = parser.parse_args()
    # scoring first: its peak RSS must not include the training models
    with tempfile.TemporaryDirectory() as tmp:
        score = scoring(Path(tmp))
        smcm = smcm_scoring(Path(tmp), args.smcm_rows, int(args.ram_cap_gib * 2**30))
    print(f"negprompt: {score['rows']} rows x {score['classes']} classes x (1 + 2) prompts in {score['seconds']:.2f} s "
          f"({score['rows_per_s']:.0f} rows/s), peak RSS {score['peak_rss_bytes'] / 2**20:.0f} MiB")
    print(f"s-mcm: {smcm['rows']} rows x 196 x 512 float16 patch tokens in {smcm['seconds']:.1f} s ({smcm['rows_per_s']:.0f} rows/s, "
          f"50k ~ {smcm['full_50k_estimate_s']:.0f} s), peak RSS {smcm['peak_rss_bytes'] / 2**20:.0f} MiB "
          f"({'under' if smcm['under_ram_cap'] else 'OVER'} the {args.ram_cap_gib} GiB cap)")
    # random weights cost what the real ones do; a random tower wraps the whole CLIP, so the
    # image encoder of the in-the-loop comparison is at hand (training itself never builds it)
    tower = get_spec(BACKBONE).build_text("random")
    visual = tower.text.visual.eval()
    rows = []
    for c in (int(x) for x in args.classes.split(",")):
        row = training(c, args.steps, tower, visual)
        rows.append(row)
        print(f"{c:5d} classes: step {row['step_cached_s']:.2f} s cached (text tower {row['text_tower_fwd_bwd_s']:.2f} s, "
              f"rest {row['loss_and_optimizer_s'] * 1000:.1f} ms) vs {row['step_in_the_loop_s']:.2f} s with the image "
              f"encoder ({row['speedup_cached']:.2f}x); epoch of {row['steps_per_epoch']} steps ~ "
              f"{row['epoch_cached_estimate_s'] / 60:.1f} vs {row['epoch_in_the_loop_estimate_s'] / 60:.1f} min")
    iim = iim_step(args.iim_classes, args.steps, tower, visual)
    print(f"iim, {iim['classes']} classes + 300 OOD prompts: step {iim['step_cached_s']:.2f} s cached vs "
          f"{iim['step_in_the_loop_s']:.2f} s with the image encoder ({iim['speedup_cached']:.2f}x)")
    result = {
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": sys.version.split()[0],
                    "platform": platform.platform(), "cuda": torch.cuda.is_available()},
        "training_step": rows,
        "iim_step": iim,
        "scoring": score,
        "smcm_scoring": smcm,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
