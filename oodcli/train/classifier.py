"""Train the small digits CNN that the demo uses as its backbone.

The ID train split is preprocessed once into a tensor (it is small), then trained
with Adam and random shifts of up to two pixels. The result is a safetensors file
that ``extract --model digits_cnn --weights PATH`` loads.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from oodcli.backbones.base import get_spec
from oodcli.backbones.digits_cnn import new_digits_cnn, save_digits_cnn
from oodcli.data.base import data_root
from oodcli.data.benchmarks import get_benchmark
from oodcli.train.images import random_shift, split_tensors
from oodcli.outputs import atomic_write, check_output_file
from oodcli.errors import UsageError

TRAINABLE = ("digits_cnn",)


@dataclass
class TrainResult:
    path: str
    epochs: int
    train_accuracy: float
    test_accuracy: float | None
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def _accuracy(model, images, labels, batch_size: int = 512) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        correct += int((model(images[i : i + batch_size]).argmax(1) == labels[i : i + batch_size]).sum())
    return correct / len(images)


def train_classifier(
    out: str | Path,
    benchmark: str = "digits",
    model: str = "digits_cnn",
    epochs: int = 30,
    batch_size: int = 64,
    lr: float = 2e-3,
    weight_decay: float = 5e-4,
    seed: int = 0,
    data_root_dir: str | None = None,
    log=None,
) -> TrainResult:
    check_output_file(Path(out))
    if model not in TRAINABLE:
        raise UsageError(f"'train classifier' trains {', '.join(TRAINABLE)}; got '{model}'")
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    bench = get_benchmark(benchmark)
    spec = get_spec(model)
    root = data_root(data_root_dir)
    transform = spec.preprocess.to_transform()
    x_train, y_train = split_tensors(bench, "train", transform, root)
    if (y_train < 0).any():
        raise UsageError(f"the train split of '{benchmark}' has unlabelled rows; it cannot train a classifier")
    num_classes = int(y_train.max()) + 1
    net = new_digits_cnn(num_classes=num_classes, seed=seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * ((len(x_train) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    for epoch in range(epochs):
        net.train()
        order = torch.randperm(len(x_train), generator=gen)
        total = 0.0
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            loss = F.cross_entropy(net(random_shift(x_train[idx], 2, gen)), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        if log:
            log(f"epoch {epoch + 1}/{epochs}  loss {total / len(order):.4f}")
    train_acc = _accuracy(net, x_train, y_train)
    test_acc = None
    if any(s.name == "test" for s in bench.splits):
        x_test, y_test = split_tensors(bench, "test", transform, root)
        test_acc = _accuracy(net, x_test, y_test)
    out = Path(out)
    atomic_write(out, lambda tmp: save_digits_cnn(net, tmp))  # never half a checkpoint at the target path
    return TrainResult(str(out), epochs, train_acc, test_acc, time.perf_counter() - t0)
