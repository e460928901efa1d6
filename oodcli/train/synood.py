"""SynOOD (paper 003, sec. 3.4-3.5): a projection and learnable negative labels, trained on cached CLIP features.

CLIP's image encoder F stays frozen in SynOOD, so its outputs (``image_embeds``) are read
from the store; no image encoder is built and no text tower runs in the loop (the label
features themselves are the parameters of step (c)). The pieces:

- **Y-** (eq. 2): NegLabel's mined negative labels for the store's CLIP and ID label set,
  by NegLabel's own code path, cache and defaults (``oodcli.scorers.clip_zeroshot.NegLabel``).
- **D_syn** (sec. 3.4): every synthetic image (splits of role ``synthetic``) is paired with
  its most similar negative label (largest cosine in CLIP space); Y*- is the set of labels
  so chosen, M' of them.
- **D_in*** (sec. 3.4): m ID train images, m = number of synthetic images, the most complex
  of each class first: complexity = JPEG bytes per pixel. JPEG files are measured as
  stored (file size / width x height, header read only); any other source (PNG folders,
  the embedded digits) is encoded to JPEG in memory at quality ``JPEG_QUALITY`` = 75
  (libjpeg's and PIL's default) after conversion to RGB. Each class gives its top m // C;
  the m mod C slots left (and any quota a small class cannot fill) go to the most complex
  of the images not yet chosen, ties by row order.
- **(b) projection delta** (eq. 11-12). Eq. 11 names delta a projection without giving its
  form; the authors' code builds it as a residual block on the *unnormalised* CLIP image
  feature f (the store's ``penultimate`` of a CLIP; ``image_embeds`` is its L2-normalisation):
  delta(f) = f + ReLU(LayerNorm(Linear_DxD(f))), randomly initialised, re-normalised for the
  cosine. That is the default (``projection="authors"``), as it is what produced the paper's
  tables. ``projection="linear"`` is the plain reading of the text: a D x D linear map on the
  unit feature, starting at the identity (zero bias), so that training starts at NegLabel.
  Eq. 12 writes a softmax over the M' labels of Y*-, while D_in* images carry ID labels;
  the reading (confirmed by the authors' code, whose classes are ID labels + OOD labels):
  the softmax runs over the C ID class prototypes and the M' features of Y*- together, each
  image's target being its own label (a synthetic image's paired negative, an ID image's
  class), i.e. cross-entropy of cos(delta(F(x)), T_j) / tau. tau is the CLIP's own
  temperature 1 / logit_scale (0.01 for OpenAI's ViT-B/16). Adam, lr 1e-3, batch 128, weight
  decay 1e-5, 3 epochs (sec. 4.1); the learning rate follows the authors' cosine decay per
  epoch (T_max = the epochs, down to 1e-5; ``proj_schedule="constant"`` keeps it fixed).
- **(c) negative label features** (eq. 13-14): the M' features of Y*- are the parameters
  (initialised to their CLIP text features; the other M - M' negatives and the ID
  prototypes stay fixed), trained on the synthetic images' frozen features without the
  projection (the step-by-step strategy without the projection layer, Table 5's best).
  Eq. 14's denominator sums j = 1..M', the count of Y*-'s features; our reading: for image
  i the softmax over the M' learnable label features, -log exp(cos(I_i, T_i)/tau) /
  sum_{j in Y*-} exp(cos(I_i, T_j)/tau), features L2-normalised before the cosine (an index
  over images cannot run to M' labels, and this reading does not depend on the batch).
  SGD (plain: the paper names no momentum), lr 2e-3, 5 epochs, batch 128 (the paper gives
  none for this step; the projection step's).

The output is one safetensors file: ``projection.weight`` [D, D], ``projection.bias`` [D]
(the Linear), for the authors' block also ``projection.norm.weight`` / ``projection.norm.bias``
[D] (the LayerNorm), ``negatives`` [M, D] (after fine-tuning, L2-normalised, NegLabel's order), ``negatives_clip``
[M, D] (before), ``learned`` [M] (1 where the label was in Y*-), and JSON metadata
(CLIP identity, label set, NegLabel settings, synthetic splits and fingerprints, m, M',
hyperparameters, per-epoch losses, the negative words).
"""

from __future__ import annotations

import io
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from oodcli.errors import OodError, UsageError
from oodcli.outputs import check_output_file
from oodcli.train.prompts import (
    check_same_clip, coop_loss, file_hash, fit_epochs, read_rows, read_trained_file, write_prompt_file,
)

METHOD = "synood"
JPEG_QUALITY = 75
JPEG_SUFFIXES = (".jpg", ".jpeg")
ROLE = "synthetic"
PAIR_ROWS = 4096  # synthetic images per block when pairing them with negative labels
MAKE = "oodcli train synood --store S --out synood.safetensors"
PROJECTIONS = ("authors", "linear")
PROJECTION_INPUT = {"authors": "penultimate", "linear": "image_embeds"}  # the layer delta reads
SCHEDULES = ("cosine", "constant")
COSINE_MIN_LR = 1e-5  # the authors' eta_min


# ---- D_in*: the complexity rule ---------------------------------------------------------------


def image_file(data, index: int) -> Path | None:
    """The file behind row ``index`` of a data source, or None when it is not read from a file."""
    from oodcli.data.sources import ClassRangeDataset

    if isinstance(data, ClassRangeDataset):
        return image_file(data.inner, int(data.rows[index]))
    files = getattr(data, "files", None)
    return None if files is None else Path(files[index])


def jpeg_bytes_per_pixel(data, index: int, quality: int = JPEG_QUALITY) -> float:
    """Sec. 3.4's complexity: JPEG size / pixel count (a JPEG file as stored, anything else encoded here)."""
    from PIL import Image

    path = image_file(data, index)
    if path is not None and path.suffix.lower() in JPEG_SUFFIXES:
        try:
            with Image.open(path) as img:  # the header only: no decode
                w, h = img.size
        except (OSError, SyntaxError, ValueError):
            raise OodError(f"image {path} cannot be read; fix or remove it") from None
        return path.stat().st_size / (w * h)
    img = data.load(index)
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.tell() / (img.width * img.height)


def complex_rows(complexity: np.ndarray, labels: np.ndarray, m: int) -> np.ndarray:
    """Sorted row indices of D_in*: each class's m // C most complex rows, the rest of the m
    by complexity over the rows not yet chosen (ties by row order); all rows if m >= N."""
    m = min(int(m), len(labels))
    order = np.lexsort((np.arange(len(labels)), -np.asarray(complexity, np.float64)))  # most complex first
    classes = np.unique(labels)
    quota = m // len(classes) if len(classes) else 0
    ranked = labels[order]
    chosen = np.zeros(len(labels), bool)
    for c in classes:
        chosen[order[ranked == c][:quota]] = True
    left = m - int(chosen.sum())
    if left > 0:
        chosen[order[~chosen[order]][:left]] = True
    return np.flatnonzero(chosen)


def _train_complexity(store, split: str, rows: np.ndarray, data_root_dir: str | None, progress) -> np.ndarray:
    """Bytes per pixel of the given train rows, reading the images from the source the split records."""
    from oodcli.data.base import data_root, open_source
    from oodcli.store import split_node

    attrs = store.node_attrs(split_node(split))
    data = open_source(attrs["source"], data_root(data_root_dir), is_ood=False)
    if data.identity() != attrs.get("data"):
        raise OodError(
            f"the images at {attrs['source']} are not the ones split '{split}' was extracted from; check --data-root"
        )
    ids = store.read(f"{split_node(split)}/ids")
    advance = progress(f"synood: JPEG bytes per pixel of {len(rows)} '{split}' images", len(rows)) if progress else None
    out = np.empty(len(rows), np.float64)
    for k, r in enumerate(rows):
        out[k] = jpeg_bytes_per_pixel(data, int(ids[r]))
        if advance and (k % 256 == 255 or k == len(rows) - 1):
            advance(k % 256 + 1)
    return out


# ---- pairing and the losses ---------------------------------------------------------------------


def pair_with_negatives(image: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """[N]: each (unit) image's most similar (unit) negative label, in blocks of rows."""
    return torch.cat([(image[i : i + PAIR_ROWS] @ negatives.T).argmax(dim=1)
                      for i in range(0, len(image), PAIR_ROWS)]) if len(image) else torch.zeros(0, dtype=torch.long)


class Projection(torch.nn.Module):
    """delta of eq. 11 (see the module docstring): the authors' residual block on the unnormalised
    feature, or a linear map on the unit feature starting at the identity; the output is unit."""

    def __init__(self, dim: int, kind: str = "authors"):
        super().__init__()
        if kind not in PROJECTIONS:
            raise UsageError(f"the SynOOD projection is one of {', '.join(PROJECTIONS)}, not {kind!r}")
        self.kind = kind
        self.linear = torch.nn.Linear(dim, dim)  # PyTorch's random initialisation, as the authors'
        if kind == "authors":
            self.norm = torch.nn.LayerNorm(dim)
        else:
            with torch.no_grad():
                self.linear.weight.copy_(torch.eye(dim))
                self.linear.bias.zero_()

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        """``feature``: the store's ``PROJECTION_INPUT[kind]`` rows (the linear map normalises them first)."""
        if self.kind == "authors":
            return F.normalize(feature + F.relu(self.norm(self.linear(feature))), dim=-1)
        return F.normalize(self.linear(F.normalize(feature, dim=-1)), dim=-1)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"projection.weight": self.linear.weight, "projection.bias": self.linear.bias}
        if self.kind == "authors":
            out |= {"projection.norm.weight": self.norm.weight, "projection.norm.bias": self.norm.bias}
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], kind: str) -> "Projection":
        proj = cls(tensors["projection.weight"].shape[0], kind)
        with torch.no_grad():
            for name, value in proj.tensors().items():
                value.copy_(tensors[name])
        return proj.eval()


def projection_loss(image_hat: torch.Tensor, prototypes: torch.Tensor, chosen: torch.Tensor,
                    targets: torch.Tensor, tau: float) -> torch.Tensor:
    """L^P of eq. 12 (our reading): cross-entropy over [C ID prototypes, M' negatives of Y*-] of
    cos(projected image, T_j) / tau; ``targets`` index that joint label set."""
    return coop_loss(image_hat, torch.cat([prototypes, chosen]), targets, tau)


def label_loss(image: torch.Tensor, learned: torch.Tensor, targets: torch.Tensor, tau: float) -> torch.Tensor:
    """L^T of eq. 14 (our reading): cross-entropy over the M' learnable label features (normalised here)
    of cos(frozen image, T_j) / tau; ``targets`` index the learned labels."""
    return coop_loss(image, F.normalize(learned, dim=-1), targets, tau)


# ---- the trained file ---------------------------------------------------------------------------


@dataclass
class SynoodFile:
    path: str
    sha256: str
    meta: dict
    projection: Projection
    negatives: torch.Tensor  # [M, D] after fine-tuning
    negatives_clip: torch.Tensor  # [M, D] before
    learned: torch.Tensor  # [M] 1 where learned

    @property
    def projection_input(self) -> str:
        """The store layer the projection reads: 'penultimate' (unnormalised) or 'image_embeds'."""
        return PROJECTION_INPUT[self.projection.kind]


def projection_kind(meta: dict) -> str:
    """The file's projection (files from before the authors' block was added hold the linear map)."""
    return (meta.get("projection") or {}).get("kind", "linear")


def read_synood_file(path: str | Path) -> SynoodFile:
    """Load a file of 'oodcli train synood', or one line saying why it is not one."""
    path, meta, t = read_trained_file(path, "SynOOD file", MAKE)
    keys = ("projection.weight", "projection.bias", "negatives", "negatives_clip", "learned")
    if meta.get("method") != METHOD or any(k not in t for k in keys):
        raise OodError(f"{path} is not a SynOOD file (made by '{MAKE}'); it holds {meta.get('method', 'something else')}")
    kind = projection_kind(meta)
    w, b, neg, clip, learned = (t[k].float() for k in keys)
    d = w.shape[0]
    norm = [t.get(f"projection.norm.{k}") for k in ("weight", "bias")] if kind == "authors" else []
    if kind not in PROJECTIONS or w.shape != (d, d) or b.shape != (d,) or neg.ndim != 2 or neg.shape[1] != d \
            or clip.shape != neg.shape or learned.shape != (len(neg),) or any(v is None or v.shape != (d,) for v in norm):
        raise OodError(f"SynOOD file {path} has malformed tensors; train it again")
    projection = Projection.from_tensors({k: v.float() for k, v in t.items()}, kind)
    return SynoodFile(str(path), file_hash(path), meta, projection, neg, clip, learned)


def check_synood_fit(file: SynoodFile, source, names: list[str]) -> None:
    """Refuse a file trained on another CLIP or label set (its negatives were mined against both)."""
    meta = file.meta
    check_same_clip(meta, f"SynOOD file {file.path}", source, "train it on this store")
    if meta.get("class_names") != list(names):
        raise OodError(
            f"SynOOD file {file.path} was trained for another label set ({len(meta.get('class_names') or [])} classes, "
            f"this one has {len(names)}); train it on this store or pass the same synood.labels=FILE"
        )
    if file.projection.linear.weight.shape[0] != source.dim:
        raise OodError(f"SynOOD file {file.path} is for {file.projection.linear.weight.shape[0]}-d features, these are {source.dim}-d")


# ---- training -----------------------------------------------------------------------------------


@dataclass
class SynoodTrainResult:
    path: str
    synthetic: int  # m
    in_star: int  # D_in* rows (m unless the train split is smaller)
    negatives: int  # M
    learned: int  # M'
    classes: int
    projection_loss: float  # last epoch's L^P
    label_loss: float  # last epoch's L^T
    pairing_before: float  # share of synthetic images nearest to their paired label, before / after (c)
    pairing_after: float
    seconds: float
    history: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def synthetic_splits(store, named: list[str] | None, backbone: str) -> list[str]:
    """The synthetic splits to learn from: the named ones (which must have role synthetic) or all of them."""
    from oodcli.scoring import check_splits_exist, require_whole_splits
    from oodcli.store import split_role

    if not named:
        found = [s for s in require_whole_splits(store) if split_role(store, s) == ROLE]
        if not found:
            raise OodError(
                f"store {store.path} has no synthetic split; make images with 'oodcli synthesize synood' and add them with "
                f"'oodcli extract --model {backbone} --data folder:DIR --split synthetic/synood --role synthetic "
                f"--store {store.path}'"
            )
        return found
    check_splits_exist(store, named)
    for s in named:
        role = split_role(store, s)
        if role != ROLE:
            raise OodError(
                f"split '{s}' has role '{role}', not synthetic; SynOOD trains on generated images only "
                "(extract them with --role synthetic), never on a test set"
            )
    return list(dict.fromkeys(named))


def train_synood(
    store_path: str | Path,
    out: str | Path,
    synthetic: list[str] | None = None,
    train_split: str = "train",
    backbone: str | None = None,
    num_negatives: int = 10000,
    percentile: float = 0.95,
    templates: str = "The nice {}",
    adj_template: str = "This is a {} photo",
    wordnet: str | None = None,
    labels: str | None = None,
    projection: str = "authors",
    proj_epochs: int = 3,
    proj_lr: float = 1e-3,
    proj_schedule: str = "cosine",
    weight_decay: float = 1e-5,
    label_epochs: int = 5,
    label_lr: float = 2e-3,
    batch_size: int = 128,
    temperature: float | None = None,
    seed: int = 0,
    data_root_dir: str | None = None,
    log=None,
    progress=None,
) -> SynoodTrainResult:
    """Train SynOOD's projection (eq. 12) and negative label features (eq. 14) on a store; write ``out``."""
    from oodcli import text
    from oodcli.scorers.clip_zeroshot import NegLabel
    from oodcli.scorers.base import check_features, no_progress
    from oodcli.scoring import check_same_model, check_splits_exist, default_backbone
    from oodcli.store import features_node, open_store, split_node

    t0 = time.perf_counter()
    out = Path(out)
    check_output_file(out)
    if batch_size < 1 or proj_lr <= 0 or label_lr <= 0 or weight_decay < 0 or (temperature is not None and temperature <= 0):
        raise UsageError("--batch-size, --proj-lr, --label-lr and --temperature must be positive, --weight-decay non-negative")
    if proj_epochs < 0 or label_epochs < 0:
        raise UsageError("--proj-epochs and --label-epochs must be 0 or more")
    if projection not in PROJECTIONS or proj_schedule not in SCHEDULES:
        raise UsageError(f"--projection is one of {', '.join(PROJECTIONS)} and --proj-schedule one of "
                         f"{', '.join(SCHEDULES)}, not {projection!r} / {proj_schedule!r}")
    layer = PROJECTION_INPUT[projection]
    negl = NegLabel(num_negatives=num_negatives, percentile=percentile, ngroup=1, templates=templates,
                    adj_template=adj_template, wordnet=wordnet, labels=labels)
    negl.progress = progress or no_progress

    with open_store(store_path, "r+") as store:
        backbone = backbone or default_backbone(store)
        source = text.clip_source(store, backbone)
        syn_splits = synthetic_splits(store, synthetic, backbone)
        check_splits_exist(store, [train_split])
        for s in [train_split, *syn_splits]:
            check_features(store, backbone, s, ("image_embeds",))
            if not store.is_array(f"{features_node(s, backbone)}/{layer}"):
                raise OodError(
                    f"split '{s}' has no '{backbone}' {layer}, the unnormalised CLIP feature the authors' projection "
                    f"reads; re-extract it with --layers image_embeds,{layer} --overwrite, or train with --projection linear"
                )
            check_features(store, backbone, s, (layer,))
        check_same_model(store, backbone, [train_split, *syn_splits])
        train_labels = store.read(f"{split_node(train_split)}/labels")
        if (train_labels < 0).any():
            raise OodError(f"split '{train_split}' holds OOD rows (label -1); D_in* comes from ID training data only")
        negl.load_text(store, backbone, source.model_id)  # Y- by NegLabel's path and cache
        names = negl.class_names
        if train_labels.size and int(train_labels.max()) >= len(names):
            raise OodError(f"split '{train_split}' has labels beyond the {len(names)} class names of the label set")
        syn_parts, syn_info = [], []
        for s in syn_splits:
            node = features_node(s, backbone)
            n = store.shape(f"{node}/{layer}")[0]
            syn_parts.append(read_rows(store, f"{node}/{layer}", np.arange(n), s).astype(np.float32))
            syn_info.append({"split": s, "rows": int(n), "fingerprint": store.node_attrs(node).get("fingerprint"),
                             "source": store.node_attrs(split_node(s)).get("source")})
        syn = np.concatenate(syn_parts)
        m = len(syn)
        if m == 0:
            raise OodError(f"the synthetic split(s) {', '.join(syn_splits)} hold no images")
        all_rows = np.arange(len(train_labels))
        complexity = _train_complexity(store, train_split, all_rows, data_root_dir, progress)
        in_rows = complex_rows(complexity, train_labels, m)
        train_node = features_node(train_split, backbone)
        in_feats = read_rows(store, f"{train_node}/{layer}", in_rows, train_split).astype(np.float32)
        train_fp = store.node_attrs(train_node).get("fingerprint")

    tower = text.build_text_tower(source)  # the CLIP's temperature; its weights are checked against the features
    tau = float(temperature) if temperature is not None else 1.0 / tower.logit_scale
    del tower
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # as the prompt trainers
    prototypes = torch.from_numpy(np.ascontiguousarray(negl.prototypes, np.float32)).to(device)
    negatives = torch.from_numpy(np.ascontiguousarray(negl.negatives, np.float32))
    syn_raw = torch.from_numpy(syn).to(device)  # what the projection reads (unnormalised for the authors' block)
    syn_t = F.normalize(syn_raw, dim=-1)  # CLIP's unit image features: pairing and step (c)
    in_raw = torch.from_numpy(in_feats).to(device)
    pair = pair_with_negatives(syn_t, negatives.to(device))
    learned_idx = torch.unique(pair)  # Y*-, sorted
    syn_target = torch.searchsorted(learned_idx, pair)
    chosen = negatives.to(device)[learned_idx]
    c = len(prototypes)

    # (b) the projection on D_pro = D_syn U D_in* (eq. 11-12)
    proj = Projection(source.dim, projection).to(device)
    x_pro = torch.cat([syn_raw, in_raw])
    y_pro = torch.cat([c + syn_target, torch.from_numpy(train_labels[in_rows].astype(np.int64)).to(device)])

    def proj_step(idx):
        idx = idx.to(device)
        loss = projection_loss(proj(x_pro[idx]), prototypes, chosen, y_pro[idx], tau)
        return loss, {}

    def proj_accuracy() -> float:
        with torch.no_grad():
            return float(((proj(x_pro) @ torch.cat([prototypes, chosen]).T).argmax(dim=1) == y_pro).float().mean())

    proj_history = []
    if proj_epochs:
        adam = torch.optim.Adam(proj.parameters(), lr=proj_lr, weight_decay=weight_decay)
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(adam, T_max=proj_epochs, eta_min=min(COSINE_MIN_LR, proj_lr)) \
            if proj_schedule == "cosine" else None
        _, proj_history = fit_epochs(proj_step, list(proj.parameters()), proj_epochs, proj_lr, len(x_pro), batch_size,
                                     gen, proj_accuracy, source.dim, (lambda s: log(f"projection: {s}")) if log else None,
                                     "D_pro accuracy", optimizer=adam, schedule=cosine)

    # (c) the negative label features of Y*- on the synthetic images, without the projection (eq. 13-14)
    tuned = torch.nn.Parameter(chosen.clone())

    def label_step(idx):
        idx = idx.to(device)
        return label_loss(syn_t[idx], tuned, syn_target[idx], tau), {}

    def pairing() -> float:
        with torch.no_grad():
            return float(((syn_t @ F.normalize(tuned, dim=-1).T).argmax(dim=1) == syn_target).float().mean())

    pairing_before, label_history = pairing(), []
    if label_epochs:
        sgd = torch.optim.SGD([tuned], lr=label_lr)
        pairing_before, label_history = fit_epochs(
            label_step, [tuned], label_epochs, label_lr, m, batch_size, gen, pairing, source.dim,
            (lambda s: log(f"negative labels: {s}")) if log else None, "pairing accuracy", optimizer=sgd)
    learned_idx = learned_idx.cpu()
    final = negatives.clone()
    final[learned_idx] = F.normalize(tuned.detach(), dim=-1).cpu()
    learned_mask = torch.zeros(len(negatives))
    learned_mask[learned_idx] = 1.0

    meta = {
        "method": METHOD,
        "backbone": source.backbone,
        "weights": source.identity,
        "model_id": source.model_id,
        "label_set": negl.label_set,
        "class_names": list(names),
        "neglabel": {"num_negatives": num_negatives, "percentile": percentile, "templates": templates,
                     "adj_template": adj_template, "wordnet": str(wordnet) if wordnet else "auto"},
        "negative_words": list(negl.negative_words),
        "synthetic": syn_info,
        "train_split": train_split,
        "train_fingerprint": train_fp,
        "in_rows": in_rows.tolist(),
        "jpeg_quality": JPEG_QUALITY,
        "m": m,
        "M": len(negatives),
        "M_prime": len(learned_idx),
        "temperature": tau,
        "seed": seed,
        "projection": {"kind": projection, "input": layer, "schedule": proj_schedule, "optimizer": "adam", "lr": proj_lr, "weight_decay": weight_decay, "batch_size": batch_size,
                       "epochs": proj_epochs, "history": proj_history},
        "labels": {"optimizer": "sgd", "lr": label_lr, "batch_size": batch_size, "epochs": label_epochs,
                   "history": label_history},
    }
    proj = proj.cpu()
    write_prompt_file(out, {**proj.tensors(), "negatives": final, "negatives_clip": negatives, "learned": learned_mask}, meta)
    last = lambda h: h[-1]["loss"] if h else float("nan")  # noqa: E731
    return SynoodTrainResult(str(out), m, len(in_rows), len(negatives), len(learned_idx), c, last(proj_history),
                             last(label_history), pairing_before, pairing(), time.perf_counter() - t0,
                             {"projection": proj_history, "labels": label_history})
