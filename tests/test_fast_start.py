"""Fast start (DESIGN.md): a command that runs no network imports no torch.

Each command runs in a fresh interpreter (``oodcli.cli.main`` then a look at
``sys.modules``); what it imported is the test, not how long it took (benchmarks/cli.py
times them). One extract that does compute runs too, so the lazy paths (builders,
device, DataLoader, digits images made on first use) are exercised from a cold start.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

NETWORK = ("torch", "torchvision", "transformers", "open_clip")
WATCHED = (*NETWORK, "scipy.stats", "sklearn", "skimage", "faiss")
MODEL = "digits_cnn-tiny"
SPLITS = ("test", "ood/far/noise")

PROBE = f"""
import json, sys
from oodcli.cli import main
rc = main(sys.argv[1:])
plugins = getattr(sys.modules.get("oodcli.plugins"), "_loaded", False)
print(json.dumps({{"rc": rc, "imported": [m for m in {WATCHED!r} if m in sys.modules], "plugins": plugins}}),
      file=sys.stderr)
"""


def probe(*args: str) -> tuple[dict, str]:
    """Run one command in a fresh interpreter: ({rc, imported}, stdout)."""
    proc = subprocess.run([sys.executable, "-c", PROBE, "-q", *args], capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    result = json.loads(lines[-1])
    assert result["rc"] == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return result, proc.stdout


def extract_args(store: Path) -> list[str]:
    args = ["extract", "--model", MODEL, "--benchmark", "digits", "--store", str(store), "--json"]
    for split in SPLITS:
        args += ["--split", split]
    return args


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A digits store made by a cold `oodcli extract` (which computes), then scored with msp."""
    store = tmp_path_factory.mktemp("fast") / "digits.zarr"
    result, stdout = probe(*extract_args(store))
    from oodcli.scoring import score_store
    from oodcli.store import open_store

    with open_store(store, "r+") as st:
        score_store(st, ["msp"])
    return store, result, json.loads(stdout)


def test_an_extract_that_computes_works_from_a_cold_start(made):
    store, result, rows = made
    assert [r["status"] for r in rows] == ["extracted"] * len(SPLITS)
    assert all(r["rows_computed"] == r["rows"] > 0 for r in rows)
    assert "torch" in result["imported"]  # it ran a network: the lazy paths did their job
    from oodcli.store import open_store

    with open_store(store, "r") as st:
        feats = st.read(f"splits/test/{MODEL}/logits")
    assert feats.shape == (rows[0]["rows"], 6) and np.isfinite(feats).all()


def test_cache_hit_extract_imports_no_torch(made):
    store = made[0]
    result, stdout = probe(*extract_args(store))
    assert [r["status"] for r in json.loads(stdout)] == ["cached"] * len(SPLITS)
    assert not set(NETWORK) & set(result["imported"]), result
    assert "sklearn" not in result["imported"]  # digits labels and identity need no sklearn


@pytest.mark.parametrize(
    "command",
    [
        "report --store STORE",
        "report --store STORE --format json",
        "store info STORE",
        "store verify STORE",
        "score msp --store STORE",
        f"index --store STORE --source splits/test/{MODEL}/penultimate --kind flat",
        "store rm STORE msp",
        "score --list",
        "extract --list-models",
        "extract --list-benchmarks",
    ],
)
def test_commands_without_a_network_import_no_torch(made, tmp_path, command):
    store = tmp_path / "copy.zarr"  # each command gets its own copy: order and writes do not matter
    shutil.copytree(made[0], store)
    result, _ = probe(*command.replace("STORE", str(store)).split())
    assert not set(NETWORK) & set(result["imported"]), result


@pytest.mark.parametrize("command", ["report --store STORE", "store info STORE", "score msp --store STORE"])
def test_commands_that_use_no_plugin_load_none(made, tmp_path, command):
    store = tmp_path / "copy.zarr"
    shutil.copytree(made[0], store)
    result, _ = probe(*command.replace("STORE", str(store)).split())
    assert result["plugins"] is False, result


def test_listings_load_the_plugins():  # the control: the probe does see a load
    for command in ("score --list", "extract --list-models"):
        assert probe(*command.split())[0]["plugins"] is True


def test_device_cuda_without_cuda_fails_before_any_work(made, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from oodcli.cli import main

    store = tmp_path / "new.zarr"
    assert main(["extract", "--model", MODEL, "--benchmark", "digits", "--store", str(store), "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert not store.exists()
    # asked for explicitly, cuda is checked even when every split is a cache hit
    assert main([*extract_args(made[0]), "--device", "cuda"]) == 2


def test_registry_and_specs_import_no_torch():
    code = (
        "import sys\n"
        "from oodcli.backbones import get_spec, all_specs, BackboneSpec, Preprocess\n"
        "from oodcli.backbones.base import get_spec as g, all_specs as a\n"
        "import oodcli.api, oodcli.extraction, oodcli.reporting, oodcli.store_info, oodcli.index\n"
        "from oodcli.scorers import scorer_names\n"
        "scorer_names()\n"
        "specs = all_specs()\n"
        "assert len(specs) > 10 and g('digits_cnn') is get_spec('digits_cnn')\n"
        "for spec in specs.values():\n"
        "    spec.preprocess.describe()\n"
        "    if not spec.needs_weights_file:\n"
        "        spec.weights_identity(None)\n"
        "from oodcli.data import open_source\n"
        "from pathlib import Path\n"
        "for part in ('train', 'test', 'ood/near/digits6-9', 'ood/far/textures', 'ood/far/noise'):\n"
        "    open_source('digits:' + part, Path('.'), part.startswith('ood')).identity()\n"
        "print(sorted(m for m in %r if m in sys.modules))\n" % (WATCHED,)
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not set(NETWORK) & set(eval(proc.stdout.strip().splitlines()[-1]))


def test_digits_split_matches_sklearn():
    """The digits train/test split kept in digits.py is the one scikit-learn makes (so the
    data and every store's fingerprint stay what they were), and labels need no images."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from oodcli.data import digits

    d = load_digits()
    labels = d.target.astype(np.int64)
    id_rows = np.flatnonzero(labels < 6)
    train, test = train_test_split(id_rows, test_size=digits.TEST_FRACTION, stratify=labels[id_rows],
                                   random_state=digits.SEED)
    rows = digits._rows()
    np.testing.assert_array_equal(np.sort(np.r_[rows["train"], rows["val"]]), np.sort(train))  # val: held out of train
    np.testing.assert_array_equal(rows["test"], np.sort(test))
    images, raw_labels = digits._digits_raw()
    np.testing.assert_array_equal(images, d.images / 16.0)
    np.testing.assert_array_equal(raw_labels, labels)
    assert digits.digits_part("test").identity() == "digits:test:n=325:labels=9d523386cfbe9ffc"
