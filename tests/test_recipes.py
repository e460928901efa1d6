"""Every script in recipes/ runs end to end, as a user would run it, on a fabricated data root in
the layout each expects (OpenOOD v1.5 image lists with a few generated images per list, the
ImageNet class folders and MOS OOD folders), with the tiny twins substituted through the recipes'
environment variables; each must exit 0 and write its report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
OODCLI = f"{sys.executable} -m oodcli"


def _png(path: Path, rng, size: int = 32) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)


def _imglist(root: Path, bench: str, name: str, image_dir: str, labels: list[int], rng) -> None:
    """benchmark_imglist/<bench>/<name>.txt listing one generated image per label (-1: OOD)."""
    lines = []
    for i, y in enumerate(labels):
        rel = f"{bench}/{name}/{i}.png"
        _png(root / image_dir / rel, rng)
        lines.append(f"{rel} {max(y, 0)}")
    lst = root / "benchmark_imglist" / bench / f"{name}.txt"
    lst.parent.mkdir(parents=True, exist_ok=True)
    lst.write_text("\n".join(lines) + "\n")


def _openood_cifar(root: Path, bench: str, classes: int, rng) -> None:
    other = "cifar100" if bench == "cifar10" else "cifar10"
    _imglist(root, bench, f"train_{bench}", "images_classic", [c for c in range(classes) for _ in range(2)], rng)
    _imglist(root, bench, f"val_{bench}", "images_classic", list(range(min(classes, 10))), rng)
    _imglist(root, bench, f"test_{bench}", "images_classic", [c % classes for c in range(20)], rng)
    for name in ("val_tin", f"test_{other}", "test_tin", "test_mnist", "test_svhn", "test_texture", "test_places365"):
        _imglist(root, bench, name, "images_classic", [-1] * 6, rng)


#: the ImageNet classes given images: NegPrompt's Split-2 (ID 159-170, 173-190; OOD among 151-158,
#: 269-275) and the ImageNet-1K benchmarks' first classes; every other class folder stays empty
IMAGENET_TRAIN = list(range(151, 191))
IMAGENET_VAL_EXTRA = list(range(269, 276))


def _imagenet(root: Path, rng) -> None:
    for c in range(1000):
        for split in ("train", "val"):
            (root / "imagenet" / split / f"n{c:08d}").mkdir(parents=True, exist_ok=True)
    for c in IMAGENET_TRAIN:
        for i in range(2):
            _png(root / "imagenet" / "train" / f"n{c:08d}" / f"{i}.png", rng)
        _png(root / "imagenet" / "val" / f"n{c:08d}" / "0.png", rng)
    for c in IMAGENET_VAL_EXTRA:
        _png(root / "imagenet" / "val" / f"n{c:08d}" / "0.png", rng)
    for folder in ("iNaturalist", "SUN", "Places", "dtd/images"):
        for i in range(4):
            _png(root / "imagenet-mos" / folder / f"{i}.png", rng)
    # OpenOOD v1.5's ImageNet-1K lists (textures sit under images_classic there)
    ids = [c for c in IMAGENET_TRAIN for _ in range(2)]
    _imglist(root, "imagenet", "train_imagenet", "images_largescale", ids, rng)
    _imglist(root, "imagenet", "val_imagenet", "images_largescale", IMAGENET_TRAIN[:10], rng)
    _imglist(root, "imagenet", "test_imagenet", "images_largescale", IMAGENET_TRAIN, rng)
    for name in ("val_openimage_o", "test_ssb_hard", "test_ninco", "test_inaturalist", "test_openimage_o"):
        _imglist(root, "imagenet", name, "images_largescale", [-1] * 4, rng)
    _imglist(root, "imagenet", "test_textures", "images_classic", [-1] * 4, rng)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    _openood_cifar(root, "cifar10", 10, rng)
    _openood_cifar(root, "cifar100", 100, rng)
    _imagenet(root, rng)
    return root


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("recipes")


def _recipe(name: str, data_root: Path, cwd: Path, *args, **env) -> subprocess.CompletedProcess:
    full = {**os.environ, "OODCLI": OODCLI, "OODCLI_DATA_ROOT": str(data_root), "STORES": str(cwd / "stores"),
            "DEVICE": "cpu", "WORKERS": "0", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
            **{k: str(v) for k, v in env.items()}}
    proc = subprocess.run(["bash", str(RECIPES / name), *map(str, args)], cwd=cwd, env=full, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"{name} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return proc


def _report(path: Path, fpr: str, methods: set[str], sets: set[str]) -> dict:
    """The JSON report parses, is in the recipe's FPR@95 convention and has every method on every set."""
    doc = json.loads(path.read_text())
    assert doc["fpr"] == fpr
    assert set(doc["ood_splits"]) == sets
    assert methods <= set(doc["methods"]), f"{path.name}: {sorted(doc['methods'])}"
    for m in methods:
        cells = doc["methods"][m]["sets"]
        assert set(cells) == sets
        for cell in cells.values():
            assert 0.0 <= cell["auroc"] <= 1.0 and 0.0 <= cell["fpr95"] <= 1.0 and 0.0 <= cell["fpr95_openood"] <= 1.0
    return doc


CIFAR_SETS = {"ood/near/tin", "ood/far/mnist", "ood/far/svhn", "ood/far/texture", "ood/far/places365"}
MOS_SETS = {"ood/far/inaturalist", "ood/far/sun", "ood/far/places", "ood/far/textures"}
GROOD_METHODS = {"grood", "grood-distance", "grood-gradnorm", "grood-classgrad", "knn", "msp", "energy"}


@pytest.fixture(scope="module")
def cifar_ckpts(tmp_path_factory):
    """Random OpenOOD-style CIFAR ResNet-18 state_dicts (torch.save, 'linear.' head) for 10 and 100 classes."""
    import torch

    from oodcli.backbones.cifar_resnet import DEPTHS, CifarResNet

    folder = tmp_path_factory.mktemp("ckpt")
    out = {}
    for classes in (10, 100):
        torch.manual_seed(classes)
        out[classes] = folder / f"cifar{classes}-s0.ckpt"
        torch.save(CifarResNet(DEPTHS["cifar_resnet18"], classes).state_dict(), out[classes])
    return out


@pytest.mark.parametrize("bench,classes,near", [("cifar10", 10, "ood/near/cifar100"), ("cifar100", 100, "ood/near/cifar10")])
def test_grood_recipe(data_root, work, cifar_ckpts, bench, classes, near):
    proc = _recipe(f"grood-{bench}.sh", data_root, work, cifar_ckpts[classes])
    assert "OpenOOD v1.5 convention" in proc.stdout  # the table caption names the convention shown
    _report(work / "stores" / f"grood-{bench}-0.json", "openood", GROOD_METHODS, CIFAR_SETS | {near})


def test_grood_recipe_without_a_checkpoint_says_how_to_call_it(data_root, work):
    proc = subprocess.run(["bash", str(RECIPES / "grood-cifar10.sh")], cwd=work, capture_output=True, text=True,
                          env={**os.environ, "OODCLI": OODCLI})
    assert proc.returncode == 2 and proc.stderr.startswith("usage:")


def test_apex_cifar100_recipe(data_root, work):
    _recipe("apex-cifar100.sh", data_root, work, DINO_MODEL="dinov2-tiny", DINOV2="random", K_RANGE="1..2",
            MODEL="cifar_resnet18", EPOCHS=1, BATCH=64)
    stores = work / "stores"
    sets = CIFAR_SETS | {"ood/near/cifar10"}
    _report(stores / "apex-cifar100.json", "id", {"palm", "apex"}, sets)
    for ablation in ("apm", "no-qc", "no-qs"):
        _report(stores / f"apex-cifar100-{ablation}.json", "id", {"apex"}, sets)
    assert json.loads((stores / "apex-cifar100-collisions.json").read_text())["apex"]["classes"] == 100


def test_apex_digits_recipe(data_root, work):
    store = work / "digits" / "digits.zarr"
    store.parent.mkdir()
    code = subprocess.run([sys.executable, "-m", "oodcli", "-q", "extract", "--model", "digits_cnn-tiny", "--benchmark",
                           "digits", "--store", str(store)], cwd=work, capture_output=True, text=True)
    assert code.returncode == 0, code.stderr
    _recipe("apex-digits.sh", data_root, work, store, MODEL="digits_cnn-tiny", EPOCHS=1)
    _report(work / "digits" / "digits-apex.json", "id", {"palm", "apex"},
            {"ood/near/digits6-9", "ood/near/letters", "ood/far/textures", "ood/far/noise"})


def test_negprompt_recipe(data_root, work):
    _recipe("negprompt-imagenet.sh", data_root, work, "imagenet-p2", MODEL="clip-tiny", WEIGHTS="random", SEEDS=1,
            SHOTS=2, COOP_EPOCHS=1, EPOCHS=1)
    _report(work / "stores" / "negprompt-imagenet-p2.json", "id", {"mcm", "coop", "negprompt", "coop-10pct",
                                                                  "negprompt-10pct"}, {"ood/near/p2-unknown"})


def test_iim_recipe(data_root, work):
    # Split-2 of the ImageNet folders: every ID class has training images (the few-shot draw needs them)
    _recipe("iim-imagenet.sh", data_root, work, "imagenet-p2", MODEL="clip-tiny", WEIGHTS="random", SHOTS=1,
            EPOCHS=1, K=2, OOD_PROMPTS=4, BATCH=8)
    methods = {"mcm", "gl-mcm", "r-mcm"} | {f"{m}-1-shot" for m in ("s-mcm", "s-mcm-star", "r-mcm-trained", "gl-mcm-local")}
    _report(work / "stores" / "iim-imagenet-p2.json", "id", methods, {"ood/near/p2-unknown"})


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    from oodcli.synth.tiny_diffusion import build_tiny_pipeline

    path = tmp_path_factory.mktemp("pipe") / "tiny_inpaint"
    build_tiny_pipeline(seed=0).save_pretrained(str(path), safe_serialization=True)
    return path


def test_synood_recipe(data_root, work, tiny_pipeline):
    _recipe("synood-imagenet.sh", data_root, work, MODEL="clip-tiny", WEIGHTS="random", PER_CLASS=1, CONTEXT="clip",
            PIPELINE=tiny_pipeline, CLASSIFIER="resnet18-tiny", STEPS=2, PROJ_EPOCHS=1, LABEL_EPOCHS=1)
    methods = {"mcm", "neglabel", "synood", "synood-projection-only", "synood-labels-only"}
    _report(work / "stores" / "synood-imagenet-mos.json", "id", methods, MOS_SETS)
    _report(work / "stores" / "synood-imagenet.json", "openood", methods,
            {"ood/near/ssb_hard", "ood/near/ninco", "ood/far/inaturalist", "ood/far/textures", "ood/far/openimage_o"})
