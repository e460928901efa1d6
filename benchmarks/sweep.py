"""A hyperparameter sweep on stored features vs the same search with a network pass per setting.

On the embedded digits benchmark with the digits CNN: G = 10 settings of one method
(react's percentile, and knn's k) chosen on the validation splits (``val`` vs
``ood/val/textures``), two ways, measured in the same run:

- store: ``oodcli.sweeping.run_sweep`` over the features already in the store (every setting
  fitted on the stored train features and scored on the stored validation features; the
  grid and the choice written to fitted/sweeps/), as ``oodcli sweep`` does;
- network: what a search without a store does (OpenOOD's APS re-runs the network for every
  setting): per setting, the validation images through the CNN again (``extract`` of both
  validation splits, dropped and made again) and that one setting scored on them.

Both pick their settings by the same code, so the choice must agree; the ratio is
network / store for the whole sweep (the store's fixed costs included: the checks of the
splits and backbone, the transaction that records the grid) and for the settings alone
(the sum of the per-setting times, fit + validation scores). Also printed: the one
validation extract that the store sweep relies on, and the ratio with it counted in.

Usage: python benchmarks/sweep.py [--out benchmarks/results/sweep.json]
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

from oodcli.api import extract_splits
from oodcli.store import open_store, remove_nodes
from oodcli.sweeping import run_sweep

ROOT = Path(__file__).resolve().parent.parent
CKPT = ROOT / "stores" / "digits_cnn.safetensors"
VAL = ["val", "ood/val/textures"]
GRIDS = {
    "react": {"percentile": [50, 60, 70, 80, 85, 90, 95, 97, 99, 99.9]},
    "knn": {"k": [1, 2, 5, 10, 20, 50, 100, 200, 300, 500]},
}


def extract(path: Path, splits: list[str], again: bool = False) -> float:
    """The splits' images through the CNN into the store; ``again``: drop them first, so that the
    network runs (an extract of unchanged data is otherwise a cache hit)."""
    t0 = time.perf_counter()
    if again:
        with open_store(path, "r+") as st:
            remove_nodes(st, splits)
    extract_splits("digits_cnn", path, benchmark="digits", splits=splits, weights=str(CKPT), device="cpu")
    return time.perf_counter() - t0


def store_sweep(path: Path, method: str) -> tuple[float, dict]:
    t0 = time.perf_counter()
    with open_store(path, "r+") as st:
        record = run_sweep(st, method, GRIDS[method])
    return time.perf_counter() - t0, record


def network_sweep(path: Path, method: str) -> tuple[float, list[float], list[float]]:
    """Per setting: the validation images through the network again, then that setting scored."""
    (name, values), = GRIDS[method].items()
    aurocs, per_setting = [], []
    t0 = time.perf_counter()
    for value in values:
        t1 = time.perf_counter()
        extract(path, VAL, again=True)
        with open_store(path, "r+") as st:
            row = run_sweep(st, method, {name: [value]}, write=False)["settings"][0]
        aurocs.append(row["auroc"])
        per_setting.append(time.perf_counter() - t1)
    return time.perf_counter() - t0, per_setting, aurocs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "sweep.json")
    args = parser.parse_args()
    t_start, load_before = time.perf_counter(), os.getloadavg()[0]
    if not CKPT.exists():
        subprocess.run([sys.executable, "-m", "oodcli", "-q", "train", "classifier", "--out", str(CKPT)], check=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "digits.zarr"
        extract(path, ["train", *VAL])
        val_extract_s = extract(path, VAL, again=True)  # the one pass over the validation images a store needs
        for method in GRIDS:
            store_sweep(path, method)  # warm-up: first-touch costs (imports, faiss) out of the timing
            store_runs = [store_sweep(path, method) for _ in range(3)]
            store_s = float(np.median([s for s, _ in store_runs]))
            record = store_runs[0][1]
            network_s, per_setting, aurocs = network_sweep(path, method)
            store_aurocs = [r["auroc"] for r in record["settings"]]
            np.testing.assert_allclose(aurocs, store_aurocs, atol=1e-3)  # float16 features: same within rounding
            results[method] = {
                "grid": GRIDS[method],
                "settings": len(record["settings"]),
                "chosen": record["best_hparams"],
                "val_auroc": store_aurocs,
                "store_sweep_s": store_s,
                "store_sweep_runs_s": [s for s, _ in store_runs],
                "store_per_setting_s": [r["seconds"] for r in record["settings"]],
                "store_settings_s": float(np.median([sum(r["seconds"] for r in rec["settings"])
                                                     for _, rec in store_runs])),
                "network_sweep_s": network_s,
                "network_per_setting_s": per_setting,
                "ratio_network_over_store": network_s / store_s,
                "ratio_network_over_store_settings": network_s / float(np.median(
                    [sum(r["seconds"] for r in rec["settings"]) for _, rec in store_runs])),
                "ratio_network_over_extract_once_plus_store": network_s / (val_extract_s + store_s),
            }
    meta = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "numpy": np.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "val_rows": {"val": 149, "ood/val/textures": 200},
        "val_extract_s": val_extract_s,
        "total_s": time.perf_counter() - t_start,
        "load_average_before_after": [load_before, os.getloadavg()[0]],  # other work on the machine skews timings
    }
    for method, r in results.items():
        print(f"{method}: {r['settings']} settings of {list(r['grid'])[0]}, chosen {r['chosen']}; "
              f"store sweep {r['store_sweep_s']:.3f} s (median of 3), network sweep {r['network_sweep_s']:.1f} s "
              f"({np.mean(r['network_per_setting_s']):.2f} s a setting); ratio {r['ratio_network_over_store']:.0f}x, "
              f"{r['ratio_network_over_store_settings']:.0f}x over the settings alone ({r['store_settings_s']:.3f} s) "
              f"({r['ratio_network_over_extract_once_plus_store']:.0f}x counting the one validation extract of "
              f"{val_extract_s:.2f} s)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"total {meta['total_s']:.0f} s (1-min load average {load_before:.1f} before, "
          f"{meta['load_average_before_after'][1]:.1f} after, on {os.cpu_count()} cores); saved {args.out}")


if __name__ == "__main__":
    main()
