"""SynOOD's score (paper 003): NegLabel's score (eq. 2, NegLabel's grouping) with what
``oodcli train synood`` learned: the projection delta on the image features (sec. 3.4) and
the fine-tuned features of the negative labels Y*- (sec. 3.5).

``-p synood.prompts=FILE`` names the trained file (the name every trained-file CLIP scorer
takes). Table 4/5's ablations are switches: ``synood.projection=false`` scores the raw
image features, ``synood.ft_labels=false`` the negatives' CLIP text features; both false
is NegLabel with the file's negatives. Table 4's "Neg Image" vs "Grad Image" is which
synthetic split the file was trained on (``train synood --synthetic SPLIT``), recorded in
the file. The ID prototypes come from the same template as at training time (cached
under ``fitted/text/``); the file must come from the store's CLIP and label set.
"""

from __future__ import annotations

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
        self.weight, self.bias = trained.weight, trained.bias
        return True

    def image_features(self, batch):
        x = _unit(batch["image_embeds"])
        if not self.projection:
            return x
        import torch

        return torch.nn.functional.normalize(x @ self.weight.T + self.bias, dim=-1)

    def release(self) -> None:
        super().release()
        self.trained = self.weight = self.bias = None
