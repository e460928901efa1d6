"""Scorers by name. Each family lives in its own module and registers itself on import."""

from oodcli.scorers import logits  # noqa: F401
from oodcli.scorers.base import Scorer, get_scorer, iter_feature_blocks, register, scorer_names

__all__ = ["Scorer", "get_scorer", "iter_feature_blocks", "register", "scorer_names"]
