"""SynOOD image synthesis on a tiny random-initialised inpainting pipeline (the same diffusers
classes as SD2-inpainting) and tiny classifiers: the loop, the skip gradient, the run folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import one_line_error, run
from oodcli.backbones.spec import Preprocess
from oodcli.synth import synood
from oodcli.synth.synood import EnergyLoss, Inpainter, Settings, preprocess_tensor, skip_gradient, synthesize_one

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe():
    from oodcli.synth.tiny_diffusion import build_tiny_pipeline

    p = build_tiny_pipeline(seed=0)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def pipe_dir(pipe, tmp_path_factory):
    path = tmp_path_factory.mktemp("pipe") / "tiny_inpaint"
    pipe.save_pretrained(str(path), safe_serialization=True)
    return path


class Probe(torch.nn.Module):
    """A tiny classifier with sizeable input gradients: 6 logits from a fixed random conv."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 6)
        with torch.no_grad():
            self.fc.weight.mul_(20)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).mean(dim=(2, 3)))

    def forward_layers(self, x, layers):
        return {"logits": self(x)}


PROBE_PRE = Preprocess(resize=32, crop=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def _image(seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8))


@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_refinement_off_equals_the_plain_pipeline_call(pipe, strength):
    img = _image()
    ref = pipe("bamboo, leaf, railing", image=img, mask_image=Image.new("L", (32, 32), 255), strength=strength,
               num_inference_steps=20, generator=torch.Generator().manual_seed(7), output_type="pt").images
    ours = synthesize_one(Inpainter(pipe, strength, 20, 7.5), None, img, "bamboo, leaf, railing", 7, iterations=1)
    ours_pt = torch.from_numpy(np.asarray(ours.image, dtype=np.float32) / 255).permute(2, 0, 1)
    ref_u8 = (ref[0] * 255).round() / 255  # the PIL image is the pipeline's output rounded to 8 bits
    assert torch.allclose(ours_pt, ref_u8, atol=1e-6)
    # and before rounding: the latent loop itself is the pipeline's
    inp = Inpainter(pipe, strength, 20, 7.5)
    prep = inp.prepare(img, "bamboo, leaf, railing", 7)
    x = (inp.decode(inp.denoise(prep, prep.eps)) / 2 + 0.5).clamp(0, 1)
    assert torch.allclose(x, ref, atol=1e-6)


def test_preprocess_tensor_equals_the_backbone_transform():
    pre = Preprocess(resize=40, crop=36, mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.25))
    img = Image.fromarray(np.random.default_rng(3).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    ref = pre.to_transform()(img)
    x01 = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    ours = preprocess_tensor(x01, pre)[0]
    assert ours.shape == ref.shape
    assert (ours - ref).abs().mean() < 0.02  # PIL's and torch's antialiased resize differ by rounding only


def test_skip_gradient_is_the_autograd_gradient_in_the_decoders_latent_scale(pipe):
    probe = Probe().eval().requires_grad_(False)
    m_out, tau, step = -3.0, 2.0, 0.5
    energy = EnergyLoss(probe, PROBE_PRE, m_out=m_out, tau=tau, loss="energy-hinge")
    inp = Inpainter(pipe, 0.6, 10, 7.5)
    img = _image(1)
    prep = inp.prepare(img, "leaf", 11)
    z0 = inp.denoise(prep, prep.eps)
    # reference, written out independently: L = max(0, m_out - E)^2, E = -tau * log sum exp(g(x)/tau),
    # x = h(u), differentiated w.r.t. u = z0 / scaling_factor (the authors' latent scale)
    u = (z0 / pipe.vae.config.scaling_factor).clone().requires_grad_(True)
    x = pipe.vae.decode(u).sample
    x01 = (x / 2 + 0.5).clamp(0, 1)
    logits = probe((x01 - 0.5) / 0.5)
    e = -tau * torch.log(torch.exp(logits / tau).sum(dim=1))
    loss = torch.clamp(m_out - e, min=0) ** 2
    (ref,) = torch.autograd.grad(loss.sum(), u)
    grad, l0, e0 = skip_gradient(inp, energy, z0)
    assert ref.abs().max() > 1e-4  # a real gradient, not zeros
    assert torch.allclose(grad, ref, rtol=1e-4, atol=1e-7)
    assert torch.allclose(l0, loss.detach(), atol=1e-5) and torch.allclose(e0, e.detach(), atol=1e-5)
    # the update between two passes is epsilon - step * dL/du (eq. 10 with r*rho = step):
    # scaling_factor times dL/dz0, not dL/dz0 itself
    out = synthesize_one(inp, energy, img, "leaf", 11, iterations=2, step_size=step)
    assert torch.allclose((prep.eps - out.eps) / step, ref, rtol=1e-4, atol=1e-6)
    z = z0.clone().requires_grad_(True)
    (dz,) = torch.autograd.grad(energy(inp.decode(z)).sum(), z)
    assert torch.allclose(dz * pipe.vae.config.scaling_factor, ref, rtol=1e-3, atol=1e-6)
    assert out.losses[0] == pytest.approx(float(loss.detach()[0]), abs=1e-5)


def test_iterations_are_inpainting_passes_in_total(pipe, monkeypatch):
    probe = Probe().eval().requires_grad_(False)
    inp = Inpainter(pipe, 0.6, 4, 7.5)
    calls = []
    real = inp.denoise
    monkeypatch.setattr(inp, "denoise", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = synthesize_one(inp, EnergyLoss(probe, PROBE_PRE), _image(0), "leaf", 0, iterations=3, step_size=0.5)
    assert len(calls) == 3 and len(out.losses) == len(out.energies) == 3  # 3 passes, 2 updates between them


def _authors_loss(logits, m_out=-5.0):
    return (m_out - (logits.mean(dim=1) - torch.logsumexp(logits, dim=1))) ** 2


def test_authors_loss_is_their_formula_and_its_default_margin():
    logits = torch.tensor([[9.0, 0.0, -1.0, 2.0, 0.5, 0.0]])
    loss = EnergyLoss(Probe(), PROBE_PRE)  # the default
    assert loss.loss == "authors" and loss.m_out == -5.0
    assert torch.allclose(loss.from_logits(logits), _authors_loss(logits))
    assert EnergyLoss(Probe(), PROBE_PRE, loss="energy-hinge").m_out == -7.0
    assert Settings().check().m_out == -5.0 and Settings(loss="energy-hinge").check().m_out == -7.0
    assert Settings().guidance == 8.0 and Settings().prompt(["leaf", "sky"]) == "A photo only remain leaf, sky."
    with pytest.raises(Exception, match="--loss"):
        Settings(loss="linear").check()


@pytest.mark.parametrize("loss", ["authors", "energy-hinge"])
def test_one_refinement_step_raises_the_energy_of_a_confident_image(pipe, loss):
    """Towards OOD: the energy E = -logsumexp(g) of a confident image goes up after one update,
    and with the authors' loss s = mean g - logsumexp g (-CE to the uniform softmax) too (the
    earlier linear loss m_out - logsumexp(g) lowered E); m_out changes the result."""
    probe = Probe().eval().requires_grad_(False)
    with torch.no_grad():  # confident: E about -20, s about -16
        probe.fc.weight.mul_(4)
        probe.fc.bias.mul_(4)
    inp = Inpainter(pipe, 0.6, 10, 7.5)
    for seed in range(3):
        out = synthesize_one(inp, EnergyLoss(probe, PROBE_PRE, loss=loss), _image(seed), "leaf", seed,
                             iterations=2, step_size=10.0)
        assert out.energies[1] > out.energies[0] + 0.5 and out.losses[1] < out.losses[0]
        if loss == "authors":
            logits = [probe((torch.from_numpy(np.asarray(im, np.float32) / 255).permute(2, 0, 1)[None] - 0.5) / 0.5)
                      for im in (synthesize_one(inp, None, _image(seed), "leaf", seed, 1).image, out.image)]
            s = [float(z.mean() - torch.logsumexp(z, 1)) for z in logits]
            assert s[1] > s[0]
    # m_out matters: a threshold the image is already past stops (hinge) or reverses (authors) the push
    a = synthesize_one(inp, EnergyLoss(probe, PROBE_PRE, loss=loss), _image(0), "leaf", 0, 2, 10.0)
    b = synthesize_one(inp, EnergyLoss(probe, PROBE_PRE, loss=loss, m_out=-40.0), _image(0), "leaf", 0, 2, 10.0)
    assert b.energies[1] < a.energies[1]
    if loss == "energy-hinge":
        assert b.losses[0] == 0 and torch.equal(b.eps, inp.prepare(_image(0), "leaf", 0).eps)


# ---- the run folder ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_store(tmp_path_factory):
    from oodcli.data.base import open_source
    from oodcli.extraction import prepare_split
    from oodcli.store import open_store

    path = tmp_path_factory.mktemp("store") / "d.zarr"
    with open_store(path, "a") as st:
        prepare_split(st, "train", "id", "digits:train", open_source("digits:train", path.parent))
        ids = st.read("splits/train/ids")
        labels = st.read("splits/train/labels")
    return path, ids, labels


def _labels_file(path, ids, extra=()):
    lines = [json.dumps({"provider": "clip-zero-shot"})]
    lines += [json.dumps({"id": int(i), "labels": ["leaf", f"thing{int(i) % 3}"]}) for i in ids]
    lines += [json.dumps({"id": int(i), "labels": ["x"]}) for i in extra]
    path.write_text("\n".join(lines) + "\n")
    return path


FAST = Settings(per_class=1, strength=0.5, steps=4, iterations=2, step_size=10.0)


def test_resume_skips_finished_images(digits_store, pipe_dir, tmp_path, monkeypatch):
    store, ids, labels = digits_store
    ctx = _labels_file(tmp_path / "ctx.jsonl", ids)
    calls = []
    real = synood.synthesize_one

    def counted(*args, **kwargs):
        if len(calls) == 2 and not getattr(counted, "resumed", False):
            raise KeyboardInterrupt
        calls.append(args[3])
        return real(*args, **kwargs)

    monkeypatch.setattr(synood, "synthesize_one", counted)
    kw = dict(store=store, settings=FAST, pipeline=str(pipe_dir), classifier="digits_cnn-tiny", context_labels=ctx,
              device="cpu")
    out = tmp_path / "syn"
    with pytest.raises(KeyboardInterrupt):
        synood.synthesize_synood(out, **kw)
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 2
    counted.resumed = True
    summary = synood.synthesize_synood(out, **kw)
    n_classes = len(np.unique(labels))
    assert summary["images"] == n_classes and summary["skipped"] == 2 and summary["written"] == n_classes - 2
    assert len(calls) == n_classes  # each image generated once over both runs
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted(r["file"] for r in rows) == sorted(p.name for p in out.glob("*.png"))
    assert len({r["source_class"] for r in rows}) == n_classes
    assert all(r["prompt"] == f"A photo only remain {', '.join(r['context_labels'])}." and r["source_id"] in set(ids.tolist()) for r in rows)
    assert all(len(r["energy_losses"]) == len(r["energies"]) == 2 for r in rows)
    record = json.loads((out / synood.RUN_FILE).read_text())
    assert record["context_labels"]["made_by"] == {"provider": "clip-zero-shot"}
    assert record["settings"]["iterations"] == 2 and record["settings"]["m_out"] == -5.0 and record["pipeline"].startswith("dir:tiny_inpaint")
    # a third run does nothing
    again = synood.synthesize_synood(out, **kw)
    assert again["written"] == 0 and len(calls) == n_classes


def _cli(store, out, pipe_dir, ctx, *more):
    return ("synthesize", "synood", "--store", store, "--out-dir", out, "--pipeline", pipe_dir, "--classifier",
            "digits_cnn-tiny", "--context-labels", ctx, "--per-class", 1, "--strength", 0.5, "--steps", 2,
            "--iterations", 1, "--device", "cpu", *more)


def test_cli_writes_images_and_refuses_another_runs_folder(digits_store, pipe_dir, tmp_path, capsys):
    store, ids, labels = digits_store
    ctx = _labels_file(tmp_path / "ctx.jsonl", ids)
    out = tmp_path / "syn"
    code, stdout, stderr = run(capsys, *_cli(store, out, pipe_dir, ctx))
    assert code == 0, stderr
    files = sorted(out.glob("*.png"))
    assert files and "images written" in stdout
    # the sources are exactly D_in*: train synood's complexity rule for m = the number of images
    from oodcli.store import open_store
    from oodcli.train.synood import _train_complexity, complex_rows

    rows = sorted(json.loads(line)["source_row"] for line in (out / "manifest.jsonl").read_text().splitlines())
    with open_store(store) as st:
        complexity = _train_complexity(st, "train", np.arange(len(labels)), None, None)
    assert len(rows) == len(np.unique(labels)) and rows == complex_rows(complexity, labels, len(rows)).tolist()
    # context labels that miss one of those images: one line naming it
    partial = _labels_file(tmp_path / "partial.jsonl", [i for i in ids if int(i) != int(ids[rows[0]])])
    code, _, stderr = run(capsys, *_cli(store, tmp_path / "syn2", pipe_dir, partial))
    assert code == 2 and one_line_error(stderr) and f"id {int(ids[rows[0]])}" in stderr
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code, _, stderr = run(capsys, *_cli(store, out, pipe_dir, ctx, "--seed", 1))
    assert code == 2 and one_line_error(stderr) and "another run" in stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing overwritten
    # a folder of unrelated images is refused too
    other = tmp_path / "other"
    other.mkdir()
    _image().save(other / "cat.png")
    code, _, stderr = run(capsys, *_cli(store, other, pipe_dir, ctx))
    assert code == 2 and one_line_error(stderr)


def test_a_run_that_made_no_image_does_not_lock_its_folder(digits_store, pipe_dir, tmp_path, capsys):
    """A pipeline that cannot be loaded fails in one line; the folder it leaves holds no image,
    so the next run, with another pipeline, starts there instead of being refused."""
    store, ids, _ = digits_store
    ctx = _labels_file(tmp_path / "ctx.jsonl", ids)
    out = tmp_path / "syn"
    code, _, stderr = run(capsys, *_cli(store, out, tmp_path / "no-such-pipeline", ctx))
    assert code != 0 and one_line_error(stderr) and "pipeline" in stderr
    assert not any(p.suffix == ".png" for p in out.glob("*"))
    code, stdout, stderr = run(capsys, *_cli(store, out, pipe_dir, ctx))
    assert code == 0, stderr
    assert sorted(out.glob("*.png")) and json.loads((out / synood.RUN_FILE).read_text())["pipeline"].startswith("dir:")


def test_unknown_context_label_ids_are_refused(digits_store, pipe_dir, tmp_path, capsys):
    store, ids, _ = digits_store
    ctx = _labels_file(tmp_path / "ctx.jsonl", ids[:4], extra=[10_000_000])
    code, _, stderr = run(capsys, *_cli(store, tmp_path / "syn", pipe_dir, ctx))
    assert code == 2 and one_line_error(stderr) and "10000000" in stderr
    assert not (tmp_path / "syn").exists()


def test_cuda_on_a_machine_without_cuda_is_refused(digits_store, pipe_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    store, ids, _ = digits_store
    ctx = _labels_file(tmp_path / "ctx.jsonl", ids[:4])
    code, _, stderr = run(capsys, *_cli(store, tmp_path / "syn", pipe_dir, ctx)[:-2], "--device", "cuda")
    assert code == 2 and one_line_error(stderr) and "cuda" in stderr.lower()


def test_train_diffusion_writes_a_loadable_pipeline(tmp_path, capsys):
    from oodcli.synth.tiny_diffusion import load_pipeline

    out = tmp_path / "inpaint"
    code, stdout, stderr = run(capsys, "-q", "train", "diffusion", "--out", out, "--steps", 2, "--seconds", 0,
                               "--batch-size", 4, "--no-preview")
    assert code == 0, stderr
    assert (out / "model_index.json").is_file() and list(out.rglob("*.safetensors"))
    assert not list(out.rglob("*.bin"))
    loaded = load_pipeline(out)
    assert loaded.unet.config.in_channels == 9
    img = loaded("a photo of the digit two", image=_image(), mask_image=Image.new("L", (32, 32), 255), strength=0.6,
                 num_inference_steps=4, generator=torch.Generator().manual_seed(0)).images[0]
    assert img.size == (32, 32)


def test_neg_image_mode_is_text_to_image_from_word_prompts(pipe_dir, tmp_path):
    words = tmp_path / "words.txt"
    words.write_text("# negative words\nvolcano\nteapot\n")
    out = tmp_path / "neg"
    summary = synood.synthesize_synood(out, settings=Settings(mode="neg-image", per_class=2, steps=3), pipeline=str(pipe_dir),
                                       classifier="digits_cnn-tiny", prompt_words=words, device="cpu")
    assert summary["images"] == summary["written"] == 4
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted(r["prompt"] for r in rows) == ["teapot", "teapot", "volcano", "volcano"]
    assert all(r["source_id"] is None and len(r["energy_losses"]) == 1 for r in rows)
    record = json.loads((out / synood.RUN_FILE).read_text())["settings"]
    assert record["strength"] == 1.0 and record["iterations"] == 1
