"""Scores that combine several backbones of one store: the deep ensemble (Lakshminarayanan et al., 2017).

A multi-backbone method is named with its members, ``oodcli score ensemble --backbone a,b,c``;
the scoring flow checks every member as it checks one backbone (its layers on every split, one
model per member) and that the members' layers agree in shape, then hands the scorer the list.
Its scores go where one backbone's would (``scores/<method>/<split>``), the members recorded.
"""

from __future__ import annotations

import numpy as np

from oodcli.scorers.base import Scorer, iter_feature_blocks, register, split_members
from oodcli.scorers.logits import softmax
from oodcli.store import features_node


@register
class Ensemble(Scorer):
    """Deep ensemble: max of the members' mean softmax, one member per backbone (Lakshminarayanan et al., 2017).

    The members are the backbones ``--backbone a,b,c`` names, e.g. networks of one architecture
    trained from different seeds, extracted into one store; each member's softmax is taken in
    float64 and the M of them averaged with equal weights, as in the paper's predictive
    distribution (OpenOOD's ensemble postprocessor does the same over its checkpoints). The
    logits are read chunk by chunk, all members in step.
    """

    name = "ensemble"
    multi_backbone = True

    def __init__(self):
        pass

    def score(self, store, backbone, split):
        members = split_members(backbone)
        nodes = [f"{features_node(split, m)}/logits" for m in members]
        step = min(store.chunk_rows(node) for node in nodes)
        advance = self.progress(f"{self.name}: score {split}", store.shape(nodes[0])[0])
        streams = [iter_feature_blocks(store, m, split, self.layers, block_rows=step) for m in members]
        out = []
        for blocks in zip(*streams):
            mean = np.mean([softmax(b["logits"].astype(np.float64), axis=1) for b in blocks], axis=0)
            out.append(mean.max(axis=1))
            advance(len(mean))
        return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)
