"""SynOOD training on cached features vs with the image encoder in the loop, and its scoring overhead over NegLabel.

Training epoch: the projection step of ``oodcli train synood`` (eq. 12: Adam, batch 128, a
512 x 512 projection, softmax over 1000 ID prototypes + M' = --m / 10 negatives) over
D_pro = 2 m cached ViT-B/16-sized features (512-d), run for a whole epoch through the
trainer's own loop (``fit_epochs``), then the label step (eq. 14, SGD) over the m synthetic
features. "In the loop" is what a trainer without a feature store pays on top of every
projection step: ViT-B/16's image encoder (random weights, open_clip; the same cost as the
real one) forward over the 128 images of the batch (frozen, so no backward; decoding and
augmenting the images not counted). It is timed for --encoder-steps batches in the same
run and the epoch estimated from the measured steps (an epoch of 100,000 images through
ViT-B/16 on a CPU takes hours).

Scoring: ``neglabel`` and ``synood`` over an ImageNet-val-sized split (50,000 x 512 float16
image_embeds, 1000 classes, 10,000 negative labels in 100 groups), text features cached as
a second run finds them; the overhead of synood per image (paper: under 2 ms).

Usage: python benchmarks/synood.py [--m 50000] [--encoder-steps 1] [--out benchmarks/results/synood.json]
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
import torch
import torch.nn.functional as F

from oodcli import text
from oodcli.store import digest, open_store
from oodcli.train import prompts as P
from oodcli.train import synood as S

ROOT = Path(__file__).resolve().parent.parent
BACKBONE, IDENTITY, BENCH, DIM, ROWS, CHUNK = "clip-vit-b-16", "clip:openai", "imagenet-mos", 512, 50_000, 8192
BATCH, CLASSES, NEGATIVES, TAU = 128, 1000, 10_000, 0.01


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def training(m: int, encoder_steps: int) -> dict:
    g = torch.Generator().manual_seed(0)
    chosen_count = max(2, m // 10)
    protos = F.normalize(torch.randn(CLASSES, DIM, generator=g), dim=-1)
    chosen = F.normalize(torch.randn(chosen_count, DIM, generator=g), dim=-1)
    x_pro = F.normalize(torch.randn(2 * m, DIM, generator=g), dim=-1)
    y_pro = torch.cat([CLASSES + torch.randint(0, chosen_count, (m,), generator=g), torch.randint(0, CLASSES, (m,), generator=g)])
    proj = S.Projection(DIM)
    adam = torch.optim.Adam(proj.parameters(), lr=1e-3, weight_decay=1e-5)
    step_s = []

    def proj_step(idx):
        t0 = time.perf_counter()
        loss = S.projection_loss(proj(x_pro[idx]), protos, chosen, y_pro[idx], TAU)
        step_s.append(time.perf_counter() - t0)
        return loss, {}

    t0 = time.perf_counter()
    P.fit_epochs(proj_step, list(proj.parameters()), 1, 1e-3, len(x_pro), BATCH, g, lambda: 0.0, DIM, optimizer=adam)
    proj_epoch = time.perf_counter() - t0
    proj_steps = len(step_s)

    tuned = torch.nn.Parameter(chosen.clone())
    syn, pair = x_pro[:m], y_pro[:m] - CLASSES
    t0 = time.perf_counter()
    P.fit_epochs(lambda idx: (S.label_loss(syn[idx], tuned, pair[idx], TAU), {}), [tuned], 1, 2e-3, m, BATCH, g,
                 lambda: 0.0, DIM, optimizer=torch.optim.SGD([tuned], lr=2e-3))
    label_epoch = time.perf_counter() - t0

    # the image encoder a trainer without cached features runs on every batch
    import open_clip

    visual = open_clip.create_model("ViT-B-16", pretrained=None).visual.eval()
    encoder_s = []
    with torch.no_grad():
        visual(torch.randn(8, 3, 224, 224))  # warm-up, not counted
        for _ in range(encoder_steps):
            pixels = torch.randn(BATCH, 3, 224, 224)
            t0 = time.perf_counter()
            visual(pixels)
            encoder_s.append(time.perf_counter() - t0)
    encoder = float(np.mean(encoder_s))
    in_loop_epoch = proj_epoch + proj_steps * encoder
    return {
        "m": m, "d_pro_rows": 2 * m, "labels_in_softmax": CLASSES + chosen_count, "batch": BATCH,
        "projection_epoch_cached_s": proj_epoch, "projection_steps": proj_steps,
        "projection_step_cached_s": proj_epoch / proj_steps,
        "label_epoch_cached_s": label_epoch,
        "image_encoder_batch_s": encoder, "encoder_steps_measured": encoder_steps,
        "projection_epoch_in_the_loop_estimate_s": in_loop_epoch,
        "speedup_cached": in_loop_epoch / proj_epoch,
    }


def _store(tmp: Path) -> Path:
    """An ImageNet-val-sized CLIP store whose NegLabel text features are cached (no WordNet, no model)."""
    rng = np.random.default_rng(0)
    names = text.imagenet_clip_names()
    store = tmp / "imagenet_clip.zarr"
    with open_store(store, "a") as st:
        st.set_attrs("", benchmark=BENCH)
        st.write_array("splits/test/labels", np.zeros(ROWS, np.int64))
        st.write_array("splits/test/ids", np.arange(ROWS, dtype=np.int64))
        st.set_attrs("splits/test", role="id", n=ROWS)
        node = f"splits/test/{BACKBONE}"
        st.create_array(f"{node}/image_embeds", (ROWS, DIM), np.float16, chunk_rows=CHUNK)
        for start in range(0, ROWS, CHUNK):
            n = min(CHUNK, ROWS - start)
            st.write_rows(f"{node}/image_embeds", start, _unit(rng.standard_normal((n, DIM), np.float32)).astype(np.float16))
        st.set_attrs(node, complete=True, rows_done=ROWS, model_id="bench", weights_source="openai",
                     parts={"weights": IDENTITY}, layer_shapes={"image_embeds": [DIM]})
        template = "The nice {}"
        key = {"weights": IDENTITY, "names": digest(names), "templates": [template]}
        text.write_cached(st, text.text_node(BACKBONE, BENCH, text.template_key(template)), key,
                          _unit(rng.standard_normal((len(names), DIM), np.float32)), class_names=names)
        key = {"weights": IDENTITY, "names": digest(names), "noun_template": template, "adj_template": "This is a {} photo",
               "num_negatives": NEGATIVES, "percentile": 0.95, "wordnet": "auto"}
        words = [f"word{i}" for i in range(NEGATIVES)]
        text.write_cached(st, text.text_node(BACKBONE, BENCH, "neglabel"), key,
                          _unit(rng.standard_normal((NEGATIVES, DIM), np.float32)), words=words, nouns=NEGATIVES)
    return store


def _synood_file(store: Path, tmp: Path) -> Path:
    """A trained-looking file: a projection near the identity, half the negatives moved."""
    g = torch.Generator().manual_seed(1)
    names = text.imagenet_clip_names()
    with open_store(store) as st:
        negs = torch.from_numpy(st.read(f"fitted/text/{BACKBONE}/{BENCH}/neglabel/embeds"))
    learned = torch.zeros(NEGATIVES)
    learned[: NEGATIVES // 2] = 1
    tuned = negs.clone()
    tuned[: NEGATIVES // 2] = F.normalize(negs[: NEGATIVES // 2] + 0.05 * torch.randn(NEGATIVES // 2, DIM, generator=g), dim=-1)
    meta = {"method": "synood", "backbone": BACKBONE, "weights": IDENTITY, "class_names": names,
            "neglabel": {"templates": "The nice {}"}, "negative_words": [f"word{i}" for i in range(NEGATIVES)]}
    out = tmp / "synood.safetensors"
    P.write_prompt_file(out, {"projection.weight": torch.eye(DIM) + 0.01 * torch.randn(DIM, DIM, generator=g),
                              "projection.bias": 0.01 * torch.randn(DIM, generator=g), "negatives": tuned,
                              "negatives_clip": negs, "learned": learned}, meta)
    return out


def scoring(tmp: Path, repeats: int) -> dict:
    from oodcli.scorers import get_scorer

    store = _store(tmp)
    scorers = {"neglabel": get_scorer("neglabel"), "synood": get_scorer("synood", prompts=str(_synood_file(store, tmp)))}
    seconds = {name: [] for name in scorers}
    with open_store(store, "r") as st:
        for _ in range(repeats):  # interleaved, the fastest of each kept
            for name, scorer in scorers.items():
                t0 = time.perf_counter()
                status = scorer.prepare(st, BACKBONE, "train", "bench")
                scores = scorer.score(st, BACKBONE, "test")
                seconds[name].append(time.perf_counter() - t0)
                assert status == "cached" and np.isfinite(scores).all() and len(scores) == ROWS
        # the extra work itself, timed apart: the projection of every block (the end-to-end difference is
        # within the noise of the 50,000 x 10,000 similarity both methods compute)
        from oodcli.scorers import iter_feature_blocks

        syn, neg = scorers["synood"], scorers["neglabel"]
        syn.prepare(st, BACKBONE, "train", "bench")
        extra = 0.0
        for block in iter_feature_blocks(st, BACKBONE, "test", ("image_embeds",)):
            t0 = time.perf_counter()
            neg.image_features(block)
            t1 = time.perf_counter()
            syn.image_features(block)
            extra += (time.perf_counter() - t1) - (t1 - t0)
    best = {k: min(v) for k, v in seconds.items()}
    return {
        "projection_s": extra, "projection_ms_per_image": 1000 * extra / ROWS,"rows": ROWS, "classes": CLASSES, "negatives": NEGATIVES, "ngroup": 100, "repeats": repeats,
            "neglabel_s": best["neglabel"], "synood_s": best["synood"],
            "neglabel_ms_per_image": 1000 * best["neglabel"] / ROWS, "synood_ms_per_image": 1000 * best["synood"] / ROWS,
            "overhead_ms_per_image": 1000 * (best["synood"] - best["neglabel"]) / ROWS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, default=50_000, help="synthetic images (D_pro holds 2m rows)")
    parser.add_argument("--encoder-steps", type=int, default=1, help="ViT-B/16 batches of 128 timed (after a warm-up)")
    parser.add_argument("--repeats", type=int, default=2, help="scoring runs of each method (fastest kept)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "synood.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        score = scoring(Path(tmp), args.repeats)
    print(f"scoring {score['rows']} x {DIM} embeddings, {CLASSES} classes, {NEGATIVES} negatives: neglabel "
          f"{score['neglabel_s']:.2f} s, synood {score['synood_s']:.2f} s; synood's overhead "
          f"{score['overhead_ms_per_image']:.4f} ms per image end to end, the projection alone "
          f"{score['projection_ms_per_image']:.4f} ms per image (paper: < 2 ms)")
    train = training(args.m, args.encoder_steps)
    print(f"projection epoch over {train['d_pro_rows']} cached rows ({train['projection_steps']} steps of {BATCH}): "
          f"{train['projection_epoch_cached_s']:.1f} s; label epoch over {args.m} rows: {train['label_epoch_cached_s']:.1f} s")
    print(f"ViT-B/16 over a batch of {BATCH}: {train['image_encoder_batch_s']:.1f} s -> the epoch with the encoder in the loop "
          f"~ {train['projection_epoch_in_the_loop_estimate_s'] / 60:.0f} min, {train['speedup_cached']:.0f}x the cached one")
    result = {
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": sys.version.split()[0],
                    "platform": platform.platform(), "cuda": torch.cuda.is_available()},
        "training": train,
        "scoring": score,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
