"""SynOOD's context labels (oodcli.synth.context): the clip provider against a top-k of
cosine similarities computed here, the JSON-lines file round trip and its errors, the
text-feature cache, and LLaVA's plumbing on a tiny random LLaVA built in the test.
"""

import json

import numpy as np
import pytest
import torch

import oodcli.synth.context as context
import oodcli.text as text
from conftest import one_line_error, run
from oodcli.backbones import get_spec
from oodcli.cli import main
from oodcli.errors import OodError, UsageError
from oodcli.negatives import Vocabulary
from oodcli.store import open_store
from test_clip import NAMES, _copy, _save_tiny

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest

# a small vocabulary: class names in several guises beside words that merely contain their letters
WORDS = ["bamboo", "leaf", "money", "bone", "one", "giant five", "Five", "tree", "sky", "railing", "tourist",
         "dog", "cat", "house", "zero hour", "stone", "twofold", "river", "fence", "cloud", "grass", "lamp",
         "panda", "giant", "giant panda cub"]
NAMING_A_CLASS = {"one", "giant five", "Five", "zero hour"}
PANDA_NAMES = NAMES[:5] + ["giant panda"]  # a two-word class: 'panda' and 'giant' are only its own images' object


@pytest.fixture(scope="module")
def clip_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("context")
    weights, store = root / "tiny.safetensors", root / "digits_clip.zarr"
    _save_tiny(weights, seed=3)
    assert main(["-q", "extract", "--model", "clip-tiny", "--weights", str(weights), "--benchmark", "digits",
                 "--layers", "image_embeds", "--dtype", "float32", "--store", str(store), "--split", "train"]) == 0
    return weights, store


@pytest.fixture
def small_vocabulary(monkeypatch):
    monkeypatch.setattr(context, "clip_vocabulary", lambda: Vocabulary(WORDS, [], "test words"))


def _reference_top_k(weights, store, rows, k, banned, own=None):
    """Top-k words by cosine similarity, from the model and the stored embeddings directly;
    ``banned`` words never, ``own[class]`` words not for that class's images."""
    model = get_spec("clip-tiny").build(str(weights))
    with torch.no_grad():
        t = model.encode_text([f"a photo of a {w}." for w in WORDS]).double().numpy()
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    with open_store(store) as st:
        x = st.read("splits/train/clip-tiny/image_embeds").astype(np.float64)[rows]
        classes = st.read("splits/train/labels")[rows]
    sims = (x / np.linalg.norm(x, axis=1, keepdims=True)) @ t.T
    out = []
    for row, c in zip(sims, classes):
        ok = [j for j, w in enumerate(WORDS) if w not in banned and w not in (own or {}).get(int(c), ())]
        out.append([WORDS[ok[j]] for j in np.argsort(-row[ok])[:k]])
    return out


def test_class_names_are_matched_as_whole_words():
    is_class = context.names_class(NAMES)
    assert is_class("Five") and is_class("giant five") and not is_class("money") and not is_class("twofold")
    assert context.names_class(["kite (bird of prey)"])("red kite (bird of prey)")
    assert context.is_main_object("panda", "giant panda") and context.is_main_object("giant panda cub", "giant panda")
    assert not context.is_main_object("red panda", "giant panda") and not context.is_main_object("pan", "giant panda")


def test_clip_labels_are_the_top_k_cosines_without_class_names(tmp_path, clip_store, small_vocabulary):
    weights, store = clip_store
    copy = _copy(store, tmp_path)
    with open_store(copy, "r+") as st:
        result = context.context_labels(st, split="train", source="clip", top_k=5, per_class=3, seed=1, pick="random")
        ids_all, labels_all = st.read("splits/train/ids"), st.read("splits/train/labels")
    rows = context.per_class_rows(labels_all, 3, 1)
    assert list(result.labels) == ids_all[rows].tolist() and len(rows) == 3 * len(NAMES)
    assert np.bincount(labels_all[rows]).tolist() == [3] * len(NAMES)
    expected = _reference_top_k(weights, copy, rows, 5, NAMING_A_CLASS)
    assert list(result.labels.values()) == expected
    assert all(len(v) == 5 and not set(v) & NAMING_A_CLASS for v in result.labels.values())
    assert result.provider.startswith("clip:clip-tiny weights=") and "test words" in result.provider
    with open_store(copy, "r+") as st:  # another seed, other images
        other = context.context_labels(st, split="train", source="clip", top_k=5, per_class=3, seed=2, pick="random")
    assert list(other.labels) != list(result.labels)
    # a two-word class name: its words are banned from its own images only
    names = tmp_path / "names.txt"
    names.write_text("\n".join(PANDA_NAMES))
    with open_store(copy, "r+") as st:
        panda = context.context_labels(st, top_k=len(WORDS) - 5, per_class=3, seed=1, pick="random", labels_file=str(names))
    expected = _reference_top_k(weights, copy, rows, len(WORDS) - 5, {"one", "zero hour", "giant panda cub"},
                                own={5: {"panda", "giant"}})
    assert list(panda.labels.values()) == expected
    mine = [labels_all[r] == 5 for r in rows]
    assert not any({"panda", "giant"} & set(v) for v, m in zip(panda.labels.values(), mine) if m)
    assert any({"panda", "giant"} & set(v) for v, m in zip(panda.labels.values(), mine) if not m)
    with open_store(copy, "r+") as st, pytest.raises(UsageError, match="--top-k 21 exceeds the 20"):
        context.context_labels(st, top_k=len(WORDS) - 4, per_class=3, seed=1, pick="random", labels_file=str(names))


def test_second_call_hits_the_text_cache(tmp_path, monkeypatch, clip_store, small_vocabulary):
    _, store = clip_store
    copy = _copy(store, tmp_path)
    with open_store(copy, "r+") as st:
        first = context.context_labels(st, top_k=3, per_class=2)
        assert st.node_attrs("fitted/text/clip-tiny/wordnet-nouns/photo")["words"] == len(WORDS)

    def no_build(source):
        raise OodError("a cache hit must not build the text tower")

    monkeypatch.setattr(text, "build_text_tower", no_build)
    with open_store(copy, "r+") as st:
        assert context.context_labels(st, top_k=3, per_class=2).labels == first.labels
    # other words are another cache entry: the tower is needed again
    monkeypatch.setattr(context, "clip_vocabulary", lambda: Vocabulary(WORDS[:-1], [], "fewer words"))
    with open_store(copy, "r+") as st, pytest.raises(OodError, match="cache hit"):
        context.context_labels(st, top_k=3, per_class=2)


def test_cli_writes_the_shipped_vocabulary_labels_and_the_file_round_trip(capsys, tmp_path, clip_store):
    _, store = clip_store
    copy, out = _copy(store, tmp_path), tmp_path / "context.jsonl"
    code, stdout, err = run(capsys, "synthesize", "context-labels", "--store", copy, "--per-class", "2",
                            "--top-k", "4", "--out", out, "--json")
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["images"] == 2 * len(NAMES) and summary["labels_per_image"] == 4
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines[0]["context_labels"]["provider"] == summary["provider"] and "shipped:WordNet 3.0" in summary["provider"]
    records = lines[1:]
    assert len(records) == 2 * len(NAMES) and all(len(r["labels"]) == 4 for r in records)
    assert not {w.lower() for r in records for w in r["labels"]} & set(NAMES)
    # the file is a source too, and gives the same labels back
    again = tmp_path / "again.jsonl"
    code, stdout, err = run(capsys, "synthesize", "context-labels", "--store", copy, "--per-class", "2",
                            "--source", out, "--out", again, "--json")
    assert code == 0, err
    assert json.loads(stdout)["provider"].startswith("file:") and "made by clip:" in json.loads(stdout)["provider"]
    assert [json.loads(x) for x in again.read_text().splitlines()[1:]] == records


def test_file_errors_are_one_line(capsys, tmp_path, clip_store):
    _, store = clip_store
    with open_store(store) as st:
        ids = st.read("splits/train/ids")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"id": int(i), "labels": ["leaf"]}) + "\n" for i in ids)
                   + json.dumps({"id": 999999, "labels": ["x"]}) + "\n" + json.dumps({"id": -5, "labels": []}) + "\n")
    out = tmp_path / "out.jsonl"
    code, _, err = run(capsys, "synthesize", "context-labels", "--store", store, "--source", bad, "--out", out)
    assert code == 1 and one_line_error(err) and "2 id(s) not in split 'train'" in err and "999999" in err
    partial = tmp_path / "partial.jsonl"
    partial.write_text("".join(json.dumps({"id": int(i), "labels": ["leaf"]}) + "\n" for i in ids[:10]))
    code, _, err = run(capsys, "synthesize", "context-labels", "--store", store, "--source", partial, "--out", out)
    assert code == 1 and one_line_error(err) and f"{len(ids) - 10} of the {len(ids)} chosen images" in err
    garbled = tmp_path / "garbled.jsonl"
    garbled.write_text('{"id": 1, "labels": "leaf"}\n')
    code, _, err = run(capsys, "synthesize", "context-labels", "--store", store, "--source", garbled, "--out", out)
    assert code == 1 and one_line_error(err) and "line 1" in err
    code, _, err = run(capsys, "synthesize", "context-labels", "--store", store, "--source", "gpt", "--out", out)
    assert code == 2 and one_line_error(err) and "clip, llava" in err
    assert not out.exists()


def test_store_without_image_embeds_names_the_extract_command(capsys, tmp_path, clip_store):
    weights, _ = clip_store
    store = tmp_path / "penultimate_only.zarr"
    assert run(capsys, "-q", "extract", "--model", "clip-tiny", "--weights", weights, "--benchmark", "digits",
               "--layers", "penultimate", "--split", "train", "--store", store)[0] == 0
    code, _, err = run(capsys, "synthesize", "context-labels", "--store", store, "--out", tmp_path / "o.jsonl")
    assert code == 1 and one_line_error(err) and "oodcli extract --model clip-tiny --layers image_embeds" in err


def test_parse_labels():
    answer = "Bamboo, green leaves; 2. a tourist\n- railing and fence, the Five, bamboo."
    assert context.parse_labels(answer, "five") == ["bamboo", "green leaves", "a tourist", "railing and fence"]
    assert context.parse_labels("1) sky\n2) and grass.", "dog") == ["sky", "grass"]


# ---- LLaVA ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    """A random LLaVA (tiny CLIP vision tower, tiny Llama) and its processor, saved like a hub folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)

    words = ("USER: ASSISTANT: The main object of this image is a . List every other element you can see , not "
             "the itself as short labels bamboo leaf sky tree grass").split() + NAMES
    vocab = {w: i for i, w in enumerate(["<unk>", "<pad>", "<s>", "</s>", "<image>", *dict.fromkeys(words)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins tokens with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}),
        tokenizer=fast, patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1,
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       image_size=28, patch_size=14, projection_dim=16),
        text_config=LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                                pad_token_id=1, bos_token_id=2, eos_token_id=3),
        image_token_index=vocab["<image>"], vision_feature_layer=-1, vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("llava") / "tiny-llava"
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_llava_plumbing_prompts_name_the_class_and_ids_align(monkeypatch, clip_store, tiny_llava):
    from transformers import LlavaProcessor

    _, store = clip_store
    seen = []
    call = LlavaProcessor.__call__

    def spy(self, images=None, text=None, **kwargs):
        seen.append((list(text), [np.asarray(im) for im in images]))
        return call(self, images=images, text=text, **kwargs)

    monkeypatch.setattr(LlavaProcessor, "__call__", spy)
    with open_store(store) as st:
        batched = context.context_labels(st, source="llava", model=str(tiny_llava), per_class=1, seed=0, pick="random",
                                         batch_size=4, device="cpu")
        labels, ids = st.read("splits/train/labels"), st.read("splits/train/ids")
    rows = context.per_class_rows(labels, 1, 0)
    assert list(batched.labels) == ids[rows].tolist()
    prompts = [p for texts, _ in seen for p in texts]
    assert [len(t) for t, _ in seen] == [4, 2]
    for prompt, row in zip(prompts, rows):
        name = NAMES[labels[row]]
        assert f"main object of this image is a {name}." in prompt and f"not the {name} itself" in prompt
    from oodcli.data.base import data_root, open_source

    data = open_source("digits:train", data_root(None))
    images = [im for _, ims in seen for im in ims]
    assert all(np.array_equal(im, np.asarray(data.load(int(i)).convert("RGB"))) for im, i in zip(images, ids[rows]))
    assert all(isinstance(v, list) and all(isinstance(w, str) and w for w in v) for v in batched.labels.values())
    assert batched.provider.startswith(f"llava:{tiny_llava}")
    # one image at a time gives the same answers: left padding keeps every prompt's continuation its own
    with open_store(store) as st:
        single = context.context_labels(st, source="llava", model=str(tiny_llava), per_class=1, seed=0, pick="random",
                                        batch_size=1, device="cpu")
    assert single.labels == batched.labels


def test_llava_errors_are_one_line(capsys, monkeypatch, tmp_path, clip_store):
    _, store = clip_store
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "o.jsonl"
    code, _, err = run(capsys, "synthesize", "context-labels", "--store", store, "--source", "llava",
                       "--device", "cuda", "--out", out)
    assert code == 2 and one_line_error(err) and "no CUDA" in err
    code, _, err = run(capsys, "synthesize", "context-labels", "--store", store, "--source", "llava",
                       "--model", tmp_path / "no-such-model", "--device", "cpu", "--out", out)
    assert code == 1 and one_line_error(err) and "cannot load LLaVA" in err
    assert not out.exists()


def test_per_class_picks_the_most_complex_images_as_d_in_star(tmp_path, clip_store, small_vocabulary):
    """The default --pick complex: each class's most complex images by JPEG bytes per pixel,
    recomputed here from the digits' images, i.e. the images 'synthesize synood' inpaints."""
    import io

    from oodcli.data.base import data_root, open_source

    _, store = clip_store
    copy = _copy(store, tmp_path)
    with open_store(copy, "r+") as st:
        result = context.context_labels(st, top_k=3, per_class=2)
        ids, labels = st.read("splits/train/ids"), st.read("splits/train/labels")
    data = open_source("digits:train", data_root(None))
    bpp = []
    for i in ids:
        img = data.load(int(i))
        buf = io.BytesIO()
        img.convert("RGB").save(buf, "JPEG", quality=75)
        bpp.append(buf.tell() / (img.width * img.height))
    bpp = np.array(bpp)
    expected = sorted(int(ids[r]) for c in np.unique(labels)
                      for r in np.flatnonzero(labels == c)[np.argsort(-bpp[labels == c], kind="stable")[:2]])
    assert sorted(result.labels) == expected
