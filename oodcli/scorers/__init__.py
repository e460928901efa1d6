"""Scorers by name. Each family lives in its own module and registers itself on import."""

from oodcli.scorers import apex, ash, clip_iim, clip_prompts, clip_zeroshot, gram, grood, knn, logits, mahalanobis, perturbed, react, vim  # noqa: F401
from oodcli.scorers.base import (
    Scorer,
    describe_scorers,
    get_scorer,
    iter_feature_blocks,
    register,
    scorer_names,
    scorer_params,
)

__all__ = ["Scorer", "describe_scorers", "get_scorer", "iter_feature_blocks", "register", "scorer_names", "scorer_params"]
