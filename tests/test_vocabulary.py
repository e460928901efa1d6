"""NegLabel's shipped WordNet vocabulary: the generator, the shipped lists, and NegLabel
on a machine with no WordNet installed.

The generator runs on the few-synset WordNet of tests/test_clip.py; NegLabel runs on a
random tiny CLIP over the digits test split.
"""

import gzip
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

import oodcli.negatives as negatives
from conftest import one_line_error, run
from oodcli.cli import main
from oodcli.data import wordnet_vocabulary as gen
from oodcli.store import open_store
from test_clip import ADJS, NAMES, NOUNS, _copy, _save_tiny, fake_wordnet  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest
DEBIAN = Path("/usr/share/wordnet")
PARAMS = ["-p", "neglabel.num_negatives=12", "-p", "neglabel.ngroup=3"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab")
    weights, path = root / "tiny.safetensors", root / "digits_clip.zarr"
    _save_tiny(weights, seed=1)
    assert main(["-q", "extract", "--model", "clip-tiny", "--weights", str(weights), "--benchmark", "digits",
                 "--layers", "image_embeds", "--dtype", "float32", "--store", str(path), "--split", "test", "--split", "ood/far/noise"]) == 0
    return path


@pytest.fixture
def no_wordnet(monkeypatch, tmp_path):
    """A machine without any installed WordNet."""
    monkeypatch.setattr(negatives, "default_locations", lambda: [tmp_path / "nowhere", tmp_path / "nowhere.zip"])


def _neglabel(store, split="test"):
    with open_store(store) as st:
        return st.read(f"scores/neglabel/{split}"), st.node_attrs("fitted/text/clip-tiny/digits/neglabel")


def test_generated_lists_are_the_databases_words_and_deterministic(tmp_path, fake_wordnet):
    meta = gen.generate(fake_wordnet, tmp_path / "a")
    gen.generate(fake_wordnet, tmp_path / "b")
    for name in ("nouns.txt.gz", "adjectives.txt.gz", "LICENSE", "vocabulary.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    raw = (tmp_path / "a" / "nouns.txt.gz").read_bytes()
    assert raw[4:8] == b"\0\0\0\0"  # gzip mtime field
    nouns = gzip.decompress(raw).decode().splitlines()
    adjs = gzip.decompress((tmp_path / "a" / "adjectives.txt.gz").read_bytes()).decode().splitlines()
    # written independently of the parser: headwords of the fixture, "_" -> " ", markers dropped, deduplicated
    assert nouns == ["entity", "physical entity", "abstraction", "thing", "object", "whole", "living thing",
                     "organism", "cell", "causal agent", "person", "animal", "plant", "natural object", "food",
                     "artifact", "Five", "attribute", "feeling", "shape"]
    assert adjs == ["able", "unable", "abaxial", "adaxial", "acroscopic", "basiscopic", "abridged", "cut",
                    "bright", "gray"]
    assert (meta["nouns"], meta["adjectives"]) == (20, 10)
    assert meta["inputs_sha256"]["data.noun"] == hashlib.sha256(NOUNS.encode()).hexdigest()
    assert meta["inputs_sha256"]["data.adj"] == hashlib.sha256(ADJS.encode()).hexdigest()
    assert (tmp_path / "a" / "LICENSE").read_text().startswith("This software and database is being provided")


def test_excluding_names_afterwards_equals_reading_the_database(tmp_path, monkeypatch, fake_wordnet):
    # an adjective that is also a noun, and an ID name that is both: dedup and exclusion interact
    (fake_wordnet / "data.adj").write_text(ADJS + "00006300 00 a 01 Thing 0 000 | x\n00006400 00 a 01 shape 0 000 | y\n"
                                           "00006500 00 a 01 wavy 0 000 | z\n")
    gen.generate(fake_wordnet, tmp_path / "lists")
    monkeypatch.setattr(negatives, "SHIPPED", tmp_path / "lists")
    shipped = negatives.shipped_vocabulary()
    for exclude in ([], NAMES, ["thing", "GRAY", "wavy"], ["entity", "Able"]):
        assert shipped.candidates(exclude) == negatives.read_wordnet(fake_wordnet, exclude=exclude)
    assert "wavy" in shipped.adjectives and "Thing" not in shipped.adjectives


def test_neglabel_mines_the_same_negatives_from_the_generated_lists(capsys, monkeypatch, tmp_path, store,
                                                                     fake_wordnet, no_wordnet):
    gen.generate(fake_wordnet, tmp_path / "lists")
    from_db, from_lists = _copy(store, tmp_path / "db"), _copy(store, tmp_path / "lists-run")
    code, _, err = run(capsys, "-q", "score", "neglabel", "--store", from_db, "-p", f"neglabel.wordnet={fake_wordnet}", *PARAMS)
    assert code == 0, err
    monkeypatch.setattr(negatives, "SHIPPED", tmp_path / "lists")
    assert run(capsys, "-q", "score", "neglabel", "--store", from_lists, *PARAMS)[0] == 0
    (s_db, a_db), (s_lists, a_lists) = _neglabel(from_db), _neglabel(from_lists)
    assert a_db["words"] == a_lists["words"] and a_db["candidates"] == a_lists["candidates"] == 30 - 1  # 'Five' is ID
    np.testing.assert_array_equal(s_db, s_lists)
    assert a_db["wordnet_source"] == str(fake_wordnet) and a_lists["wordnet_source"].startswith("shipped:")


def test_shipped_lists_load_and_match_their_metadata():
    vocab = negatives.shipped_vocabulary()
    meta = json.loads((negatives.SHIPPED / "vocabulary.json").read_text())
    assert (len(vocab.nouns), len(vocab.adjectives)) == (meta["nouns"], meta["adjectives"])
    assert vocab.nouns[:3] == ["entity", "physical entity", "abstraction"]
    assert {"dog", "cat", "tree", "bamboo"} <= {w.lower() for w in vocab.nouns} and {"able", "bright"} <= set(vocab.adjectives)
    assert len({w.lower() for w in vocab.nouns + vocab.adjectives}) == len(vocab.nouns) + len(vocab.adjectives)
    assert meta["source"].startswith("WordNet 3.0") and vocab.source == "shipped:" + meta["source"]
    for name, sha in meta["outputs_sha256"].items():
        assert hashlib.sha256((negatives.SHIPPED / name).read_bytes()).hexdigest() == sha
    assert "WordNet 3.0 Copyright 2006 by Princeton University" in (negatives.SHIPPED / "LICENSE").read_text()


@pytest.mark.skipif(not (DEBIAN / "data.noun").is_file(), reason="no full WordNet installed at /usr/share/wordnet "
                    "(the generator's logic is covered on the fixture database)")
def test_shipped_lists_equal_the_installed_wordnet():
    meta = json.loads((negatives.SHIPPED / "vocabulary.json").read_text())
    if hashlib.sha256((DEBIAN / "data.noun").read_bytes()).hexdigest() != meta["inputs_sha256"]["data.noun"]:
        pytest.skip("the installed WordNet is another release than the one the lists were made from")
    shipped = negatives.shipped_vocabulary()
    installed = negatives.load_vocabulary(DEBIAN)
    assert (shipped.nouns, shipped.adjectives) == (installed.nouns, installed.adjectives)
    assert shipped.candidates(NAMES) == negatives.read_wordnet(DEBIAN, exclude=NAMES)


def test_neglabel_runs_without_any_wordnet_on_the_shipped_lists(capsys, tmp_path, store, no_wordnet):
    assert negatives.load_vocabulary().source.startswith("shipped:")
    copy = _copy(store, tmp_path)
    code, _, err = run(capsys, "-q", "score", "neglabel", "--store", copy, "-p", "neglabel.num_negatives=100",
                       "-p", "neglabel.ngroup=10")
    assert code == 0, err
    scores, attrs = _neglabel(copy)
    shipped = negatives.shipped_vocabulary()
    assert attrs["wordnet_source"] == shipped.source
    assert attrs["candidates"] == sum(map(len, shipped.candidates(NAMES)))
    assert len(attrs["words"]) == 100 and not {w.lower() for w in attrs["words"]} & set(NAMES)
    assert scores.shape == (len(scores),) and np.isfinite(scores).all() and ((scores > 0) & (scores < 1)).all()


def test_an_explicit_bad_path_still_errors(capsys, tmp_path, store, no_wordnet):
    code, _, err = run(capsys, "score", "neglabel", "--store", _copy(store, tmp_path),
                       "-p", f"neglabel.wordnet={tmp_path / 'missing'}")
    assert code == 1 and one_line_error(err) and "no WordNet database" in err and "wordnet-base" in err and "nltk" in err
