"""Scores with learned prompts (``oodcli train coop|locoop|negprompt``), streamed from the store.

- ``coop``: MCM (max softmax_c cos(v, t_c) / T) with CoOp's learned class prompts.
- ``locoop``: GL-MCM with the learned prompts, as LoCoOp scores.
- ``negprompt``: NegPrompt eq. 3, s(x) = max_i exp(S_i) / (sum_j exp(S_j) + sum_l sum_j exp(S_lj)),
  with S = cos / T over the positive and the p negative prompts of every class. T = 1 by
  default: the paper scores "with the MCM scoring approach" (sec. 3.2.3), MCM uses T = 1,
  and the authors' test code divides the logits by CLIP's logit scale before the softmax.
  ``-p negprompt.temperature=0.01`` scores at the training tau of OpenAI's CLIP instead
  (1 / logit scale, recorded as ``temperature`` in the prompt file).

The prompt file names its CLIP and the classes it learned from; it is refused for
features of another CLIP or a label set without those classes. Classes it never saw take
the learned context too (the open-vocabulary setting). The text features of a (prompt
file, label set) pair are cached under ``fitted/text/<backbone>/<label set>/prompts-<hash>``.
"""

from __future__ import annotations

import numpy as np

from oodcli import text
from oodcli.errors import UsageError
from oodcli.scorers.base import register
from oodcli.scorers.clip_zeroshot import LOCAL_LAYERS, _ClipText, _unit
from oodcli.store import Store, digest


class _Prompted(_ClipText):
    """Shared part: the prompt file, checked against the store's CLIP and label set, and its cached features."""

    uses_negatives = False

    def __init__(self, prompts: str | None = None, temperature: float | None = 1.0, labels: str | None = None):
        self.prompts, self.labels = prompts, labels
        self.temperature = None if temperature is None else float(temperature)
        if self.temperature is not None and self.temperature <= 0:
            raise UsageError(f"{self.name}.temperature must be positive, not {self.temperature}")

    def applicable(self, store: Store, backbone: str, train_split: str) -> bool:
        """Needs METHOD.prompts=FILE from 'oodcli train'."""
        return self.prompts is not None

    def check_inputs(self, store: Store, backbone: str, train_split: str, model_id: str | None) -> None:
        self._prompt_file(store, backbone, model_id)

    def _prompt_file(self, store: Store, backbone: str, model_id: str | None):
        from oodcli.train.prompts import check_prompts_fit, read_prompt_file

        if self.prompts is None:
            raise UsageError(f"{self.name} needs learned prompts: --param {self.name}.prompts=FILE (from 'oodcli train')")
        source = text.clip_source(store, backbone, model_id)
        label_set, names = text.label_set(store, self.labels)
        prompts = read_prompt_file(self.prompts)
        if self.uses_negatives and prompts.neg_ctx is None:
            raise UsageError(
                f"{self.prompts} holds {prompts.method} prompts without negative ones; "
                "make them with 'oodcli train negprompt --positive FILE'"
            )
        check_prompts_fit(prompts, source, names)
        return source, label_set, names, prompts

    def load_text(self, store: Store, backbone: str, model_id: str | None) -> bool:
        from oodcli.train.prompts import prompt_features

        source, label_set, names, prompts = self._prompt_file(store, backbone, model_id)
        key = {"weights": source.identity, "names": digest(names), "prompts": prompts.sha256}
        node = text.text_node(source.backbone, label_set, f"prompts-{prompts.sha256[:12]}")
        hit = text.read_cached(store, node, key)
        if hit is not None:
            embeds = hit[0]
        else:
            pos, neg = prompt_features(prompts, source, names)
            embeds = pos if neg is None else np.concatenate([pos, neg.reshape(-1, pos.shape[1])])
            text.write_cached(store, node, key, embeds, class_names=names, method=prompts.method,
                              prompt_file=prompts.path, negative_prompts=0 if neg is None else len(neg))
        c = len(names)
        self.prototypes = np.ascontiguousarray(embeds[:c])
        self.negatives = np.ascontiguousarray(embeds[c:]) if len(embeds) > c else None
        self.trained_temperature = prompts.meta.get("temperature")
        self.label_set, self.class_names = label_set, names
        return hit is not None

    def release(self) -> None:
        super().release()
        self.negatives = None


@register
class CoOp(_Prompted):
    """CoOp: MCM with prompts learned few-shot (Zhou et al., 2022), as CoOp is scored for OOD."""

    name = "coop"

    def score_batch(self, batch):
        return self.mcm(batch["image_embeds"]).numpy()


@register
class LoCoOp(_Prompted):
    """LoCoOp: GL-MCM with prompts learned with local OOD regularisation (Miyai et al., 2023).

    The local term reads ``local_layer``: ``patch_values`` (the last block's value path, as
    LoCoOp's code) by default, ``patch_tokens`` (the final-layer tokens) as the option. A
    LoCoOp prompt file is scored on the layer it was trained on only.
    """

    name = "locoop"
    layers = ("image_embeds", LOCAL_LAYERS[0])

    def __init__(self, prompts: str | None = None, temperature: float | None = 1.0, labels: str | None = None,
                 local_layer: str = LOCAL_LAYERS[0]):
        super().__init__(prompts, temperature, labels)
        self._use_local_layer(local_layer)

    def _prompt_file(self, store: Store, backbone: str, model_id: str | None):
        from oodcli.train.prompts import check_local_layer

        found = super()._prompt_file(store, backbone, model_id)
        check_local_layer(found[3], self.local_layer, f"{self.name}.local_layer")
        return found

    def score_batch(self, batch):
        local = self.local_softmax(batch[self.local_layer]).flatten(1).amax(dim=1)
        return (self.mcm(batch["image_embeds"]) + local).numpy()


@register
class NegPrompt(_Prompted):
    """NegPrompt: the top positive share of a softmax over positive and learned negative prompts (Li et al., 2024)."""

    name = "negprompt"
    uses_negatives = True

    def __init__(self, prompts: str | None = None, temperature: float = 1.0, labels: str | None = None):
        super().__init__(prompts, temperature, labels)

    def score_batch(self, batch):
        import torch

        tau = self.temperature
        x = _unit(batch["image_embeds"])
        pos = x @ torch.from_numpy(self.prototypes).T / tau
        neg = x @ torch.from_numpy(self.negatives).T / tau
        # softmax over [positives, negatives], the largest positive entry: max_i exp(S_i) / sum(all)
        return torch.exp(pos.amax(dim=1) - torch.logsumexp(torch.cat([pos, neg], dim=1), dim=1)).numpy()
