"""Start-up cost of the commands that run no network, as whole processes.

For each command, on a copy of the demo store (``stores/digits.zarr``, made by
``make demo``; made here with a briefly trained digits CNN if it is missing):
  cli       - wall time of ``python -m oodcli ...`` as a fresh process (best of --repeats)
  work      - the library call behind it, in-process after a warm-up (best of --repeats)
  overhead  - cli - work: interpreter start, imports, argument parsing (goal < 1 s on 2 cores)
  torch     - whether the command's process imported torch (it should not: none runs a network)
The floor is ``python -c "import oodcli"``, the least any command can cost.

Usage: python benchmarks/cli.py [--repeats 5] [--out benchmarks/results/cli.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STORE = ROOT / "stores" / "digits.zarr"
CKPT = ROOT / "stores" / "digits_cnn.safetensors"
HEAVY = ("torch", "scipy.stats", "sklearn", "transformers", "open_clip")

# runs one command in-process like `python -m oodcli` does, then says what it imported
PROBE = (
    "import sys, json\n"
    "from oodcli.cli import main\n"
    "rc = main(sys.argv[1:])\n"
    "print(json.dumps({'rc': rc, 'heavy': [m for m in %r if m in sys.modules]}), file=sys.stderr)\n" % (HEAVY,)
)


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def run_process(argv: list[str]) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")


def heavy_imports(args: list[str]) -> list[str]:
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"probe of {args} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stderr.strip().splitlines()[-1])["heavy"]


def make_demo_store(store: Path) -> tuple[str, str]:
    """The demo's digits CNN (trained briefly here when its checkpoint is missing) over the digits
    benchmark, scored with msp."""
    model, weights = "digits_cnn", str(CKPT)
    if not CKPT.exists():
        weights = str(store.parent / "digits_cnn.safetensors")
        run_process([sys.executable, "-m", "oodcli", "-q", "train", "classifier", "--out", weights, "--epochs", "2"])
    run_process([sys.executable, "-m", "oodcli", "-q", "extract", "--model", model, "--weights", weights,
                 "--benchmark", "digits", "--store", str(store)])
    run_process([sys.executable, "-m", "oodcli", "-q", "score", "msp", "--store", str(store), "--backbone", model])
    return model, weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cli.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "digits.zarr"
        if STORE.exists() and CKPT.exists():
            shutil.copytree(STORE, store)
            model, weights = "digits_cnn", str(CKPT)
        else:
            model, weights = make_demo_store(store)
        extract_args = ["extract", "--model", model, "--weights", weights, "--benchmark", "digits",
                        "--store", str(store), "--device", "auto"]

        from oodcli import reporting as rep
        from oodcli.api import extract_splits
        from oodcli.scoring import score_store
        from oodcli.store import open_store
        from oodcli.store_info import describe_store, render_tree

        def work_report():
            with open_store(store, "r") as st:
                rep.render_table(rep.build_report(st, None, None))

        def work_info():
            with open_store(store, "r") as st:
                render_tree(describe_store(st))

        def work_extract():
            results = extract_splits(model, store, benchmark="digits", weights=weights)
            assert all(r.status == "cached" for r in results), [r.status for r in results]

        def work_score():
            with open_store(store, "r+") as st:
                score_store(st, ["msp"], backbone="digits_cnn")

        cases = [
            ("report", ["report", "--store", str(store)], work_report),
            ("store info", ["store", "info", str(store)], work_info),
            ("extract (cache hit)", extract_args, work_extract),
            ("score msp", ["score", "msp", "--store", str(store), "--backbone", "digits_cnn"], work_score),
        ]
        floor = best_of(lambda: run_process([sys.executable, "-c", "import oodcli"]), args.repeats)
        rows = []
        for name, argv, work in cases:
            work()  # warm-up: first-touch costs out of the in-process timing
            work_s = best_of(work, args.repeats)
            cli_s = best_of(lambda: run_process([sys.executable, "-m", "oodcli", "-q", *argv]), args.repeats)
            rows.append({
                "command": name,
                "argv": ["oodcli", *[a.replace(str(store), "STORE").replace(f"{ROOT}/", "") for a in argv]],
                "cli_s": cli_s,
                "work_s": work_s,
                "overhead_s": cli_s - work_s,
                "heavy_imports": heavy_imports(["-q", *argv]),
            })

    print(f"floor: python -c 'import oodcli' {floor:.3f} s")
    print(f"{'command':20} {'cli':>8} {'work':>8} {'overhead':>9}  heavy imports")
    for r in rows:
        print(f"{r['command']:20} {r['cli_s']:7.3f}s {r['work_s']:7.3f}s {r['overhead_s']:8.3f}s  "
              f"{', '.join(r['heavy_imports']) or '-'}")
    meta = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "python": platform.python_version(),
        "repeats": args.repeats,
        "date": time.strftime("%Y-%m-%d"),
        "import_oodcli_s": floor,
        "load_avg_1min": os.getloadavg()[0],  # other work on the machine inflates every timing
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
