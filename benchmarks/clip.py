"""Throughput of the CLIP zero-shot scores from the store, and NegLabel's mining cost.

Scoring: a synthetic store shaped like ImageNet-1K val under CLIP ViT-B/16 (50,000 images x
196 patch tokens x 512 dims, float16, 128-row chunks as ``extract`` writes them), 1000
class prototypes and 10,000 negative labels already in the text cache, so no model is
built. Each method scores the split in its own process, streaming chunk by chunk; the
process's peak RSS is checked against --ram-cap. --scale shrinks the row count (default
0.1 = 5,000 rows: the full size takes well over 5 minutes per method on 2 cores); rates
and the full-size estimate are printed beside the measured size.

Mining: NegMining over 70,000 candidate words (the size of WordNet's noun + adjective
headwords): the percentile selection against 1000 ID prototypes (D = 512), the
real WordNet parse when one is installed, and text encoding with the tiny CLIP (all
70,000 prompts) and a random-initialised ViT-B/16 text tower (a sample, extrapolated).

Usage: python benchmarks/clip.py [--scale 0.1] [--ram-cap-gib 3] [--out benchmarks/results/clip.json]
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
from pathlib import Path

import numpy as np
import torch

from oodcli import negatives, text
from oodcli.store import digest, open_store

ROOT = Path(__file__).resolve().parent.parent
BACKBONE, BENCH = "clip-vit-b-16", "imagenet-mos"
FULL_ROWS, PATCHES, DIM, NEGATIVES, WORDS = 50_000, 196, 512, 10_000, 70_000
CHUNK = 128
METHODS = ("mcm", "gl-mcm", "r-mcm", "neglabel")


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_store(path: Path, rows: int) -> None:
    """Random unit features written chunk by chunk, with the attrs ``extract`` records, and
    the text cache filled as a first scoring run would leave it."""
    rng = np.random.default_rng(0)
    identity = "clip:openai"
    with open_store(path, "a") as st:
        st.set_attrs("", benchmark=BENCH)
        st.write_array("splits/test/labels", np.zeros(rows, np.int64))
        st.write_array("splits/test/ids", np.arange(rows, dtype=np.int64))
        st.set_attrs("splits/test", role="id", n=rows)
        node = f"splits/test/{BACKBONE}"
        st.create_array(f"{node}/image_embeds", (rows, DIM), np.float16, chunk_rows=CHUNK)
        st.create_array(f"{node}/patch_values", (rows, PATCHES, DIM), np.float16, chunk_rows=CHUNK)
        for start in range(0, rows, CHUNK):
            n = min(CHUNK, rows - start)
            st.write_rows(f"{node}/image_embeds", start, _unit(rng.standard_normal((n, DIM), np.float32)).astype(np.float16))
            tokens = _unit(rng.standard_normal((n, PATCHES, DIM), np.float32)).astype(np.float16)
            st.write_rows(f"{node}/patch_values", start, tokens)
        st.set_attrs(node, complete=True, rows_done=rows, model_id="bench", weights_source="openai",
                     parts={"weights": identity}, layer_shapes={"image_embeds": [DIM], "patch_values": [PATCHES, DIM]})
        name, names = text.label_set(st)
        for templates, template_list in (("photo", ["a photo of a {}."]), ("The nice {}.", ["The nice {}."])):
            key = {"weights": identity, "names": digest(names), "templates": template_list}
            protos = _unit(rng.standard_normal((len(names), DIM), np.float32))
            text.write_cached(st, text.text_node(BACKBONE, name, text.template_key(templates)), key, protos)
        key = {"weights": identity, "names": digest(names), "noun_template": "The nice {}.",
               "adj_template": "This is a {} photo", "num_negatives": NEGATIVES, "percentile": 0.95, "wordnet": "auto"}
        words = [f"word{i}" for i in range(NEGATIVES)]
        negs = _unit(rng.standard_normal((NEGATIVES, DIM), np.float32))
        text.write_cached(st, text.text_node(BACKBONE, name, "neglabel"), key, negs, words=words)


def child(method: str, store: str) -> None:
    """Score one method in this process and print seconds and peak RSS as JSON."""
    from oodcli.scorers import get_scorer

    scorer = get_scorer(method)
    with open_store(store, "r") as st:
        t0 = time.perf_counter()
        status = scorer.prepare(st, BACKBONE, "train", "bench")
        scores = scorer.score(st, BACKBONE, "test")
        seconds = time.perf_counter() - t0
    assert status == "cached" and np.isfinite(scores).all()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": seconds, "peak_rss_bytes": peak, "rows": len(scores)}))


def scoring(rows: int, ram_cap: int, tmp: Path) -> list[dict]:
    store = tmp / "imagenet_clip.zarr"
    t0 = time.perf_counter()
    make_store(store, rows)
    print(f"made a {rows} x {PATCHES} x {DIM} float16 store in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    tokens_bytes = rows * PATCHES * DIM * 2
    out = []
    for method in METHODS:
        proc = subprocess.run([sys.executable, __file__, "--child", method, str(store)],
                              capture_output=True, text=True, check=True)
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        out.append({
            "method": method,
            "rows": rows,
            "patch_token_bytes": tokens_bytes,
            "seconds": r["seconds"],
            "rows_per_s": rows / r["seconds"],
            "full_size_estimate_s": FULL_ROWS * r["seconds"] / rows,
            "peak_rss_bytes": r["peak_rss_bytes"],
            "under_ram_cap": r["peak_rss_bytes"] <= ram_cap,
        })
    return out


def mining() -> dict:
    """NegMining's parts for 70,000 candidate words against 1000 ID prototypes."""
    from oodcli.backbones.base import get_spec

    rng = np.random.default_rng(0)
    protos = _unit(rng.standard_normal((1000, DIM), np.float32))
    cands = _unit(rng.standard_normal((WORDS, DIM), np.float32))
    n_nouns = WORDS * 82 // 100
    t0 = time.perf_counter()
    negatives.select_negatives(cands[:n_nouns], cands[n_nouns:], protos, NEGATIVES, 0.95)
    result = {"words": WORDS, "id_labels": 1000, "negatives": NEGATIVES, "select_s": time.perf_counter() - t0}
    t0 = time.perf_counter()
    vocabulary = negatives.load_vocabulary()
    nouns, adjs = vocabulary.candidates(text.imagenet_clip_names())
    result |= {"wordnet": vocabulary.source, "wordnet_words": len(nouns) + len(adjs), "wordnet_load_s": time.perf_counter() - t0}
    words = (nouns * (WORDS // len(nouns) + 1))[:WORDS]
    prompts = [f"The nice {w}." for w in words]
    threads = torch.get_num_threads()
    for name, sample, nthreads in (("clip-tiny", WORDS, 1), ("vit-b-16-text", 1024, threads)):
        torch.set_num_threads(nthreads)
        # ViT-B/16's architecture with random weights costs what the real one does
        model = get_spec("clip-tiny" if name == "clip-tiny" else "clip-vit-b-16").build_text("random")
        t0 = time.perf_counter()
        with torch.inference_mode():
            for i in range(0, sample, text.ENCODE_BATCH):
                model.encode_text(prompts[i : i + text.ENCODE_BATCH])
        seconds = time.perf_counter() - t0
        result[f"encode_{name}_words_per_s"] = sample / seconds
        result[f"encode_{name}_70k_s"] = WORDS * seconds / sample
        result[f"encode_{name}_measured_words"] = sample
    torch.set_num_threads(threads)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=0.1, help="share of the 50,000 ImageNet val rows to score")
    parser.add_argument("--ram-cap-gib", type=float, default=3.0, help="peak RSS allowed per scoring process")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "clip.json")
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "STORE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    rows = max(CHUNK, int(FULL_ROWS * args.scale))
    cap = int(args.ram_cap_gib * (1 << 30))
    with tempfile.TemporaryDirectory() as tmp:
        scores = scoring(rows, cap, Path(tmp))
    mine = mining()

    gib = 1 << 30
    print(f"scoring from the store: {rows} rows x {PATCHES} x {DIM} float16 patch tokens "
          f"({scores[0]['patch_token_bytes'] / gib:.2f} GiB; scale {args.scale:g} of {FULL_ROWS}), "
          f"1000 classes, {NEGATIVES} negative labels, {CHUNK}-row chunks")
    print(f"{'method':10} {'rows/s':>9} {'seconds':>9} {'50k est. s':>11} {'peak RSS':>10} {'cap ok':>7}")
    for r in scores:
        print(f"{r['method']:10} {r['rows_per_s']:9.1f} {r['seconds']:9.2f} {r['full_size_estimate_s']:11.1f} "
              f"{r['peak_rss_bytes'] / gib:8.2f}Gi {str(r['under_ram_cap']):>7}")
    print(f"NegLabel mining over {WORDS} words vs 1000 ID labels, {NEGATIVES} kept:")
    print(f"  percentile selection      {mine['select_s']:8.2f} s")
    if "wordnet_parse_s" in mine:
        print(f"  WordNet parse ({mine['wordnet_words']} words) {mine['wordnet_parse_s']:8.2f} s   [{mine['wordnet']}]")
    else:
        print(f"  WordNet                   {mine['wordnet']}")
    for name in ("clip-tiny", "vit-b-16-text"):
        print(f"  encode, {name:15}  {mine[f'encode_{name}_70k_s']:8.1f} s for 70k "
              f"({mine[f'encode_{name}_words_per_s']:.0f} words/s, measured on {mine[f'encode_{name}_measured_words']})")
    load = os.getloadavg()[0]
    meta = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "load_average_1min": load,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d"),
        "scale": args.scale,
        "ram_cap_bytes": cap,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "scoring": scores, "mining": mine}, indent=2))
    print(f"saved {args.out} (machine load average {load:.1f})")


if __name__ == "__main__":
    main()
