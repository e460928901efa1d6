"""Zero-shot CLIP scores from the store: MCM, GL-MCM, R-MCM* and NegLabel.

With ``v`` an image's global embedding, ``v_h`` its projected patch tokens and ``t_c`` the
text prototypes of the ID classes (all L2-normalised), ``s = exp(cos / T)``:

- MCM (Ming et al., 2022; eq. 2 of IIM):   max_c softmax_c(cos(v, t_c) / T)
- GL-MCM (Miyai et al.; eq. 3 of IIM):     MCM + max_{h,c} softmax_c(cos(v_h, t_c) / T)
- R-MCM* (eq. 4 of IIM, no negative prompts): MCM + mean of the top-k of softmax_c(cos(v_h, t_c) / T) over (h, c)
- NegLabel (Jiang et al., 2024; eq. 2 of SynOOD): sum_c s(v, t_c) / (sum_c s(v, t_c) + sum_j s(v, n_j)),
  with WordNet negative labels n_j, averaged over random groups of them (NegLabel's grouping).

The patch features ``v_h`` are the ``patch_values`` layer by default: the last ViT block's
value path (its attention's token mixing skipped), then ``ln_post`` and the projection,
which is what the authors' code of GL-MCM, LoCoOp, Local-Prompt and IIM reads (their
modified ``clip/model.py``, after MaskCLIP: the last attention's query-key mixing spreads
each patch over the image, its value embeddings keep the patch's own content).
``local_layer=patch_tokens`` reads the final-layer tokens through ``ln_post`` and
the projection instead: the plain reading of the papers' "local features", and what
stores extracted before ``patch_values`` existed hold. A store without the layer asked for
is refused with the command that makes it; the other layer is never used in its place.

Scores stream through the store block by block (patch tokens are large); the text
prototypes come from ``oodcli.text`` and are cached under ``fitted/text/``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from oodcli import negatives, text
from oodcli.errors import UsageError
from oodcli.scorers.base import Scorer, register
from oodcli.store import Store, digest, features_node

if TYPE_CHECKING:
    import torch


def _unit(x: np.ndarray) -> torch.Tensor:
    """Float32 tensor, re-normalised along the last axis (float16 storage bends unit norms)."""
    import torch  # here, not at the top: listing or running the other scorers must not import torch

    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    return torch.nn.functional.normalize(t, dim=-1)


#: the patch features a local CLIP method can read (``-p METHOD.local_layer=...``); the first is the default
LOCAL_LAYERS = ("patch_values", "patch_tokens")


class _ClipText(Scorer):
    """Shared part: find the features' CLIP, get the class prototypes, stream the split."""

    layers = ("image_embeds",)
    local_layer = LOCAL_LAYERS[0]  # the patch features the local terms read

    def _use_local_layer(self, local_layer: str) -> None:
        """Read the local terms from ``local_layer`` (one of ``LOCAL_LAYERS``)."""
        if local_layer not in LOCAL_LAYERS:
            raise UsageError(f"{self.name}.local_layer must be one of {', '.join(LOCAL_LAYERS)}, not '{local_layer}'")
        self.local_layer = local_layer
        self.layers = ("image_embeds", local_layer)

    def _check_common(self):
        if self.temperature <= 0:
            raise UsageError(f"{self.name}.temperature must be positive, not {self.temperature}")
        text.templates_for(self.templates)

    def prepare(self, store: Store, backbone: str, train_split: str, model_id: str | None) -> str:
        super().prepare(store, backbone, train_split, model_id)
        return "cached" if self.load_text(store, backbone, model_id) else "encoded"

    def load_text(self, store: Store, backbone: str, model_id: str | None) -> bool:
        """Class prototypes from the cache or the text tower; True on a cache hit."""
        source = text.clip_source(store, backbone, model_id)
        encoder = text.TextEncoder(source)
        progress = getattr(self, "progress", None)
        self.prototypes, self.label_set, self.class_names, hit = text.class_prototypes(
            store, source, encoder, self.labels, self.templates, progress
        )
        return self.extra_text(store, source, encoder, progress) and hit

    def extra_text(self, store, source, encoder, progress) -> bool:
        """More text the method needs (NegLabel's negatives); True if it all came from the cache."""
        return True

    def score(self, store: Store, backbone: str, split: str) -> np.ndarray:
        if getattr(self, "prototypes", None) is None:  # used without prepare (library calls)
            self.load_text(store, backbone, store.node_attrs(features_node(split, backbone)).get("model_id"))
        return super().score(store, backbone, split)

    def release(self) -> None:
        self.prototypes = None

    def mcm(self, image_embeds: np.ndarray) -> torch.Tensor:
        import torch

        logits = _unit(image_embeds) @ torch.from_numpy(self.prototypes).T / self.temperature
        return torch.softmax(logits, dim=1).amax(dim=1)

    def local_softmax(self, patches: np.ndarray) -> torch.Tensor:
        """[B, P, C]: for each patch, the softmax over classes of its similarities / T."""
        import torch

        logits = _unit(patches) @ torch.from_numpy(self.prototypes).T / self.temperature
        return torch.softmax(logits, dim=-1)


@register
class MCM(_ClipText):
    """Maximum concept matching: max softmax of the image-text cosine similarities / T (Ming et al., 2022)."""

    name = "mcm"

    def __init__(self, temperature: float = 1.0, templates: str = "photo", labels: str | None = None):
        self.temperature, self.templates, self.labels = float(temperature), templates, labels
        self._check_common()

    def score_batch(self, batch):
        return self.mcm(batch["image_embeds"]).numpy()


@register
class GLMCM(_ClipText):
    """Global-local MCM: MCM plus the largest per-patch class softmax (Miyai et al.)."""

    name = "gl-mcm"
    layers = ("image_embeds", LOCAL_LAYERS[0])

    def __init__(self, temperature: float = 1.0, templates: str = "photo", labels: str | None = None,
                 local_layer: str = LOCAL_LAYERS[0]):
        self.temperature, self.templates, self.labels = float(temperature), templates, labels
        self._use_local_layer(local_layer)
        self._check_common()

    def score_batch(self, batch):
        local = self.local_softmax(batch[self.local_layer]).flatten(1).amax(dim=1)
        return (self.mcm(batch["image_embeds"]) + local).numpy()


@register
class RMCM(_ClipText):
    """R-MCM* (zero-shot, no negative prompts): MCM plus the mean of the top-k per-patch class softmax entries."""

    name = "r-mcm"
    layers = ("image_embeds", LOCAL_LAYERS[0])

    def __init__(self, k: int = 50, temperature: float = 1.0, templates: str = "photo", labels: str | None = None,
                 local_layer: str = LOCAL_LAYERS[0]):
        self.k, self.temperature, self.templates, self.labels = int(k), float(temperature), templates, labels
        if self.k < 1:
            raise UsageError(f"r-mcm.k must be at least 1, not {self.k}")
        self._use_local_layer(local_layer)
        self._check_common()

    def score_batch(self, batch):
        local = self.local_softmax(batch[self.local_layer]).flatten(1)
        if self.k > local.shape[1]:
            raise UsageError(
                f"r-mcm.k={self.k} exceeds the {local.shape[1]} patch-class entries per image; lower it"
            )
        return (self.mcm(batch["image_embeds"]) + local.topk(self.k, dim=1).values.mean(dim=1)).numpy()


@register
class NegLabel(_ClipText):
    """NegLabel: ID-label share of the similarity mass against WordNet negative labels (Jiang et al., 2024)."""

    name = "neglabel"

    def __init__(
        self,
        num_negatives: int = 10000,
        percentile: float = 0.95,
        ngroup: int = 100,
        temperature: float = 0.01,
        templates: str = "The nice {}",  # the authors' 'the nice {}' (CLIP lower-cases): no trailing period
        adj_template: str = "This is a {} photo",
        wordnet: str | None = None,
        labels: str | None = None,
        seed: int = 0,
    ):
        self.num_negatives, self.percentile, self.ngroup = int(num_negatives), float(percentile), int(ngroup)
        self.temperature, self.templates, self.adj_template = float(temperature), templates, adj_template
        self.wordnet, self.labels, self.seed = wordnet, labels, int(seed)
        if self.ngroup < 1 or self.num_negatives // self.ngroup < 1:
            raise UsageError(
                f"neglabel.ngroup must be between 1 and num_negatives ({self.num_negatives}), not {self.ngroup}"
            )
        if adj_template.count("{}") != 1:
            raise UsageError("neglabel.adj_template needs exactly one '{}'")
        self._check_common()
        if len(text.templates_for(templates)) != 1:
            raise UsageError("neglabel.templates must be one prompt (e.g. 'The nice {}'): negatives are mined with it too")

    def extra_text(self, store, source, encoder, progress) -> bool:
        """The mined negative labels, cached beside the class prototypes they were mined against."""
        noun_template = text.templates_for(self.templates)[0]  # the nouns read like the ID labels
        key = {
            "weights": source.identity,
            "names": digest(self.class_names),
            "noun_template": noun_template,
            "adj_template": self.adj_template,
            "num_negatives": self.num_negatives,
            "percentile": self.percentile,
            "wordnet": str(self.wordnet) if self.wordnet else "auto",
        }
        node = text.text_node(source.backbone, self.label_set, "neglabel")
        hit = text.read_cached(store, node, key)
        if hit is not None:
            self.negatives, self.negative_words = hit[0], hit[1]["words"]
        else:
            vocab = negatives.load_vocabulary(self.wordnet)
            nouns, adjs = vocab.candidates(exclude=self.class_names)
            words, emb, n_nouns = negatives.mine_negative_labels(
                encoder, self.prototypes, nouns, adjs, self.num_negatives, self.percentile,
                noun_template, self.adj_template, progress,
            )
            text.write_cached(store, node, key, emb, words=words, nouns=n_nouns,
                              wordnet_source=vocab.source, candidates=len(nouns) + len(adjs))
            self.negatives, self.negative_words = emb, words
        self.group_negatives()
        return hit is not None

    def group_negatives(self) -> None:
        """NegLabel's grouping: a fixed random split of ``self.negatives`` into ngroup equal groups."""
        import torch

        size = len(self.negatives) // self.ngroup
        order = np.random.default_rng(self.seed).permutation(len(self.negatives))[: size * self.ngroup]
        self.grouped = torch.from_numpy(np.ascontiguousarray(self.negatives[order]))

    def release(self) -> None:
        super().release()
        self.negatives = self.grouped = None

    def image_features(self, batch) -> torch.Tensor:
        """The unit image features the labels are compared with (SynOOD projects them first)."""
        return _unit(batch["image_embeds"])

    def score_batch(self, batch):
        import torch

        x = self.image_features(batch)
        pos = torch.logsumexp(x @ torch.from_numpy(self.prototypes).T / self.temperature, dim=1)
        neg = (x @ self.grouped.T / self.temperature).reshape(len(x), self.ngroup, -1)
        neg = torch.logsumexp(neg, dim=2)
        # sum_c s_c / (sum_c s_c + sum_j s_j) = sigmoid(logsumexp(pos) - logsumexp(neg)), per group
        return torch.sigmoid(pos[:, None] - neg).mean(dim=1).numpy()
