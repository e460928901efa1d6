"""APM (APEX) and PALM: a mixture of prototypes per class on the unit hypersphere.

The model (APEX sec. 3.1, 3.3; PALM, Lu et al. ICLR 2024) is an encoder, an MLP
projection head onto the 128-d unit sphere, and K_c prototypes per class c. APM takes
K_c* from ``oodcli select-k`` (GMM + BIC on DINOv2 features); PALM uses the same K for
every class. Each step:

1. soft-assigns the batch's samples to their own class's prototypes by Sinkhorn-Knopp
   entropic optimal transport, eq. (14), with ``epsilon`` and a fixed iteration count;
2. moves the prototypes by EMA towards the weighted batch sums and re-normalises them,
   eq. (15). Prototypes are buffers, never gradient-trained: the update keeps the graph
   to this batch's embeddings, so L_PC reaches the encoder through the batch term;
3. minimises L_MLE + lambda * L_PC: the negative log of the vMF-mixture class posterior,
   eq. (3)-(4), with temperature ``tau``, and the prototype contrastive loss, eq. (5),
   with ``tau_p``;
4. tracks each prototype's quality Q = Q_C + Q_S, eq. (7)-(9).

Readings of what the paper leaves open, chosen here:

- eq. (3) needs weights w for every class, but Sinkhorn assigns a sample only among its
  own class's prototypes. For the other classes we use their mixture prior 1/K_c (the
  Sinkhorn prototype marginal), so every class-conditional density is a proper mixture
  and the posterior sums to one over classes.
- eq. (5) has no intra-class term D for a class with K_c = 1 (which APM produces); such a
  prototype keeps only the inter-class push (D := 1).
- eq. (15)'s beta_p is the weight of the batch term; PALM's published momentum 0.999 is
  the weight kept on the old prototype, so beta_p = 1 - ``proto_momentum``.
- Q_C (eq. 7) averages cos(p, z) over the samples whose largest Sinkhorn weight is p,
  smoothed by the same EMA as the prototypes (bias-corrected per prototype, as Adam does,
  so short runs are not dominated by the initial zero); a prototype that never got a
  sample has Q_C = 0. Q_S (eq. 8) is computed from the final prototypes.

Defaults: 128-d sphere, 500 epochs, SGD with momentum are stated in APEX sec. 4.1,
which says it otherwise shares the baselines' hyperparameters; K = 6 is PALM's K in
APEX's Table 1. The rest are PALM's published defaults: tau = tau_p = 0.1,
lambda = 1, Sinkhorn epsilon 0.05 with 3 iterations, EMA momentum 0.999, SGD momentum
0.9, lr 0.5 with cosine decay (to lr/1000), batch 512, weight decay 1e-6. Augmentation
for end-to-end runs is one view per image: random crop (1/8 padding) and, optionally,
horizontal flip.

Two modes share the loop: head-only on cached backbone features from a store (fast;
the encoder is frozen and lives in the store), or end to end from images (the paper's
setting; a GPU job). The result is one safetensors file that ``oodcli extract --model
apex|palm --weights FILE`` runs as a backbone (``oodcli.backbones.apex``).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from oodcli.collisions import THRESHOLD, find_collisions, separation
from oodcli.errors import OodError, UsageError
from oodcli.outputs import atomic_write, check_output_file

METHODS = ("apex", "palm")
from oodcli.backbones.registry import APEX_FORMAT as FORMAT  # noqa: E402  (one home: the registry reads it)
PALM_K = 6


@dataclass
class ApexConfig:
    """Training hyperparameters; see the module docstring for where each default comes from."""

    embed_dim: int = 128
    tau: float = 0.1
    tau_p: float = 0.1
    lambda_pc: float = 1.0
    epsilon: float = 0.05
    sinkhorn_iters: int = 3
    proto_momentum: float = 0.999
    epochs: int = 500
    batch_size: int = 512
    lr: float = 0.5
    momentum: float = 0.9
    weight_decay: float = 1e-6
    seed: int = 0

    def check(self) -> None:
        positive = {"embed_dim": self.embed_dim, "tau": self.tau, "tau_p": self.tau_p, "epsilon": self.epsilon,
                    "sinkhorn_iters": self.sinkhorn_iters, "epochs": self.epochs, "batch_size": self.batch_size,
                    "lr": self.lr}
        bad = [k for k, v in positive.items() if not v > 0]
        if bad:
            raise UsageError(f"{', '.join(bad)} must be > 0")
        if not 0.0 <= self.proto_momentum < 1.0 or not 0.0 <= self.momentum < 1.0:
            raise UsageError("--proto-momentum and --momentum must be in [0, 1)")
        if self.lambda_pc < 0 or self.weight_decay < 0:
            raise UsageError("--lambda-pc and --weight-decay must be >= 0")


# ---- the pieces, as plain functions of tensors ---------------------------------------------


def sinkhorn(
    scores: torch.Tensor,
    epsilon: float = 0.05,
    iters: int = 3,
    sample_class: torch.Tensor | None = None,
    proto_class: torch.Tensor | None = None,
) -> torch.Tensor:
    """Soft assignments [n, M] of samples to prototypes by entropic OT, eq. (14).

    W = diag(u) exp(scores / epsilon) diag(v), scaled in log space so that each class's
    prototypes share its samples equally and each sample's weights sum to one (applied
    last, so it holds exactly; the prototype marginal holds once converged). With class
    labels for rows and columns, each sample may only go to its own class's prototypes:
    every class is its own transport problem, all solved at once.
    """
    n, m = scores.shape
    if sample_class is None or proto_class is None:
        sample_class = torch.zeros(n, dtype=torch.long, device=scores.device)
        proto_class = torch.zeros(m, dtype=torch.long, device=scores.device)
    classes = int(max(sample_class.max(), proto_class.max())) + 1
    n_c = torch.bincount(sample_class, minlength=classes).to(scores.dtype)
    k_c = torch.bincount(proto_class, minlength=classes).to(scores.dtype)
    allowed = sample_class[:, None] == proto_class[None, :]
    log_q = torch.where(allowed, scores / epsilon, torch.full_like(scores, -math.inf))
    log_k = torch.log(k_c[proto_class])  # column target: 1/K_c of its class's mass
    log_n = torch.log(n_c[sample_class])  # row target: 1/n_c
    present = n_c[proto_class] > 0  # prototypes whose class has no sample in this batch stay empty
    for _ in range(iters):
        col = torch.logsumexp(log_q, dim=0)
        log_q = log_q - torch.where(present, col + log_k, torch.zeros_like(col))
        log_q = log_q - (torch.logsumexp(log_q, dim=1) + log_n)[:, None]
    return torch.exp(log_q + log_n[:, None])


def log_posterior(
    z: torch.Tensor, prototypes: torch.Tensor, proto_class: torch.Tensor, weights: torch.Tensor,
    tau: float, num_classes: int,
) -> torch.Tensor:
    """log P(c | z) [n, C], eq. (3): sum_j w_j^c exp(p_j^c . z / tau), normalised over the classes."""
    a = torch.log(weights.clamp_min(1e-30)) + z @ prototypes.T / tau
    top = a.max(dim=1, keepdim=True).values.detach()
    per_class = torch.zeros(len(z), num_classes, dtype=a.dtype, device=a.device)
    per_class = per_class.index_add(1, proto_class, torch.exp(a - top))
    log_mix = torch.log(per_class) + top
    return log_mix - torch.logsumexp(log_mix, dim=1, keepdim=True)


def prior_weights(proto_class: torch.Tensor, n: int) -> torch.Tensor:
    """Each class's mixture prior 1/K_c for every sample, [n, M]."""
    k = torch.bincount(proto_class).to(torch.float32)[proto_class]
    return (1.0 / k).expand(n, -1)


def assignment_weights(
    z: torch.Tensor, labels: torch.Tensor, prototypes: torch.Tensor, proto_class: torch.Tensor,
    epsilon: float, iters: int,
) -> torch.Tensor:
    """w for eq. (3): Sinkhorn weights on the sample's own class, the prior 1/K_c on the others."""
    own = labels[:, None] == proto_class[None, :]
    w = sinkhorn(z @ prototypes.T, epsilon, iters, labels, proto_class)
    return torch.where(own, w, prior_weights(proto_class, len(z)).to(w.dtype))


def ema_prototypes(
    prototypes: torch.Tensor, proto_class: torch.Tensor, z: torch.Tensor, labels: torch.Tensor,
    weights: torch.Tensor, beta: float,
) -> torch.Tensor:
    """Eq. (15): Normalize((1 - beta) p + beta * sum_i w_ik z_i) over the class's batch samples."""
    own = (labels[:, None] == proto_class[None, :]).to(z.dtype)
    return F.normalize((1.0 - beta) * prototypes + beta * (weights * own).T @ z, dim=1)


def proto_contrastive_loss(prototypes: torch.Tensor, proto_class: torch.Tensor, tau_p: float) -> torch.Tensor:
    """Eq. (5): -mean_j log(D_j / Z_j); a prototype with no sibling in its class has D := 1."""
    sim = prototypes @ prototypes.T / tau_p
    same = proto_class[:, None] == proto_class[None, :]
    siblings = same & ~torch.eye(len(prototypes), dtype=torch.bool, device=sim.device)
    log_z = torch.logsumexp(sim.masked_fill(same, -math.inf), dim=1)
    has = siblings.any(dim=1)
    log_d = torch.logsumexp(sim[has].masked_fill(~siblings[has], -math.inf), dim=1)
    return (log_z.sum() - log_d.sum()) / len(prototypes)


# ---- the model ------------------------------------------------------------------------------


class ProjectionHead(nn.Module):
    """PALM/CIDER's MLP head, Linear - ReLU - Linear, onto the unit sphere (hidden width = input width)."""

    def __init__(self, in_dim: int, embed_dim: int = 128, hidden: int | None = None):
        super().__init__()
        hidden = hidden or in_dim
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, embed_dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(h), dim=1)


class PrototypeMixture(nn.Module):
    """K_c unit prototypes per class (buffers, moved only by EMA) and their tracked cohesion."""

    def __init__(self, k_per_class: list[int], dim: int, momentum: float = 0.999, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        classes = torch.repeat_interleave(torch.arange(len(k_per_class)), torch.as_tensor(k_per_class))
        self.momentum = momentum
        self.num_classes = len(k_per_class)
        self.register_buffer("vectors", F.normalize(torch.randn(len(classes), dim, generator=gen), dim=1))
        self.register_buffer("classes", classes)
        self.register_buffer("q_c_ema", torch.zeros(len(classes)))
        self.register_buffer("q_c_updates", torch.zeros(len(classes)))

    def step(self, z: torch.Tensor, labels: torch.Tensor, cfg: ApexConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One batch: assign, move the prototypes, return (loss, L_MLE, L_PC)."""
        with torch.no_grad():
            w = assignment_weights(z, labels, self.vectors, self.classes, cfg.epsilon, cfg.sinkhorn_iters)
        moved = ema_prototypes(self.vectors, self.classes, z, labels, w, 1.0 - self.momentum)
        pc = proto_contrastive_loss(moved, self.classes, cfg.tau_p)
        log_p = log_posterior(z, moved.detach(), self.classes, w, cfg.tau, self.num_classes)
        mle = -log_p.gather(1, labels[:, None]).mean()
        with torch.no_grad():
            self.vectors.copy_(moved.detach())
            self._track_cohesion(z.detach(), labels, w)
        return mle + cfg.lambda_pc * pc, mle, pc

    def _track_cohesion(self, z, labels, w) -> None:
        """Eq. (7) on this batch, folded into a per-prototype EMA."""
        own = labels[:, None] == self.classes[None, :]
        hard = torch.where(own, w, torch.full_like(w, -1.0)).argmax(dim=1)
        cos = (z * self.vectors[hard]).sum(dim=1)
        sums = torch.zeros_like(self.q_c_ema).index_add(0, hard, cos)
        counts = torch.bincount(hard, minlength=len(self.classes)).to(sums.dtype)
        hit = counts > 0
        m = self.momentum
        self.q_c_ema[hit] = m * self.q_c_ema[hit] + (1 - m) * sums[hit] / counts[hit]
        self.q_c_updates[hit] += 1

    def q_c(self) -> np.ndarray:
        """Bias-corrected EMA of the cohesion; 0 for a prototype that never got a sample."""
        ema, t = self.q_c_ema.cpu().double().numpy(), self.q_c_updates.cpu().double().numpy()
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(t > 0, ema / (1.0 - self.momentum ** t), 0.0)

    def q_s(self) -> np.ndarray:
        return separation(self.vectors.cpu().numpy(), self.classes.cpu().numpy())

    @torch.no_grad()
    def predict(self, z: torch.Tensor, tau: float) -> torch.Tensor:
        """The most probable class under eq. (3) with each class's prior weights (no labels needed)."""
        w = prior_weights(self.classes, len(z)).to(z.device)
        return log_posterior(z, self.vectors, self.classes, w, tau, self.num_classes).argmax(dim=1)


# ---- the loop shared by both modes -----------------------------------------------------------


def fit(
    embed: Callable[[object], tuple[torch.Tensor, torch.Tensor]],
    batches: Callable[[int], Iterable],
    steps_per_epoch: int,
    params: list[nn.Parameter],
    protos: PrototypeMixture,
    cfg: ApexConfig,
    train_modules: list[nn.Module],
    log: Callable[[str], None] | None = None,
) -> list[dict]:
    """SGD with momentum and a per-step cosine schedule; returns one record per epoch."""
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * steps_per_epoch, eta_min=cfg.lr / 1000)
    history = []
    for epoch in range(cfg.epochs):
        for module in train_modules:
            module.train()
        totals = np.zeros(3)
        seen = correct = 0
        for batch in batches(epoch):
            z, y = embed(batch)
            loss, mle, pc = protos.step(z, y, cfg)
            if not torch.isfinite(loss):
                raise OodError(f"the loss became {loss.item()} at epoch {epoch + 1}; lower --lr or raise --tau")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            totals += np.array([loss.item(), mle.item(), pc.item()]) * len(y)
            seen += len(y)
            correct += int((protos.predict(z.detach(), cfg.tau) == y).sum())
        loss, mle, pc = totals / max(seen, 1)
        q_s = protos.q_s()
        history.append({"epoch": epoch + 1, "loss": loss, "mle": mle, "pc": pc, "accuracy": correct / max(seen, 1),
                        "min_q_s": float(q_s.min()), "mean_q_c": float(protos.q_c().mean())})
        if log and ((epoch + 1) % max(1, cfg.epochs // 20) == 0 or epoch == 0):  # about 20 lines a run
            log(f"epoch {epoch + 1}/{cfg.epochs}  loss {loss:.4f} (mle {mle:.4f}, pc {pc:.4f})  "
                f"acc {100 * correct / max(seen, 1):.1f}%  min Q_S {q_s.min():.3f}")
    return history


@dataclass
class TrainResult:
    path: str
    method: str
    mode: str
    epochs: int
    seconds: float
    prototypes: int
    k_per_class: list[int]
    first_loss: float
    final_loss: float
    train_accuracy: float
    min_q_s: float
    colliding_prototypes: int
    history: list[dict] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict:
        out = asdict(self)
        out.pop("history")
        return out


def resolve_k(method: str, num_classes: int, k: int | None, select_k: dict[int, int] | None) -> list[int]:
    """K per class: PALM's fixed K for every class, or APM's K_c* from select-k."""
    if method not in METHODS:
        raise UsageError(f"unknown method '{method}'; use apex or palm")
    if method == "palm":
        k = PALM_K if k is None else k
        if k < 1:
            raise UsageError("--k must be >= 1")
        return [k] * num_classes
    if k is not None:
        raise UsageError("'train apex' takes K per class from select-k; use 'train palm --k N' for a fixed K")
    if select_k is None:
        raise UsageError("'train apex' needs select-k results: pass --k-from STORE (run 'oodcli select-k' first)")
    missing = [c for c in range(num_classes) if c not in select_k]
    if missing or len(select_k) != num_classes:
        raise OodError(
            f"select-k results cover classes {sorted(select_k)[:5]}... ({len(select_k)}), but the training data has "
            f"{num_classes} classes; run select-k on the same benchmark's train split"
        )
    return [select_k[c] for c in range(num_classes)]


def _device(device: str) -> torch.device:
    from oodcli.extraction import resolve_device

    return resolve_device(device)


def _finish(
    out: Path, method: str, mode: str, cfg: ApexConfig, head: ProjectionHead, protos: PrototypeMixture,
    history: list[dict], meta: dict, t0: float, encoder: nn.Module | None = None,
) -> TrainResult:
    q_s = protos.q_s()
    collisions = find_collisions(protos.vectors.cpu().numpy(), protos.classes.cpu().numpy(), THRESHOLD)
    meta = {**meta, "method": method, "mode": mode, "embed_dim": cfg.embed_dim,
            "config": asdict(cfg), "history": history}
    save_model(out, head, protos, meta, encoder)
    k = torch.bincount(protos.classes).tolist()
    return TrainResult(
        path=str(out), method=method, mode=mode, epochs=cfg.epochs, seconds=time.perf_counter() - t0,
        prototypes=len(protos.classes), k_per_class=k, first_loss=history[0]["loss"], final_loss=history[-1]["loss"],
        train_accuracy=history[-1]["accuracy"], min_q_s=float(q_s.min()),
        colliding_prototypes=collisions["colliding_prototypes"], history=history,
    )


def train_head_only(
    store,
    backbone: str,
    method: str = "apex",
    layer: str | None = None,
    split: str = "train",
    k: int | None = None,
    select_k: dict[int, int] | None = None,
    cfg: ApexConfig | None = None,
    out: str | Path = "stores/apex.safetensors",
    device: str = "auto",
    log=None,
) -> TrainResult:
    """Train the head and prototypes on a store's cached features of a frozen backbone."""
    check_output_file(Path(out))
    from oodcli.select_k import default_layer, read_features
    from oodcli.store import features_node

    cfg = cfg or ApexConfig()
    cfg.check()
    t0 = time.perf_counter()
    layer = layer or default_layer(store, backbone, split)
    x, y = read_features(store, backbone, layer, split)
    if x.ndim != 2:
        raise UsageError(f"layer '{layer}' is not one vector per image; pick a pooled layer")
    num_classes = int(y.max()) + 1
    if len(np.unique(y)) < 2:
        raise OodError(f"split '{split}' has one class; prototype training needs at least two")
    k_per_class = resolve_k(method, num_classes, k, select_k)
    attrs = store.node_attrs(features_node(split, backbone))
    parts = attrs.get("parts", {})
    dev = _device(device)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    xs, ys = torch.from_numpy(x).float(), torch.from_numpy(y).long()
    head = ProjectionHead(x.shape[1], cfg.embed_dim).to(dev)
    protos = PrototypeMixture(k_per_class, cfg.embed_dim, cfg.proto_momentum, cfg.seed).to(dev)

    def batches(epoch):
        order = torch.randperm(len(xs), generator=gen)
        for i in range(0, len(order), cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            yield xs[idx].to(dev), ys[idx].to(dev)

    steps = math.ceil(len(xs) / cfg.batch_size)
    threads = torch.get_num_threads()
    if dev.type == "cpu":  # a head's matmuls are too small for intra-op threads to pay off; on a busy
        torch.set_num_threads(1)  # CPU they made each step ~40x slower in our measurements
    try:
        history = fit(lambda b: (head(b[0]), b[1]), batches, steps, list(head.parameters()), protos, cfg, [head], log)
    finally:
        torch.set_num_threads(threads)
    meta = {
        "base_model": parts.get("backbone", backbone),
        "base_weights": attrs.get("weights_source"),
        "base_identity": parts.get("weights"),
        "base_layer": layer,
        "base_preprocess": parts.get("preprocess"),  # as the features were extracted: the model's run uses it
        "in_dim": int(x.shape[1]),
        "num_classes": num_classes,
        "trained_on": f"{store.path}:{split}/{backbone}/{layer}",
    }
    return _finish(Path(out), method, "head-only", cfg, head, protos, history, meta, t0)


def train_end_to_end(
    benchmark: str,
    model: str,
    method: str = "apex",
    weights: str | None = None,
    k: int | None = None,
    select_k: dict[int, int] | None = None,
    cfg: ApexConfig | None = None,
    out: str | Path = "stores/apex.safetensors",
    device: str = "auto",
    workers: int = 0,
    data_root_dir: str | None = None,
    flip: bool = True,
    log=None,
) -> TrainResult:
    """Train encoder, head and prototypes from the benchmark's ID train images (the paper's setting)."""
    check_output_file(Path(out))
    from torchvision import transforms as T

    from oodcli.backbones.base import get_spec
    from oodcli.data.base import TransformedDataset, data_root, open_source
    from oodcli.data.benchmarks import get_benchmark

    cfg = cfg or ApexConfig()
    cfg.check()
    t0 = time.perf_counter()
    bench = get_benchmark(benchmark)
    spec = get_spec(model).for_data(bench.name)  # normalised with the benchmark's statistics (cifar_resnet*)
    if "penultimate" not in spec.layers:
        raise UsageError(f"model '{model}' has no penultimate layer to put the projection head on")
    if weights is not None:
        spec.weights_identity(weights)
    data = open_source(bench.split("train").source, data_root(data_root_dir))
    labels = np.asarray(data.labels, np.int64)
    if len(labels) == 0 or (labels < 0).any():
        raise OodError(f"the train split of '{benchmark}' is empty or holds unlabelled rows")
    num_classes = int(labels.max()) + 1
    k_per_class = resolve_k(method, num_classes, k, select_k)
    dev = _device(device)
    torch.manual_seed(cfg.seed)
    encoder = spec.builder(weights if weights is not None else "random").to(dev)
    in_dim = encoder.layer_shapes["penultimate"][0]
    head = ProjectionHead(in_dim, cfg.embed_dim).to(dev)
    protos = PrototypeMixture(k_per_class, cfg.embed_dim, cfg.proto_momentum, cfg.seed).to(dev)
    crop = spec.preprocess.crop
    augment = [spec.preprocess.to_transform(), T.RandomCrop(crop, padding=crop // 8, padding_mode="reflect")]
    transform = T.Compose(augment + ([T.RandomHorizontalFlip()] if flip else []))
    loader = torch.utils.data.DataLoader(
        TransformedDataset(data, transform), batch_size=cfg.batch_size, shuffle=True, num_workers=workers,
        pin_memory=dev.type == "cuda", generator=torch.Generator().manual_seed(cfg.seed),
        persistent_workers=workers > 0,
    )
    targets = torch.from_numpy(labels)

    def embed(batch):
        images, index = batch
        h = encoder.forward_layers(images.to(dev, non_blocking=True), ("penultimate",))["penultimate"]
        return head(h), targets[index].to(dev)

    params = list(encoder.parameters()) + list(head.parameters())
    history = fit(embed, lambda epoch: loader, len(loader), params, protos, cfg, [encoder, head], log)
    meta = {
        "base_model": model,
        "base_weights": None,  # the trained encoder is in the file
        "base_identity": spec.weights_identity(weights) if weights is not None else f"{spec.family}:random",
        "base_layer": "penultimate",
        "base_preprocess": spec.preprocess.describe(),
        "in_dim": int(in_dim),
        "num_classes": num_classes,
        "trained_on": f"{benchmark}:train",
        "augment": "crop+flip" if flip else "crop",
    }
    return _finish(Path(out), method, "end-to-end", cfg, head, protos, history, meta, t0, encoder)


# ---- the file --------------------------------------------------------------------------------


def save_model(
    path: Path, head: ProjectionHead, protos: PrototypeMixture, meta: dict, encoder: nn.Module | None = None
) -> None:
    """One safetensors file: head (and encoder), prototypes, qualities; settings as JSON metadata.
    Written to a temporary name first, so a failure never leaves half a file at ``path``."""
    from safetensors.torch import save_file

    tensors = {f"head.{k}": v for k, v in head.state_dict().items()}
    if encoder is not None:  # without the untrained classifier the base network may carry
        tensors |= {f"encoder.{k}": v for k, v in encoder.state_dict().items() if not k.startswith("fc.")}
    tensors |= {
        "prototypes": protos.vectors,
        "proto_class": protos.classes,
        "q_c": torch.from_numpy(protos.q_c()).float(),
        "q_s": torch.from_numpy(protos.q_s()).float(),
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"format": FORMAT, "meta": json.dumps(meta)}))


def read_model(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(settings, tensors) of a file written by ``save_model``; refuses anything else."""
    return read_meta(path), _tensors(path)


def read_meta(path: str | Path) -> dict:
    """Only the settings (cheap: reads the file header, no tensors)."""
    from oodcli.backbones.registry import read_apex_meta

    return read_apex_meta(path)


def _tensors(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path), device="cpu")
