"""Train the tiny CLIP of the offline demo: contrastive image-caption learning on digits.

The model is ``clip-tiny``'s own open_clip configuration (the code path ViT-B-16 takes,
only smaller), trained from scratch on the benchmark's ID train images, each paired
with a caption built from its class name through a random prompt template. Captions of
the same class are positives for each other, so the symmetric contrastive loss uses soft
targets (uniform over the same-class pairs in the batch). The result is a safetensors
file that ``extract --model clip-tiny --weights PATH`` loads.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from oodcli.backbones.base import get_spec
from oodcli.data.base import data_root
from oodcli.data.benchmarks import get_benchmark
from oodcli.train.images import random_shift, split_tensors
from oodcli.errors import OodError, UsageError
from oodcli.outputs import atomic_write, check_output_file

TRAINABLE = ("clip-tiny",)
CAPTIONS = (
    "a photo of a {}.",
    "a photo of the number {}.",
    "the digit {}.",
    "a drawing of a {}.",
    "a blurry photo of a {}.",
    "a {}.",
)
EVAL_TEMPLATE = "a photo of a {}."  # the default prompt of the CLIP scorers


@dataclass
class ClipTrainResult:
    path: str
    epochs: int
    train_accuracy: float  # zero-shot accuracy with EVAL_TEMPLATE prompts
    test_accuracy: float | None
    logit_scale: float
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


def contrastive_loss(image: torch.Tensor, texts: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric CLIP loss where every same-class pair in the batch counts as a match."""
    logits = scale * image @ texts.T
    same = (labels[:, None] == labels[None, :]).float()
    targets = same / same.sum(dim=1, keepdim=True)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


@torch.no_grad()
def zero_shot_accuracy(model, tokenizer, images: torch.Tensor, labels: torch.Tensor, names: list[str]) -> float:
    model.eval()
    protos = model.encode_text(tokenizer([EVAL_TEMPLATE.format(n) for n in names]), normalize=True)
    correct = 0
    for i in range(0, len(images), 512):
        emb = model.encode_image(images[i : i + 512], normalize=True)
        correct += int(((emb @ protos.T).argmax(1) == labels[i : i + 512]).sum())
    return correct / len(images)


def train_clip(
    out: str | Path,
    benchmark: str = "digits",
    model: str = "clip-tiny",
    epochs: int = 40,
    batch_size: int = 64,
    lr: float = 2e-3,
    weight_decay: float = 0.1,
    seed: int = 0,
    data_root_dir: str | None = None,
    log=None,
) -> ClipTrainResult:
    check_output_file(Path(out))
    if model not in TRAINABLE:
        raise UsageError(f"'train clip' trains {', '.join(TRAINABLE)}; got '{model}'")
    t0 = time.perf_counter()
    bench = get_benchmark(benchmark)
    names = bench.resolve_prompt_names()
    if not names:
        raise UsageError(f"benchmark '{benchmark}' has no class names to build captions from")
    spec = get_spec(model)
    root = data_root(data_root_dir)
    transform = spec.preprocess.to_transform()
    x_train, y_train = split_tensors(bench, "train", transform, root)
    if (y_train < 0).any() or int(y_train.max()) >= len(names):
        raise OodError(f"the train split of '{benchmark}' has labels outside its {len(names)} classes")

    net = spec.build("random")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model's ops are too small to split; extra threads only spin
    try:
        _fit(net, x_train, y_train, names, epochs, batch_size, lr, weight_decay, seed, log)
    finally:
        torch.set_num_threads(threads)
    clip, tokenizer = net.model, net.tokenizer
    train_acc = zero_shot_accuracy(clip, tokenizer, x_train, y_train, names)
    test_acc = None
    if any(s.name == "test" for s in bench.splits):
        x_test, y_test = split_tensors(bench, "test", transform, root)
        test_acc = zero_shot_accuracy(clip, tokenizer, x_test, y_test, names)
    out = Path(out)
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in clip.state_dict().items()}
    meta = {"arch": model, "benchmark": benchmark, "classes": ",".join(names)}
    atomic_write(out, lambda tmp: save_file(state, str(tmp), metadata=meta))  # never half a checkpoint
    scale = float(clip.logit_scale.detach().exp())
    return ClipTrainResult(str(out), epochs, train_acc, test_acc, scale, time.perf_counter() - t0)


def _fit(net, x_train, y_train, names, epochs, batch_size, lr, weight_decay, seed, log) -> None:
    """The contrastive training loop, in place on ``net.model``."""
    clip, tokenizer = net.model, net.tokenizer
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    # every (template, class) caption tokenised once; a batch picks one per image
    captions = tokenizer([t.format(n) for t in CAPTIONS for n in names]).view(len(CAPTIONS), len(names), -1)
    opt = torch.optim.AdamW(clip.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * ((len(x_train) + batch_size - 1) // batch_size)
    # 10% warm-up, at least 2 steps: OneCycleLR divides by zero when its warm-up ends on step 0
    warm = max(2, round(0.1 * steps))
    sched = (torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=warm / steps)
             if steps > warm else torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0))
    for epoch in range(epochs):
        clip.train()
        order = torch.randperm(len(x_train), generator=gen)
        total = 0.0
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            labels = y_train[idx]
            which = torch.randint(0, len(CAPTIONS), (len(idx),), generator=gen)
            image = clip.encode_image(random_shift(x_train[idx], 2, gen), normalize=True)
            # the few distinct captions are encoded once per step, then handed to their images
            texts = clip.encode_text(captions.flatten(0, 1), normalize=True).view(*captions.shape[:2], -1)
            texts = texts[which, labels]
            loss = contrastive_loss(image, texts, labels, clip.logit_scale.exp())
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                clip.logit_scale.clamp_(0, np.log(100))  # CLIP's cap on the similarity scale
            total += loss.item() * len(idx)
        if log:
            log(f"epoch {epoch + 1}/{epochs}  loss {total / len(order):.4f}")
