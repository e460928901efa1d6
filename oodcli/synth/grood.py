"""GROOD's prototypes (paper 004, Sec. 5 and App. A.2), written to ``fitted/grood``.

- Class prototypes (eq. 7): per-class means of the ID train split's penultimate
  features, read from the store. For mixup also of the early feature maps (the output
  of the first block), which the store does not keep: the backbone runs over the train
  images again and the maps are summed per class while streaming, never kept per sample.
- OOD candidates, by ``ood_prototype``:
  ``mixup``  every train image's early map mixed with the early prototype of its
             second-highest predicted class, then through the rest of the network:
             h = f_mid(lambda f_early(x) + (1 - lambda) p_early[c2]) (eq. 9, lambda 0.5);
             a SOURCE:NAME model is re-entered by a forward hook that replaces its early
             module's output (``--early``, default its first stage; ``adapters.ReEntry``);
  ``noise``  images of uniform noise; the ``samples`` with the lowest energy
             (logsumexp of the logits: the most OOD-looking) of 10x as many;
  ``val``    ``samples`` random rows of an auxiliary OOD split of the store;
  ``mean``   no candidates: the OOD prototype is the mean of the class prototypes.
- Proximity filter: a candidate whose distance to its nearest class prototype is
  below the ``quantile``-th quantile of those distances is dropped; the OOD prototype
  is the mean of the rest (eq. 8). The paper gives no q; we use the median (0.5).

Then the gradients of every split are written (``oodcli.scorers.grood``). A second
run with the same options and train features reuses the prototypes (cached) and only
writes gradients that are missing or stale.
"""

from __future__ import annotations

import hashlib
import json
import time

import numpy as np
import torch

from oodcli import __version__
from oodcli.errors import OodError, UsageError
from oodcli.scorers.base import (
    Progress,
    check_features,
    check_train_split,
    iter_feature_blocks,
    no_progress,
    train_fingerprint,
)
from oodcli.scorers.grood import STATE_NODE, LAYER, load_state, prototype_distances, write_gradients
from oodcli.scorers.mahalanobis import class_sums
from oodcli.store import Store, features_node, split_node

OOD_PROTOTYPES = ("mixup", "noise", "val", "mean")
NOISE_POOL = 10  # noise: draw this many images per kept one


def proximity_filter(distances: np.ndarray, quantile: float) -> tuple[np.ndarray, float]:
    """Keep candidates at or beyond the ``quantile``-th quantile of their distance to the
    nearest class prototype; returns (mask, threshold)."""
    tau = float(np.quantile(distances, quantile))
    return distances >= tau, tau


def options(ood_prototype: str, quantile: float, mixup_lambda: float, samples: int, val_split: str | None,
            seed: int, early: str | None = None) -> dict:
    """Check the options and keep those that shape this kind of prototype (the cache key)."""
    if ood_prototype not in OOD_PROTOTYPES:
        raise UsageError(f"unknown --ood-prototype '{ood_prototype}'; use one of {', '.join(OOD_PROTOTYPES)}")
    if not 0.0 <= quantile < 1.0:
        raise UsageError(f"--quantile must be in [0, 1), not {quantile}")
    if not 0.0 <= mixup_lambda <= 1.0:
        raise UsageError(f"--lambda must be in [0, 1], not {mixup_lambda}")
    if samples < 1:
        raise UsageError(f"--samples must be at least 1, not {samples}")
    if (ood_prototype == "val") != (val_split is not None):
        raise UsageError("--val-split SPLIT goes with --ood-prototype val (and only with it)")
    if early is not None and ood_prototype != "mixup":
        raise UsageError("--early MODULE.PATH goes with --ood-prototype mixup (and only with it)")
    relevant = {
        "mixup": {"quantile": quantile, "mixup_lambda": mixup_lambda, **({"early": early} if early else {})},
        "noise": {"quantile": quantile, "samples": samples, "seed": seed},
        "val": {"quantile": quantile, "samples": samples, "seed": seed, "val_split": val_split},
        "mean": {},
    }[ood_prototype]
    return {"ood_prototype": ood_prototype, **relevant}


# ---- the backbone, built again from what the store recorded -----------------------------------


def resolve_weights(store: Store, backbone: str, split: str, weights: str | None) -> str | None:
    """``weights`` or the store's recorded source, checked to be the parameters (and
    preprocessing) the features were extracted with."""
    from oodcli.backbones.base import get_spec

    attrs = store.node_attrs(features_node(split, backbone))
    parts = attrs.get("parts", {})
    if attrs.get("model_source"):  # SOURCE:NAME: rebuilt as extract named it (deploy.recorded_backbone)
        if weights is not None:
            raise UsageError(f"--weights goes with built-in models; '{backbone}' is rebuilt as extract named it")
        return attrs.get("weights_source")
    weights = weights if weights is not None else attrs.get("weights_source")
    spec = get_spec(backbone).for_weights(weights)
    identity = spec.weights_identity(weights)
    if identity != parts.get("weights"):
        raise OodError(
            f"weights {weights or spec.default_weights} ({identity}) are not the ones the store's '{backbone}' "
            f"features came from ({parts.get('weights')}); pass --weights with that checkpoint"
        )
    if not isinstance(parts.get("preprocess"), dict):
        raise OodError(f"the store's '{backbone}' features do not record their preprocessing; "
                       "re-extract them with this oodcli")
    return weights


def _build(backbone: str, weights: str | None, device: torch.device, recorded: dict | None = None,
           store: Store | None = None, split: str | None = None):
    """The network, and its spec with the preprocessing the store's features were made with
    (``recorded``: the benchmark's normalisation or ``--preprocess``), so images are read again
    exactly as they were extracted. A SOURCE:NAME model is named again as extract recorded it."""
    import dataclasses

    from oodcli.backbones.base import get_spec
    from oodcli.backbones.spec import Preprocess

    if store is not None and store.node_attrs(features_node(split, backbone)).get("model_source"):
        from oodcli.deploy import recorded_backbone

        spec, weights = recorded_backbone(store, backbone, split)
        spec = spec.requesting(("logits", "penultimate")) if hasattr(spec, "requesting") else spec
        return spec, spec.build(weights).to(device).eval()
    spec = get_spec(backbone).for_weights(weights)
    if recorded:
        spec = dataclasses.replace(spec, preprocess=Preprocess(
            **{k: tuple(v) if isinstance(v, list) else v for k, v in recorded.items()}))
    return spec, spec.build(weights).to(device).eval()


def _train_loader(store: Store, split: str, spec, data_root_dir: str | None, batch_size: int, workers: int):
    """The train images again, from the source the split records; refused if they changed."""
    from oodcli.data.base import TransformedDataset, data_root, open_source

    attrs = store.node_attrs(split_node(split))
    data = open_source(attrs["source"], data_root(data_root_dir), is_ood=False)
    if data.identity() != attrs.get("data"):
        raise OodError(
            f"the images at {attrs['source']} are not the ones split '{split}' was extracted from; "
            "check --data-root"
        )
    return torch.utils.data.DataLoader(
        TransformedDataset(data, spec.preprocess.to_transform()), batch_size=batch_size, shuffle=False,
        num_workers=workers,
    )


# ---- OOD candidates ------------------------------------------------------------------------------


class Staged:
    """A built-in ``StagedClassifier``'s (early, mid, head) as the one call both mixup passes make:
    ``run(x, edit)`` -> (early map, logits, penultimate), the rest running on ``edit(early map)``
    (``adapters.ReEntry`` is the same call over any hooked model)."""

    def __init__(self, stages):
        self.early, self.mid, self.fc = stages
        self.classes = int(self.fc.out_features)

    def run(self, x, edit=None):
        fmap = self.early(x)
        pen = self.mid(edit(fmap) if edit is not None else fmap)
        return fmap, self.fc(pen), pen


@torch.inference_mode()
def early_prototypes(split, loader, labels: np.ndarray, present: np.ndarray, device, advance):
    """Pass 1 of mixup: per-class means of the early maps (labels index the classes) and
    every image's second-highest predicted class among the classes that have samples."""
    sums, c2 = None, np.zeros(len(labels), np.int64)
    absent = torch.as_tensor(~present, device=device)
    for images, idx in loader:
        fmap, logits, _ = split.run(images.to(device))
        if sums is None:
            sums = torch.zeros((len(present), *fmap.shape[1:]), dtype=torch.float32, device=device)
        sums.index_add_(0, torch.as_tensor(labels[idx.numpy()], device=device), fmap.float())
        logits = logits.masked_fill(absent, float("-inf"))
        c2[idx.numpy()] = logits.topk(2, dim=1).indices[:, 1].cpu().numpy()
        advance(len(idx))
    counts = torch.as_tensor(np.bincount(labels, minlength=len(present)), device=device).clamp(min=1)
    return sums / counts.view(-1, *[1] * (sums.dim() - 1)), c2


@torch.inference_mode()
def mixup_features(split, loader, p_early: torch.Tensor, c2: np.ndarray, mixup_lambda: float, device, advance):
    """Pass 2 of mixup (eq. 9), one block of synthetic penultimate features per batch."""
    for images, idx in loader:
        proto = p_early[torch.as_tensor(c2[idx.numpy()], device=device)]
        _, _, pen = split.run(images.to(device),
                              lambda fmap: mixup_lambda * fmap + (1.0 - mixup_lambda) * proto.to(fmap.dtype))
        yield pen.float().cpu().numpy()
        advance(len(idx))


@torch.inference_mode()
def noise_features(net, spec, samples: int, seed: int, batch_size: int, device) -> np.ndarray:
    """Penultimate features of the ``samples`` lowest-energy images among 10x as many of
    uniform noise (App. A.2 'Uniform')."""
    if "logits" not in net.layer_shapes:
        raise OodError(f"model '{spec.name}' has no logits, which --ood-prototype noise needs to rank the images")
    gen = torch.Generator().manual_seed(seed)
    size = spec.preprocess.crop
    mean = torch.tensor(spec.preprocess.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.preprocess.std).view(1, 3, 1, 1)
    energy, feats = [], []
    total = samples * NOISE_POOL
    for start in range(0, total, batch_size):
        pixels = torch.rand((min(batch_size, total - start), 3, size, size), generator=gen)
        out = net(((pixels - mean) / std).to(device), ("logits", LAYER))
        energy.append(torch.logsumexp(out["logits"], dim=1).cpu())
        feats.append(out[LAYER].cpu())
    keep = torch.cat(energy).argsort()[:samples]
    return torch.cat(feats)[keep].numpy()


def val_features(store: Store, backbone: str, split: str, samples: int, seed: int, model_id: str | None) -> np.ndarray:
    """``samples`` random rows (all if fewer) of an auxiliary OOD split's penultimate features."""
    check_features(store, backbone, split, (LAYER,))
    if store.node_attrs(features_node(split, backbone)).get("model_id") != model_id:
        raise OodError(f"split '{split}' was extracted with other '{backbone}' weights than the train split")
    rows = store.shape(f"{features_node(split, backbone)}/{LAYER}")[0]
    pick = np.sort(np.random.default_rng(seed).choice(rows, min(samples, rows), replace=False))
    out, start = [], 0
    for block in iter_feature_blocks(store, backbone, split, (LAYER,)):
        stop = start + len(block[LAYER])
        out.append(block[LAYER][pick[(pick >= start) & (pick < stop)] - start])
        start = stop
    return np.concatenate(out)


# ---- the command ---------------------------------------------------------------------------------


def synthesize_grood(
    store: Store,
    backbone: str | None = None,
    weights: str | None = None,
    train_split: str = "train",
    ood_prototype: str = "mixup",
    quantile: float = 0.5,
    mixup_lambda: float = 0.5,
    val_split: str | None = None,
    samples: int = 100,
    seed: int = 0,
    device: str = "auto",
    batch_size: int = 128,
    workers: int = 0,
    data_root_dir: str | None = None,
    progress: Progress = no_progress,
    early: str | None = None,
) -> dict:
    """Make (or find) the GROOD prototypes, then the gradient store. Returns a summary. ``early``: the
    module path of a SOURCE:NAME model after which mixup re-enters it (default: its first stage)."""
    from oodcli.scoring import default_backbone

    t0 = time.perf_counter()
    hparams = options(ood_prototype, quantile, mixup_lambda, samples, val_split, seed, early)
    if not store.is_array(f"{split_node(train_split)}/labels"):
        raise OodError(f"store {store.path} has no train split '{train_split}'; GROOD builds its prototypes from "
                       "the ID train split: extract it first (oodcli extract ... --split train)")
    backbone = backbone or default_backbone(store, train_split)
    check_features(store, backbone, train_split, (LAYER,))
    check_train_split(store, backbone, train_split, (LAYER,), min_classes=2)
    model_id = store.node_attrs(features_node(train_split, backbone)).get("model_id")
    key = {
        "method": "grood",
        "hparams": hparams,
        "backbone": backbone,
        "model_id": model_id,
        "train_split": train_split,
        "train_fingerprint": train_fingerprint(store, backbone, train_split, (LAYER,)),
    }
    if val_split is not None:
        key["hparams"]["val_fingerprint"] = train_fingerprint(store, backbone, val_split, (LAYER,)) \
            if store.exists(features_node(val_split, backbone)) else None
    old = store.node_attrs(STATE_NODE) if store.exists(STATE_NODE) else {}
    cached = bool(old.get("complete")) and json.dumps({k: old.get(k) for k in key}, sort_keys=True) == json.dumps(
        key, sort_keys=True)
    if weights is not None or (not cached and ood_prototype in ("mixup", "noise")):  # these run the backbone
        weights = resolve_weights(store, backbone, train_split, weights)
    if not cached:
        _make_prototypes(store, key, weights, samples, seed, device, batch_size, workers, data_root_dir, progress)
    state = load_state(store, backbone, train_split, model_id)
    grads = write_gradients(store, backbone, state, progress)
    attrs = store.node_attrs(STATE_NODE)
    return {
        "status": "cached" if cached else "synthesized",
        "backbone": backbone,
        "train_split": train_split,
        **hparams,
        **attrs["scalars"],
        "classes": int(len(state["classes"])),
        "dim": int(state["ood_prototype"].shape[0]),
        "early_shape": attrs.get("early_shape"),
        "prototype_id": state["prototype_id"],
        "gradients": grads,
        "seconds": time.perf_counter() - t0,
    }


def _make_prototypes(store, key, weights, samples, seed, device_name, batch_size, workers, data_root_dir, progress):
    """Compute what can fail on bad input first, then replace ``fitted/grood``: arrays
    first, ``complete`` last. Mixup candidates (as many rows as the train split) stream
    into it while they are made; the proximity filter then reads them back in chunks."""
    from oodcli.extraction import resolve_device

    backbone, train_split, hp = key["backbone"], key["train_split"], key["hparams"]
    kind = hp["ood_prototype"]
    labels = store.read(f"{split_node(train_split)}/labels")

    def labelled():
        for b in iter_feature_blocks(store, backbone, train_split, (LAYER,), labels=True):
            yield b[LAYER], b["labels"]

    sums, counts = class_sums(labelled(), store.shape(f"{features_node(train_split, backbone)}/{LAYER}")[1])
    classes = np.flatnonzero(counts)
    class_prototypes = sums[classes] / counts[classes, None]
    arrays: dict[str, np.ndarray] = {"classes": classes, "class_prototypes": class_prototypes}
    candidates = None
    if kind == "mean":
        arrays["ood_prototype"] = class_prototypes.mean(0)
    elif kind == "val":
        candidates = val_features(store, backbone, hp["val_split"], samples, seed, key["model_id"])
    else:
        device = resolve_device(device_name)
        recorded = store.node_attrs(features_node(train_split, backbone)).get("parts", {}).get("preprocess")
        spec, net = _build(backbone, weights, device, recorded, store, train_split)
        if kind == "noise":
            candidates = noise_features(net, spec, samples, seed, batch_size, device)
        else:
            stages = _stages(net, backbone, classes, hp.get("early"), spec.preprocess.crop)
            present = np.isin(np.arange(stages.classes), classes)
            loader = _train_loader(store, train_split, spec, data_root_dir, batch_size, workers)
            p_early, c2 = early_prototypes(stages, loader, labels, present, device,
                                           progress("grood: early class means", len(labels)))
            arrays["early_prototypes"] = p_early[torch.as_tensor(classes, device=device)].cpu().numpy()

    with store.transaction() as txn:  # fitted/grood appears whole or not at all
        state = txn.stage(STATE_NODE)
        store.require_group(state)
        node = f"{state}/candidates"
        if kind == "mixup":
            store.create_array(node, (len(labels), class_prototypes.shape[1]), np.float32)
            row = 0
            for block in mixup_features(stages, loader, p_early, c2, hp["mixup_lambda"], device,
                                        progress("grood: mixup features", len(labels))):
                store.write_rows(node, row, block)
                row += len(block)
        elif candidates is not None:
            store.write_array(node, candidates.astype(np.float32))
        scalars = {}
        if kind != "mean":
            arrays["ood_prototype"], distance, scalars = _filtered_mean(store, node, class_prototypes, hp["quantile"])
            arrays["candidate_distance"] = distance
        for name, value in arrays.items():
            store.write_array(f"{state}/{name}", value)
        prototype_id = hashlib.sha256(
            np.ascontiguousarray(arrays["class_prototypes"], np.float64).tobytes()
            + np.ascontiguousarray(arrays["ood_prototype"], np.float64).tobytes()
        ).hexdigest()[:16]
        early_shape = list(arrays["early_prototypes"].shape[1:]) if "early_prototypes" in arrays else None
        store.set_attrs(state, **key, scalars=scalars, prototype_id=prototype_id, early_shape=early_shape,
                        oodcli_version=__version__, complete=True)


def _stages(net, backbone: str, classes: np.ndarray, early: str | None = None, size: int = 224):
    """Where mixup re-enters the network: a built-in CNN's early/mid/head split, a SOURCE:NAME model's
    early module (``--early``, or its architecture's first stage), or a one-line error naming the
    alternatives."""
    from oodcli.backbones.adapters import HookedBackbone, reentry

    if isinstance(net, HookedBackbone):
        split = reentry(net, early, size)
    elif early is not None:
        raise UsageError(f"--early goes with SOURCE:NAME models; '{backbone}' splits after its first block")
    elif hasattr(net, "stages"):
        split = Staged(net.stages())
    else:
        raise OodError(f"model '{backbone}' has no early/mid/head split, which the mixup OOD prototype needs; "
                       "use --ood-prototype noise, val or mean")
    if classes.max() >= split.classes:
        raise OodError(f"train labels go up to {classes.max()} but '{backbone}' has {split.classes} classes")
    return split


def _filtered_mean(store: Store, node: str, class_prototypes: np.ndarray, quantile: float):
    """The proximity filter over the candidates at ``node`` (read in chunks) and the mean
    of those it keeps: (OOD prototype, distances, summary numbers)."""
    distance = np.concatenate([prototype_distances(b, class_prototypes).min(1) for _, b in store.iter_rows(node)])
    keep, tau = proximity_filter(distance, quantile)
    total, start = np.zeros(class_prototypes.shape[1]), 0
    for _, block in store.iter_rows(node):
        total += block[keep[start:start + len(block)]].astype(np.float64).sum(0)
        start += len(block)
    summary = {"candidates": int(len(distance)), "kept": int(keep.sum()), "tau": tau}
    return total / keep.sum(), distance.astype(np.float32), summary
