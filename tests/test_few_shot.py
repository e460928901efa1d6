"""Few-shot subsets: ``extract --shots N --seed S`` stores the draw that ``train --shots N --seed S``
makes from a whole split, shot counts nest, a few-shot split trains on exactly its rows and refuses
what it does not hold, and a killed extraction resumes to the same subset."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import one_line_error, run
from oodcli.data import open_source
from oodcli.data.base import data_root
from oodcli.errors import UsageError
from oodcli.fewshot import few_shot_rows, shot_keys
from oodcli.store import open_store

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest

MODEL = "vit-tiny"
CLIP = ["--model", "clip-tiny", "--layers", "image_embeds", "--dtype", "float32"]


def _splitmix(x: int) -> int:
    """splitmix64's finaliser written out on Python ints, the reference for ``shot_keys``."""
    m = 2**64 - 1
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m
    return x ^ (x >> 31)


def _parent_labels() -> np.ndarray:
    return np.asarray(open_source("digits:train", data_root(None)).labels)


def _split(store, split="train"):
    with open_store(store) as st:
        node = f"splits/{split}"
        return st.read(f"{node}/ids"), st.read(f"{node}/labels"), st.node_attrs(node)


# ---- the draw -----------------------------------------------------------------------------------


def test_keys_are_splitmix64_of_seed_and_row():
    ids = np.array([0, 1, 7, 123456, 2**40])
    for seed in (0, 1, 12345):
        base = _splitmix(seed)
        want = [_splitmix((int(i) * 0x9E3779B97F4A7C15 + base) % 2**64) for i in ids]
        assert shot_keys(ids, seed).tolist() == want


def test_draw_is_the_smallest_keys_per_class_and_nests():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, 400)
    classes = [0, 1, 2, 3, 4]
    keys = shot_keys(np.arange(len(labels)), 7)
    for shots in (1, 2, 4, 8, 16):
        want = np.sort(np.concatenate([np.flatnonzero(labels == c)[np.argsort(keys[labels == c])[:shots]] for c in classes]))
        assert np.array_equal(few_shot_rows(labels, classes, shots, 7), want)
    sets = [set(few_shot_rows(labels, classes, s, 7).tolist()) for s in (1, 2, 4, 8, 16)]
    assert all(a < b for a, b in zip(sets, sets[1:]))  # each holds the one before
    assert np.bincount(labels[few_shot_rows(labels, classes, 16, 7)]).tolist() == [16] * 5
    assert not np.array_equal(few_shot_rows(labels, classes, 4, 7), few_shot_rows(labels, classes, 4, 8))
    # a class's shots do not depend on the other classes drawn
    alone = few_shot_rows(labels, [2], 4, 7)
    assert set(alone) == {r for r in few_shot_rows(labels, classes, 4, 7) if labels[r] == 2}


def test_draw_from_a_subset_gives_the_same_parent_rows():
    """From a 16-shot subset, with its parent positions as ids, the 4-shot draw is the parent's."""
    labels = np.random.default_rng(1).integers(0, 3, 300)
    sub = few_shot_rows(labels, [0, 1, 2], 16, 3)
    inner = few_shot_rows(labels[sub], [0, 1, 2], 4, 3, ids=sub)
    assert np.array_equal(sub[inner], few_shot_rows(labels, [0, 1, 2], 4, 3))


def test_too_few_images_names_the_class_and_its_count():
    labels = np.array([0] * 10 + [1] * 3 + [2] * 10)
    with pytest.raises(UsageError, match=r"^class 1 \('b'\) has 3 training image\(s\), fewer than --shots 4"):
        few_shot_rows(labels, [0, 1, 2], 4, 0, ["a", "b", "c"])
    with pytest.raises(UsageError, match="at least 1"):
        few_shot_rows(labels, [0, 1, 2], 0, 0)


# ---- extract --shots ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """The digits train split extracted whole (the reference for the subsets)."""
    from oodcli.cli import main

    store = tmp_path_factory.mktemp("whole") / "whole.zarr"
    assert main(["-q", "extract", *CLIP, "--benchmark", "digits", "--split", "train", "--split", "test",
                 "--store", str(store)]) == 0
    return store


@pytest.fixture(scope="module")
def subset(tmp_path_factory):
    """The 8-shot, seed-2 subset of the same split."""
    from oodcli.cli import main

    store = tmp_path_factory.mktemp("subset") / "subset.zarr"
    assert main(["-q", "extract", *CLIP, "--benchmark", "digits", "--split", "train", "--shots", "8", "--seed", "2",
                 "--store", str(store)]) == 0
    return store


def test_extract_shots_stores_the_draw_its_rows_and_features(whole, subset):
    parent = _parent_labels()
    ids, labels, attrs = _split(subset)
    assert np.array_equal(ids, few_shot_rows(parent, list(range(6)), 8, 2))
    assert np.array_equal(labels, parent[ids]) and np.bincount(labels).tolist() == [8] * 6
    few = attrs["few_shot"]
    assert (few["shots"], few["seed"], few["classes"], few["parent_n"]) == (8, 2, [0, 5], len(parent))
    with open_store(whole) as w, open_store(subset) as s:
        assert few["parent"] == w.node_attrs("splits/train")["data"]  # the parent data set's identity
        node = "splits/train/clip-tiny"
        np.testing.assert_allclose(s.read(f"{node}/image_embeds"), w.read(f"{node}/image_embeds")[ids], atol=1e-5)
        parts = s.node_attrs(node)["parts"]
        assert parts["few_shot"] == few and parts["data"] == attrs["data"]
        assert s.node_attrs(node)["fingerprint"] != w.node_attrs(node)["fingerprint"]


def test_rerun_is_a_cache_hit_and_another_draw_is_refused(subset, capsys):
    code, out, _ = run(capsys, "extract", *CLIP, "--benchmark", "digits", "--split", "train", "--shots", "8",
                       "--seed", "2", "--store", subset)
    assert code == 0 and "cached 48 rows" in out
    code, _, err = run(capsys, "extract", *CLIP, "--benchmark", "digits", "--split", "train", "--shots", "4",
                       "--seed", "2", "--store", subset)
    assert code == 2 and one_line_error(err) and "holds the 8-shot subset (seed 2" in err and "--shots 4 --seed 2" in err
    code, _, err = run(capsys, "extract", *CLIP, "--benchmark", "digits", "--split", "train", "--store", subset)
    assert code == 2 and one_line_error(err) and "not the whole split" in err


@pytest.mark.parametrize("args,message", [
    (["--split", "train", "--shots", "0"], "--shots must be at least 1, not 0"),
    (["--split", "train", "--shots", "500"], "class 0 ('zero') has 100 training image(s), fewer than --shots 500"),
    (["--split", "ood/near/digits6-9", "--shots", "4"], "split 'ood/near/digits6-9' is ood-near"),
    (["--shots", "4"], "split 'ood/val/textures' is ood-val"),  # every split of the benchmark, OOD ones too
    (["--split", "train", "--classes", "0-2"], "--classes goes with --shots N"),
    (["--split", "train", "--seed", "3"], "--seed goes with --shots N"),
    (["--split", "train", "--shots", "4", "--classes", "0-9"], "--classes 0-9 is outside the label set (classes 0-5)"),
    (["--split", "train", "--shots", "4", "--classes", "3"], "bad --classes '3'"),
])
def test_bad_shots_are_one_line_and_write_nothing(tmp_path, capsys, args, message):
    store = tmp_path / "bad.zarr"
    code, out, err = run(capsys, "extract", "--model", MODEL, "--benchmark", "digits", *args, "--store", store)
    assert code == 2 and one_line_error(err) and message in err, err
    assert not store.exists()


def test_classes_draw_only_those_classes(tmp_path, capsys):
    store = tmp_path / "c.zarr"
    code, _, err = run(capsys, "extract", "--model", MODEL, "--benchmark", "digits", "--split", "train", "--shots", "3",
                       "--classes", "2-4", "--store", store)
    assert code == 0, err
    ids, labels, attrs = _split(store)
    parent = _parent_labels()
    assert np.array_equal(ids, few_shot_rows(parent, [2, 3, 4], 3, 0)) and attrs["few_shot"]["classes"] == [2, 4]
    assert set(labels.tolist()) == {2, 3, 4}


# ---- train on a few-shot split ------------------------------------------------------------------


def _coop(store, out, shots, seed=2, **kw):
    from oodcli.train import prompts as P

    result = P.train_prompts("coop", store, out, shots=shots, seed=seed, epochs=2, n_ctx=2, **kw)
    return P.read_prompt_file(out), result


@pytest.mark.parametrize("shots", [8, 4])
def test_training_on_the_subset_equals_training_on_the_whole_split(whole, subset, tmp_path, shots):
    """The same parent rows, and (the features being the same images') the same prompts; 4 shots
    are the nested prefix of the 8 held."""
    a, _ = _coop(whole, tmp_path / "whole.safetensors", shots)
    b, _ = _coop(subset, tmp_path / "subset.safetensors", shots)
    assert a.meta["shot_rows"] == b.meta["shot_rows"] and len(a.meta["shot_rows"]) == 6 * shots
    assert a.meta["shot_rows"] == few_shot_rows(_parent_labels(), list(range(6)), shots, 2).tolist()
    np.testing.assert_allclose(a.ctx.numpy(), b.ctx.numpy(), atol=1e-4)
    assert not np.allclose(a.ctx.numpy(), _coop(whole, tmp_path / "other.safetensors", shots, seed=3)[0].ctx.numpy())


@pytest.mark.parametrize("kw,message", [
    ({"shots": 4, "seed": 3}, "holds the 8-shot subset (seed 2, classes 0-5); train with --seed 2"),
    ({"shots": 16}, "fewer than --shots 16; train with --shots 8 or fewer"),
    ({"shots": 4, "train_classes": "0-1"}, None),  # within the classes held: fine
])
def test_a_few_shot_split_refuses_another_seed_or_more_shots(subset, tmp_path, kw, message):
    from oodcli.train import prompts as P

    kw = {"seed": 2, **kw}
    if message is None:
        result = P.train_prompts("coop", subset, tmp_path / "ok.safetensors", epochs=1, n_ctx=2, **kw)
        assert result.classes == 2
        return
    with pytest.raises(UsageError) as e:
        P.train_prompts("coop", subset, tmp_path / "no.safetensors", epochs=1, n_ctx=2, **kw)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "no.safetensors").exists()


def test_cli_train_refusal_is_one_line_exit_2(subset, tmp_path, capsys):
    code, _, err = run(capsys, "train", "coop", "--store", subset, "--shots", "4", "--seed", "5", "--epochs", "1",
                       "--out", tmp_path / "x.safetensors")
    assert code == 2 and one_line_error(err) and "--seed 2" in err


def test_classes_outside_the_subset_are_refused(tmp_path):
    from oodcli.cli import main
    from oodcli.train import prompts as P

    store = tmp_path / "c.zarr"
    assert main(["-q", "extract", *CLIP, "--benchmark", "digits", "--split", "train", "--shots", "2", "--classes", "0-2",
                 "--store", str(store)]) == 0
    with pytest.raises(UsageError, match="train on classes within 0-2 .*not 0-5"):
        P.train_prompts("coop", store, tmp_path / "x.safetensors", shots=2, seed=0, epochs=1, n_ctx=2,
                        train_classes="0-5")
    result = P.train_prompts("coop", store, tmp_path / "y.safetensors", shots=2, seed=0, epochs=1, n_ctx=2)
    assert result.classes == 3  # by default the classes it holds


# ---- resume after a kill ------------------------------------------------------------------------


def test_killed_extraction_resumes_to_the_same_subset(tmp_path):
    from test_crash import assert_same_and_clean, counted_run, killed_run, snapshot

    argv = lambda s: ["extract", "--model", MODEL, "--benchmark", "digits", "--split", "train", "--shots", "16",  # noqa: E731
                      "--seed", "4", "--chunk-rows", "16", "--batch-size", "16", "--store", s]
    ref = tmp_path / "ref.zarr"
    mutations, _, _ = counted_run(argv(ref))
    want = snapshot(ref)
    for k in (3, mutations // 2, mutations - 1):
        work = tmp_path / f"k{k}.zarr"
        assert killed_run(argv(work), k, tmp_path / f"k{k}.log")
        assert counted_run(argv(work))[0] > 0  # the rerun resumes (or redoes) what the kill left
        assert_same_and_clean(work, want, f"extract --shots killed before mutation {k}, then rerun")


def test_split_patterns_pick_among_a_benchmarks_splits():
    """What the recipes use to extract the test sets beside a few-shot train split."""
    from oodcli.api import resolve_splits

    names = [d.name for d in resolve_splits("digits", None, ["test", "ood/far/*", "test"], None)]
    assert names == ["test", "ood/far/textures", "ood/far/noise"]
    with pytest.raises(UsageError, match="matches no split of benchmark 'digits'"):
        resolve_splits("digits", None, ["ood/middle/*"], None)
    with pytest.raises(UsageError, match="with --data name the split"):
        resolve_splits(None, "digits:train", ["ood/*"], None)
