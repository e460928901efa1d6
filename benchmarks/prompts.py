"""Prompt learning from cached features vs with the image encoder in the loop, and NegPrompt scoring.

Training step (CoOp, 16 context vectors, batch 32, ViT-B/16's text tower with random
weights: the same cost as the real one): the text tower's forward and backward over
every class prompt (real ImageNet class names, so real lengths), the loss and the
optimiser step, through the plain path (every prompt a whole sequence: the reference) and
the fast one (``oodcli.backbones.clip_text``: [SOS, context] once, the names' suffixes
attending to its keys and values, in length buckets), stepped in turn in the same run
from the same start; the first step's features and context gradients of the two are
compared. Wall and process CPU seconds are both recorded: on a shared machine the CPU
time is the steadier measure of the work. "In the loop" adds what training without a
feature store pays on every step: ViT-B/16's image encoder over the 32 images (forward
only, it is frozen; decoding and augmenting the images not counted). An epoch of 16 shots
x C classes is C/2 steps; it is estimated from the measured steps (a full ImageNet epoch
on a CPU takes hours, so only --steps are run).

IIM step (C class-specific local prompts, IIM's default, plus 300 OOD prototype prompts
through the text tower, the mined-patch losses over 32 x 196 cached patch tokens): today's
two plain passes vs one fast set of sequences that shares only the start token (every
context is its own, so nothing else is shared), vs the same with the image encoder in the loop.

Scoring: ``s-mcm`` over --smcm-rows x 196 x 512 float16 patch tokens (5,000 by default; the
50,000 of ImageNet val take ten times as long and 10 GB of disk), streamed chunk by chunk,
peak RSS against --ram-cap-gib. ``negprompt`` over an ImageNet-val-sized split (50,000 x 512 float16 image_embeds,
1000 classes, p = 2 negative prompts) whose text features are already cached, as a
second scoring run finds them; rows per second and peak RSS.

Usage: python benchmarks/prompts.py [--classes 100,1000] [--steps 2] [--threads 1] [--only training]
       [--out benchmarks/results/prompts.json]
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


def _tokens(learner, names: list[str], shared: int) -> dict:
    """Token positions through the tower: the plain path (every sequence cut at the longest end)
    vs the fast one (the ``shared`` prefix once, each length bucket padded to its longest)."""
    from oodcli.backbones import clip_text

    _, ends = learner.name_tokens(names)
    lengths = (ends - shared + 1).cpu().numpy()
    buckets = clip_text.length_buckets(lengths)
    return {"plain": int(len(names) * (int(ends.max()) + 1)),
            "fast": int(shared + sum(len(b) * int(lengths[b].max()) for b in buckets)), "buckets": len(buckets)}


def _smooth_grad(feats: torch.Tensor, params: list) -> torch.Tensor:
    """The gradient of a fixed random linear functional of the features: the encoder's own gradient.
    (A loss with top-k mining, as IIM's, is not smooth: a 1e-7 change of a feature can swap two
    nearly tied patches and with them the gradient, while the loss stays the same.)"""
    weights = torch.randn(feats.shape, generator=torch.Generator().manual_seed(1))
    return torch.cat([g.flatten() for g in torch.autograd.grad((feats * weights).sum(), params, retain_graph=True)])


def _exactness(first: dict) -> dict:
    """Largest differences of the fast path's first-step features and their gradient (``_smooth_grad``)
    from the plain path's."""
    (f_plain, g_plain), (f_fast, g_fast) = first["plain"], first["fast"]
    return {"features_max_abs_diff": float((f_fast - f_plain).abs().max()),
            "ctx_grad_max_rel_diff": float((g_fast - g_plain).abs().max() / g_plain.abs().max())}


def _epoch(classes: int, cached: float, encoder: float) -> dict:
    steps_per_epoch = classes * SHOTS // BATCH
    return {"step_cached_s": cached, "step_in_the_loop_s": cached + encoder, "speedup_cached": (cached + encoder) / cached,
            "epoch_cached_estimate_s": steps_per_epoch * cached, "epoch_in_the_loop_estimate_s": steps_per_epoch * (cached + encoder)}


def _interleaved(steps: int, runs: dict) -> tuple[dict, dict]:
    """Steps of every path in turn (``runs``: path -> step function returning (features, context
    gradient)), so that a shared machine's load falls on each alike; the first round warms up.
    Per path: mean wall and process CPU seconds of the measured steps, and the warm-up step's
    (features, ``_smooth_grad``)."""
    wall = {path: [] for path in runs}
    cpu = {path: [] for path in runs}
    first = {}
    for step in range(steps + 1):
        for path, run in runs.items():
            w0, c0 = time.perf_counter(), time.process_time()
            out = run(not step)
            w1, c1 = time.perf_counter(), time.process_time()
            if step:
                wall[path].append(w1 - w0)
                cpu[path].append(c1 - c0)
            else:
                first[path] = out
    return {path: (float(np.mean(wall[path])), float(np.mean(cpu[path]))) for path in runs}, first


def _paths(row: dict, times: dict, first: dict, classes: int, encoder: float) -> dict:
    for path, (wall, cpu) in times.items():
        row[path] = {**_epoch(classes, wall, encoder), "step_cpu_s": cpu}
    row["step_speedup"] = row["plain"]["step_cached_s"] / row["fast"]["step_cached_s"]
    row["step_speedup_cpu_time"] = row["plain"]["step_cpu_s"] / row["fast"]["step_cpu_s"]
    row["exactness"] = _exactness(first)
    return row


def training(classes: int, steps: int, tower, visual) -> dict:
    """A CoOp step through the plain path (today's reference) and the fast one, same run, same start:
    the text tower's forward and backward, the loss and the optimiser step."""
    names = text.imagenet_clip_names()[:classes]
    ctx = torch.randn(1, 16, tower.width, generator=torch.Generator().manual_seed(0)) * 0.02
    image = F.normalize(torch.randn(BATCH, DIM), dim=-1)
    labels = torch.randint(0, classes, (BATCH,))
    encoder = float(np.mean([_image_encoder_s(visual) for _ in range(steps)]))

    def make(fast: bool):
        learner = P.PromptLearner(tower, ctx, fast=fast)
        optimizer = torch.optim.SGD([learner.ctx], lr=0.002, momentum=0.9)
        learner.name_tokens(names)  # tokenised once per label set, as in training

        def run(check: bool):
            feats = learner(names)[0]
            out = (feats.detach(), _smooth_grad(feats, [learner.ctx])) if check else None
            P.coop_loss(image, feats, labels, 0.01).backward()
            optimizer.step()
            optimizer.zero_grad()
            return out
        return learner, run

    learner, fast_run = make(True)
    times, first = _interleaved(steps, {"plain": make(False)[1], "fast": fast_run})
    row = {"classes": classes, "measured_steps": steps, "image_encoder_s": encoder,
           "steps_per_epoch": classes * SHOTS // BATCH, "tokens": _tokens(learner, names, 1 + learner.n_ctx)}
    return _paths(row, times, first, classes, encoder)


def iim_step(classes: int, steps: int, tower, visual) -> dict:
    """An IIM step (class-specific local prompts, the default, plus 300 OOD prototype prompts through
    the text tower; the mined-patch losses over 32 x 196 cached patch tokens): today's two plain
    passes vs one fast set of sequences, same run, same start."""
    from oodcli.train import iim as I

    names = text.imagenet_clip_names()[:classes]
    g = torch.Generator().manual_seed(0)
    ctx = torch.randn(classes, 16, tower.width, generator=g) * 0.02
    ood_start = torch.randn(300, 16, tower.width, generator=g) * 0.02
    patches = F.normalize(torch.randn(BATCH, 196, DIM), dim=-1)
    labels = torch.randint(0, classes, (BATCH,))
    encoder = float(np.mean([_image_encoder_s(visual) for _ in range(steps)]))

    def make(fast: bool):
        learner = P.PromptLearner(tower, ctx, fast=fast)
        ood_ctx = torch.nn.Parameter(ood_start.clone())
        optimizer = torch.optim.SGD([learner.ctx, ood_ctx], lr=2.5e-4, momentum=0.9)

        def run(check: bool):
            if fast:
                local, ood = I.prototype_features(learner, names, learner.ctx, ood_ctx)
            else:  # today's path: the local prompts, then the OOD prompts as one prompt set each
                local, ood = learner.class_specific(names, learner.ctx), learner([I.OOD_NAME], ood_ctx)[:, 0]
            feats = torch.cat([local, ood])
            out = (feats.detach(), _smooth_grad(feats, [learner.ctx, ood_ctx])) if check else None
            l_pos, l_neg = I.iim_terms(patches, local, ood, labels, 50)
            (l_pos + 5 * l_neg + 0.5 * I.diversity_term(ood, local)).backward()
            optimizer.step()
            optimizer.zero_grad()
            return out
        return learner, run

    learner, fast_run = make(True)
    times, first = _interleaved(steps, {"plain": make(False)[1], "fast": fast_run})
    local_tokens, ood_tokens = _tokens(learner, names, 1), _tokens(learner, [I.OOD_NAME] * 300, 1)
    row = {"classes": classes, "ood_prompts": 300, "measured_steps": steps, "image_encoder_s": encoder,
           "steps_per_epoch": classes * SHOTS // BATCH,
           "tokens": {"local": local_tokens, "ood": ood_tokens, "plain": local_tokens["plain"] + ood_tokens["plain"],
                      "fast": local_tokens["fast"] + ood_tokens["fast"] - 1}}  # one start token for both
    return _paths(row, times, first, classes, encoder)


def smcm_scoring(tmp: Path, rows: int, ram_cap: int) -> dict:
    """s-mcm over cached patch tokens (the store benchmarks/clip.py builds), text features cached."""
    from clip import BACKBONE as CLIP_BACKBONE, make_store  # benchmarks/clip.py, beside this script

    store = tmp / "imagenet_patches.zarr"
    make_store(store, rows)
    rng = np.random.default_rng(1)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    names = text.imagenet_clip_names()
    prompt_file = tmp / "iim.safetensors"
    meta = {"method": "iim", "backbone": CLIP_BACKBONE, "weights": "clip:openai", "class_names": names,
            "local_layer": "patch_values"}  # what the store holds (a file without the record reads as patch_tokens)
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


def _print_step(label: str, row: dict) -> None:
    plain, fast, tok = row["plain"], row["fast"], row["tokens"]
    print(f"{label}, {row['classes']} classes: step {plain['step_cached_s']:.2f} s plain -> {fast['step_cached_s']:.2f} s fast "
          f"({row['step_speedup']:.2f}x wall, {row['step_speedup_cpu_time']:.2f}x CPU time; {tok['plain']} -> {tok['fast']} token positions); with the image encoder "
          f"in the loop {fast['step_in_the_loop_s']:.2f} s ({fast['speedup_cached']:.2f}x for the store, was "
          f"{plain['speedup_cached']:.2f}x); epoch of {row['steps_per_epoch']} steps ~ {fast['epoch_cached_estimate_s'] / 60:.1f} "
          f"vs {fast['epoch_in_the_loop_estimate_s'] / 60:.1f} min; max feature diff {row['exactness']['features_max_abs_diff']:.1e}, "
          f"grad rel diff {row['exactness']['ctx_grad_max_rel_diff']:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", default="100,1000", help="label-set sizes to time a training step at")
    parser.add_argument("--steps", type=int, default=2, help="measured steps per size (after one warm-up step)")
    parser.add_argument("--iim-classes", default=None, help="label-set sizes of the timed IIM step (default: --classes)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--only", choices=("all", "training", "scoring"), default="all", help="run one part")
    parser.add_argument("--smcm-rows", type=int, default=5000, help="rows of patch tokens s-mcm scores")
    parser.add_argument("--ram-cap-gib", type=float, default=3.0, help="peak RSS allowed while scoring")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "prompts.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": sys.version.split()[0],
                          "platform": platform.platform(), "cuda": torch.cuda.is_available(),
                          "load_average": os.getloadavg()}}
    if args.only in ("all", "scoring"):  # scoring first: its peak RSS must not include the training models
        with tempfile.TemporaryDirectory() as tmp:
            score = scoring(Path(tmp))
            smcm = smcm_scoring(Path(tmp), args.smcm_rows, int(args.ram_cap_gib * 2**30))
        print(f"negprompt: {score['rows']} rows x {score['classes']} classes x (1 + 2) prompts in {score['seconds']:.2f} s "
              f"({score['rows_per_s']:.0f} rows/s), peak RSS {score['peak_rss_bytes'] / 2**20:.0f} MiB")
        print(f"s-mcm: {smcm['rows']} rows x 196 x 512 float16 patch tokens in {smcm['seconds']:.1f} s ({smcm['rows_per_s']:.0f} rows/s, "
              f"50k ~ {smcm['full_50k_estimate_s']:.0f} s), peak RSS {smcm['peak_rss_bytes'] / 2**20:.0f} MiB "
              f"({'under' if smcm['under_ram_cap'] else 'OVER'} the {args.ram_cap_gib} GiB cap)")
        result.update(scoring=score, smcm_scoring=smcm)
    if args.only in ("all", "training"):
        # random weights cost what the real ones do; a random tower wraps the whole CLIP, so the
        # image encoder of the in-the-loop comparison is at hand (training itself never builds it)
        tower = get_spec(BACKBONE).build_text("random")
        visual = tower.text.visual.eval()
        sizes = [int(x) for x in args.classes.split(",")]
        rows, iim_rows = [], []
        for c in sizes:
            row = training(c, args.steps, tower, visual)
            rows.append(row)
            _print_step("coop", row)
        for c in sizes if args.iim_classes is None else [int(x) for x in args.iim_classes.split(",")]:
            row = iim_step(c, args.steps, tower, visual)
            iim_rows.append(row)
            _print_step("iim (+300 OOD prompts)", row)
        result.update(training_step=rows, iim_step=iim_rows,
                      training_peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
