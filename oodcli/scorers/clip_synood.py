"""SynOOD's score (paper 003): NegLabel's score (eq. 2, NegLabel's grouping) with what
``oodcli train synood`` learned: the projection delta on the image features (sec. 3.4) and
the fine-tuned features of the negative labels Y*- (sec. 3.5).

The projection reads what it was trained on: the authors' residual block reads the unnormalised
CLIP feature (the store's ``penultimate``), the linear map the unit ``image_embeds``; the
file records which (``oodcli.train.synood``), so the layers this scorer needs follow the file.

``-p synood.prompts=FILE`` names the trained file (the name every trained-file CLIP scorer
takes). Table 4/5's ablations are switches: ``synood.projection=false`` scores the raw
image features, ``synood.ft_labels=false`` the negatives' CLIP text features; both false
is NegLabel with the file's negatives. Table 4's "Neg Image" vs "Grad Image" is which
synthetic split the file was trained on (``train synood --synthetic SPLIT``), recorded in
the file. The ID prototypes come from the same template as at training time (cached
under ``fitted/text/``); the file must come from the store's CLIP and label set.
"""

from __future__ import annotations

import numpy as np

from oodcli import text
from oodcli.errors import UsageError
from oodcli.scorers.base import register
from oodcli.scorers.clip_zeroshot import NegLabel, _unit
from oodcli.store import Store


@register
class SynOOD(NegLabel):
    """SynOOD: NegLabel's score with a trained image projection and fine-tuned negative labels (Li et al., 2025)."""

    name = "synood"

    def __init__(
        self,
        prompts: str | None = None,
        projection: bool = True,
        ft_labels: bool = True,
        ngroup: int = 100,
        temperature: float = 0.01,
        labels: str | None = None,
        seed: int = 0,
    ):
        for flag, value in (("projection", projection), ("ft_labels", ft_labels)):
            if not isinstance(value, bool):
                raise UsageError(f"synood.{flag} must be true or false, not {value!r}")
        self.prompts, self.projection, self.ft_labels, self.labels = prompts, projection, ft_labels, labels
        self.ngroup, self.temperature, self.seed = int(ngroup), float(temperature), int(seed)
        if self.ngroup < 1:
            raise UsageError(f"synood.ngroup must be at least 1, not {self.ngroup}")
        if self.temperature <= 0:
            raise UsageError(f"synood.temperature must be positive, not {self.temperature}")
        self.templates = "The nice {}"  # the file's NegLabel template replaces it
        if prompts is not None and projection:
            layer = _projection_input(prompts)
            if layer and layer not in self.layers:
                self.layers = (*self.layers, layer)

    def applicable(self, store: Store, backbone: str, train_split: str) -> bool:
        """Needs synood.prompts=FILE from 'oodcli train synood'."""
        return self.prompts is not None

    def check_inputs(self, store: Store, backbone: str, train_split: str, model_id: str | None) -> None:
        self._file(store, backbone, model_id)

    def _file(self, store: Store, backbone: str, model_id: str | None):
        from oodcli.train.synood import check_synood_fit, read_synood_file

        if self.prompts is None:
            raise UsageError("synood needs a trained file: --param synood.prompts=FILE (from 'oodcli train synood')")
        source = text.clip_source(store, backbone, model_id)
        _, names = text.label_set(store, self.labels)
        trained = read_synood_file(self.prompts)
        check_synood_fit(trained, source, names)
        if len(trained.negatives) // self.ngroup < 1:
            raise UsageError(
                f"synood.ngroup must be between 1 and the file's {len(trained.negatives)} negative labels, not {self.ngroup}"
            )
        return trained

    def load_text(self, store: Store, backbone: str, model_id: str | None) -> bool:
        self.trained = self._file(store, backbone, model_id)
        self.templates = self.trained.meta["neglabel"]["templates"]
        return super().load_text(store, backbone, model_id)

    def extra_text(self, store, source, encoder, progress) -> bool:
        """The negatives from the file (fine-tuned or as CLIP made them), grouped as NegLabel groups them."""
        trained = self.trained
        negs = trained.negatives if self.ft_labels else trained.negatives_clip
        self.negatives, self.negative_words = negs.numpy(), trained.meta.get("negative_words")
        self.group_negatives()
        return True

    def image_features(self, batch):
        if not self.projection:
            return _unit(batch["image_embeds"])
        import torch

        layer = self.trained.projection_input
        with torch.no_grad():
            return self.trained.projection(torch.from_numpy(np.ascontiguousarray(batch[layer], dtype=np.float32)))

    def release(self) -> None:
        super().release()
        self.trained = None


def _projection_input(path: str) -> str | None:
    """The layer a SynOOD file's projection reads, from its metadata alone; None when the file cannot
    be read (the scorer's input check then says why in one line)."""
    import json

    from safetensors import safe_open

    from oodcli.train.prompts import META_KEY
    from oodcli.train.synood import PROJECTION_INPUT, projection_kind

    try:
        with safe_open(str(path), "np") as f:
            meta = json.loads((f.metadata() or {}).get(META_KEY) or "{}")
        return PROJECTION_INPUT.get(projection_kind(meta))
    except Exception:  # noqa: BLE001 - any unreadable file is reported by check_inputs
        return None
