"""Scorers by name. Each family lives in its own module and registers itself on import."""

from oodcli.scorers import (  # noqa: F401
    apex, ash, boundary, cadref, cfood, clip_iim, clip_prompts, clip_synood, clip_zeroshot, ensemble, gmm, gram, grood,
    head, knn, logits, mahalanobis, nci, neco, nnguide, openmax, perturbed, rankfeat, react, relation, she, vim, vra,
)
from oodcli.scorers.base import (
    Scorer,
    describe_scorers,
    get_scorer,
    iter_feature_blocks,
    register,
    scorer_names,
    scorer_params,
)
from oodcli.scorers.base import _REGISTRY
from oodcli.plugins import track

track("scorer", _REGISTRY)  # every built-in family is imported: plugins may add theirs

__all__ = ["Scorer", "describe_scorers", "get_scorer", "iter_feature_blocks", "register", "scorer_names", "scorer_params"]
