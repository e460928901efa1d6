"""NegPrompt's ImageNet-1K hard OOD splits (open-set protocols P1-P3 and Split-4) and the
``classes:`` source with label lists. Offline: the class lists are shipped data, checked here
against ImageNet facts; images are tiny PNGs written to tmp_path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from oodcli.data import get_benchmark, list_benchmarks, open_source
from oodcli.data.benchmarks import BENCHMARK_DIR, Benchmark
from oodcli.data.sources import parse_class_list
from oodcli.errors import OodError, UsageError

# benchmark -> (OOD split, ID classes, OOD classes): the counts of the protocol paper
# (known / unknown; its negatives are not used) and NegPrompt's Split-4
EXPECTED = {
    "imagenet-p1": ("ood/near/p1-unknown", 116, 166),
    "imagenet-p2": ("ood/near/p2-unknown", 30, 55),
    "imagenet-p3": ("ood/near/p3-unknown", 151, 164),
    "imagenet-split4": ("ood/near/split4-unknown", 100, 900),
}
DOGS = range(151, 269)  # ImageNet-1K labels 151-268 are the dog breeds
ANIMALS = range(398)  # labels 0-397 are animals, 398-999 are not


def labels_of(source: str) -> list[int]:
    """The ImageNet labels a ``classes:LABELS:folder:...`` source selects, in listed order."""
    kind, spec, inner = source.split(":", 2)
    assert kind == "classes" and inner.startswith("folder:imagenet/")
    return [label for first, last in parse_class_list(spec) for label in range(first, last + 1)]


def id_ood(name: str) -> tuple[list[int], list[int]]:
    bench = get_benchmark(name)
    ood_split = EXPECTED[name][0]
    train, test = labels_of(bench.split("train").source), labels_of(bench.split("test").source)
    assert train == test
    return test, labels_of(bench.split(ood_split).source)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_benchmark_loads_with_consistent_lists(name):
    ood_split, n_id, n_ood = EXPECTED[name]
    assert name in list_benchmarks()
    bench = get_benchmark(name)
    assert [s.name for s in bench.splits] == ["train", "test", ood_split]
    assert [s.role for s in bench.splits] == ["id", "id", "ood-near"]
    assert bench.split("train").source.endswith(":folder:imagenet/train")
    assert bench.split("test").source.endswith(":folder:imagenet/val")
    assert bench.split(ood_split).source.endswith(":folder:imagenet/val")
    assert "Palechor" in bench.description or "Split-4" in bench.description
    id_labels, ood_labels = id_ood(name)
    assert (len(id_labels), len(ood_labels)) == (n_id, n_ood) and bench.num_classes == n_id
    assert id_labels == sorted(set(id_labels)) and ood_labels == sorted(set(ood_labels))  # label order, no repeats
    assert not set(id_labels) & set(ood_labels)
    assert 0 <= min(id_labels + ood_labels) and max(id_labels + ood_labels) <= 999
    # ImageNet names and CLIP's cleaned names of exactly the ID classes, in label order
    imagenet_names = get_benchmark("imagenet-mos").resolve_class_names()
    clip_names = get_benchmark("imagenet-mos").resolve_prompt_names()
    assert bench.resolve_class_names() == [imagenet_names[i] for i in id_labels]
    assert bench.resolve_prompt_names() == [clip_names[i] for i in id_labels]


def test_split4_is_first_100_vs_next_900():
    id_labels, ood_labels = id_ood("imagenet-split4")
    assert id_labels == list(range(100)) and ood_labels == list(range(100, 1000))
    bench = get_benchmark("imagenet-split4")
    assert bench.split("test").source == "classes:0-99:folder:imagenet/val"
    assert bench.resolve_class_names()[:2] == ["tench", "goldfish"]


def test_p1_is_dogs_vs_non_animals():
    id_labels, ood_labels = id_ood("imagenet-p1")
    names = get_benchmark("imagenet-p1").resolve_class_names()
    assert set(id_labels) <= set(DOGS) and 151 in id_labels
    assert {"Chihuahua", "golden retriever", "German shepherd", "pug"} <= set(names)
    # the protocol's tree files greyhounds under "racer": Italian greyhound and whippet are out
    assert set(DOGS) - set(id_labels) == {171, 172}
    assert not set(ood_labels) & set(ANIMALS)  # no animal among the unknowns
    ood_names = [get_benchmark("imagenet-mos").resolve_class_names()[i] for i in ood_labels]
    assert {"bagel", "ambulance", "laptop", "banana"} <= set(ood_names)


def test_p2_is_half_the_hunting_dogs_vs_other_four_legged_animals():
    id_labels, ood_labels = id_ood("imagenet-p2")
    assert set(id_labels) <= set(DOGS) and id_labels[0] == 159  # Rhodesian ridgeback
    assert set(ood_labels) <= set(ANIMALS)
    ood_names = {get_benchmark("imagenet-mos").resolve_class_names()[i] for i in ood_labels}
    assert {"Chihuahua", "timber wolf", "red fox", "tiger", "brown bear", "zebra", "otter"} <= ood_names
    assert not ood_names & {"goldfish", "tabby", "robin"}  # no fish, no house cat, no bird


def test_p3_mixes_common_classes_on_both_sides():
    id_labels, ood_labels = id_ood("imagenet-p3")
    for labels in (id_labels, ood_labels):
        assert any(i in DOGS for i in labels) and any(i < 151 for i in labels)
        assert any(i not in ANIMALS for i in labels)


def test_shipped_files_are_the_generator_output_format():
    from oodcli.data import imagenet_protocols as gen

    for name in EXPECTED:
        text = (BENCHMARK_DIR / f"{name}.json").read_text()
        assert gen.dump(json.loads(text)) == text  # written by the generator, not edited by hand


def test_generator_helpers_without_wordnet(tmp_path):
    from oodcli.data import imagenet_protocols as gen

    assert gen.label_spec([1, 2, 3, 7, 9, 10]) == "1-3,7,9-10" and gen.label_spec([4]) == "4"
    spec = gen.label_spec(list(range(100, 1000)))
    assert spec == "100-999" and parse_class_list(spec) == [(100, 999)]
    # WordNet's data.noun: licence lines start with a space; '@' / '@i' are (instance) hypernyms
    (tmp_path / "data.noun").write_text(
        "  1 licence text\n"
        "00001740 03 n 01 entity 0 001 ~ 00001930 n 0000 | that which exists\n"
        "02084071 05 n 02 dog 0 domestic_dog 0 003 @ 02083346 n 0000 @ 01317541 n 0000 ~ 01322604 n 0000 | a dog\n"
        "09044862 15 n 01 Pennsylvania 0 002 @i 08695539 n 0000 #p 09044862 n 0000 | a state\n"
    )
    assert gen.read_hypernyms(tmp_path) == {
        "n00001740": [],
        "n02084071": ["n02083346", "n01317541"],
        "n09044862": ["n08695539"],
    }


def test_generator_import_is_light():
    import subprocess
    import sys

    code = (
        "import sys, oodcli.data, oodcli.data.imagenet_protocols\n"
        "print('torch' in sys.modules, 'timm' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


# --- the classes: source with label lists ------------------------------------------------------


def _write_png(path: Path, value: int):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (3, 2), (value % 256, value // 256, 7)).save(path)


def _pixel_class(img) -> int:
    r, g, _ = img.getpixel((0, 0))
    return r + 256 * g


@pytest.fixture
def toy(tmp_path):
    """An ImageFolder of 6 classes c0..c5; class c holds c+1 images whose pixel encodes c."""
    for c in range(6):
        for i in range(c + 1):
            _write_png(tmp_path / "toy" / f"c{c}" / f"{i}.png", c)
    return tmp_path


def test_class_list_selects_and_relabels_in_listed_order(toy):
    ds = open_source("classes:4,1-2:folder:toy", toy)
    assert ds.name == "classes:4,1-2:folder:toy"
    # rows keep the folder's order (classes 1, 2, then 4); labels follow the listed order
    assert ds.labels.dtype == np.int64 and ds.labels.tolist() == [1] * 2 + [2] * 3 + [0] * 5
    assert ds.class_names == ["c4", "c1", "c2"]
    assert [_pixel_class(ds.load(i)) for i in range(len(ds))] == [1] * 2 + [2] * 3 + [4] * 5
    assert ds.unreadable() == []
    ood = open_source("classes:4,1-2:folder:toy", toy, is_ood=True)
    assert len(ood) == 10 and (ood.labels == -1).all()
    single = open_source("classes:3:folder:toy", toy)
    assert single.name == "classes:3:folder:toy" and single.labels.tolist() == [0] * 4


def test_class_range_unchanged(toy):
    ds = open_source("classes:1-2:folder:toy", toy)
    assert ds.name == "classes:1-2:folder:toy" and ds.class_names == ["c1", "c2"]
    assert ds.labels.tolist() == [0, 0, 1, 1, 1]
    assert [_pixel_class(ds.load(i)) for i in range(len(ds))] == [1, 1, 2, 2, 2]
    assert open_source("classes:002-003:folder:toy", toy).name == "classes:2-3:folder:toy"  # as before
    # labels past the data set's classes select nothing; the names stop at the last class
    wide = open_source("classes:4-99:folder:toy", toy)
    assert wide.labels.tolist() == [0] * 5 + [1] * 6 and wide.class_names == ["c4", "c5"]


@pytest.mark.parametrize(
    "spec",
    ["classes:", "classes:1-2", "classes::folder:toy", "classes:a:folder:toy", "classes:1-:folder:toy",
     "classes:-1:folder:toy", "classes:3-1:folder:toy", "classes:1,,2:folder:toy", "classes:1,:folder:toy",
     "classes:1 ,2:folder:toy", "classes:1,1:folder:toy", "classes:0-3,2:folder:toy", "classes:5,4-6:folder:toy"],
)  # fmt: skip
def test_bad_class_lists_are_one_line_usage_errors(toy, spec):
    with pytest.raises(UsageError) as e:
        open_source(spec, toy)
    msg = str(e.value)
    assert "\n" not in msg and "classes:LABELS:SOURCE" in msg


def test_duplicate_label_is_named(toy):
    with pytest.raises(UsageError, match="label 2 is listed twice"):
        open_source("classes:0-3,2:folder:toy", toy)


def test_class_list_without_images_is_a_one_line_ood_error(toy):
    with pytest.raises(OodError) as e:
        open_source("classes:7,9-10:folder:toy", toy)
    assert not isinstance(e.value, UsageError) and "\n" not in str(e.value) and "7,9-10" in str(e.value)


def test_prompt_name_indices_out_of_range():
    bench = Benchmark("x", 2, None, "", [], prompt_names={"file": "imagenet_clip_classes.txt", "indices": [0, 1000]})
    with pytest.raises(OodError, match="no row 1000"):
        bench.resolve_prompt_names()
    ok = Benchmark("x", 2, None, "", [], prompt_names={"file": "imagenet_clip_classes.txt", "indices": [999, 0]})
    assert ok.resolve_prompt_names() == ["toilet paper", "tench"]


@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory):
    """imagenet/val and imagenet/train with one tiny image per ImageNet-1K class (folders in
    label order); the pixel of each image encodes its label."""
    root = tmp_path_factory.mktemp("data")
    for label in range(1000):
        _write_png(root / "imagenet" / "val" / f"n{label:08d}" / "0.png", label)
    (root / "imagenet" / "train").symlink_to(root / "imagenet" / "val")
    return root


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_benchmark_splits_open_the_right_images(imagenet_root, name):
    ood_split, n_id, n_ood = EXPECTED[name]
    bench = get_benchmark(name)
    id_labels, ood_labels = id_ood(name)
    for split in ("train", "test"):
        ds = bench.open(split, imagenet_root)
        assert ds.labels.tolist() == list(range(n_id))
        assert [_pixel_class(ds.load(i)) for i in range(len(ds))] == id_labels
    ood = bench.open(ood_split, imagenet_root)
    assert len(ood) == n_ood and (ood.labels == -1).all()
    assert [_pixel_class(ood.load(i)) for i in range(len(ood))] == ood_labels
