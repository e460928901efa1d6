"""Few-shot subsets: the N images per class that the CLIP prompt methods learn from.

One seeded draw serves both ways of getting them: ``extract --shots N --seed S`` stores only
those rows of a split, and ``train coop|locoop|negprompt|iim --shots N --seed S`` picks the same
rows from a whole split, so either path learns the same prompts.

The draw gives every row of the parent data set a seeded 64-bit key (a hash of the seed and the
row's position, so it depends on nothing else: not on numpy's generator streams, the parent's
size or the classes drawn); a class's N shots are its N rows of smallest key. That is a seeded
random permutation of each class, taking its first N, so shot counts nest (the 16-shot subset
holds the 8-shot one, one extraction serves a whole 1-2-4-8-16 sweep) and a subset alone, from
its rows' parent positions (the split's ``ids``), yields any smaller shot count of the same seed.

No torch here: ``extract`` imports this module on a cache hit.
"""

from __future__ import annotations

import math

import numpy as np

from oodcli.data.base import ImageDataset
from oodcli.errors import UsageError
from oodcli.store import digest

_GOLDEN = 0x9E3779B97F4A7C15  # splitmix64's increment


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 values (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def shot_keys(ids: np.ndarray, seed: int) -> np.ndarray:
    """The draw's key of each parent row ``ids`` under ``seed``: uint64, uniform, one per row."""
    with np.errstate(over="ignore"):
        base = _mix(np.array([seed % 2**64], np.uint64))[0]
        return _mix(np.asarray(ids, np.int64).astype(np.uint64) * np.uint64(_GOLDEN) + base)


def class_range(n_classes: int, text: str | None, fraction: float | None = None,
                option: str = "--classes", other: str = "--train-class-fraction") -> list[int]:
    """The classes ``FIRST-LAST`` (inclusive) names, the first ``fraction`` of them, or all."""
    if text and fraction is not None:
        raise UsageError(f"give {option} or {other}, not both")
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise UsageError(f"{other} must be in (0, 1], not {fraction}")
        return list(range(max(1, math.floor(fraction * n_classes + 1e-9))))
    if text:
        first, sep, last = text.partition("-")
        if not (sep and first.strip().isdigit() and last.strip().isdigit()) or int(first) > int(last):
            raise UsageError(f"bad {option} '{text}'; write FIRST-LAST, e.g. 0-99")
        if int(last) >= n_classes:
            raise UsageError(f"{option} {text} is outside the label set (classes 0-{n_classes - 1})")
        return list(range(int(first), int(last) + 1))
    return list(range(n_classes))


def few_shot_rows(labels: np.ndarray, classes: list[int], shots: int, seed: int, names: list[str] | None = None,
                  ids: np.ndarray | None = None) -> np.ndarray:
    """Positions (sorted) of ``shots`` rows of each class in ``classes``: per class, the rows of
    smallest ``shot_keys(ids, seed)``. ``ids`` are the rows' positions in the parent data set
    (default: the rows are the parent); a class with fewer rows than ``shots`` is refused, named.
    The keys of distinct rows differ (the hash is a bijection of the position), so there are no ties."""
    if shots < 1:
        raise UsageError(f"--shots must be at least 1, not {shots}")
    labels = np.asarray(labels, np.int64)
    ids = np.arange(len(labels), dtype=np.int64) if ids is None else np.asarray(ids, np.int64)
    keys = shot_keys(ids, seed)
    by_class = np.argsort(labels, kind="stable")
    grouped = labels[by_class]
    wanted = np.asarray(classes, np.int64)
    starts, stops = np.searchsorted(grouped, wanted, "left"), np.searchsorted(grouped, wanted, "right")
    short = np.flatnonzero(stops - starts < shots)
    if len(short):
        c, count = int(wanted[short[0]]), int(stops[short[0]] - starts[short[0]])
        name = f" ('{names[c]}')" if names is not None and c < len(names) else ""
        more = f" (and {len(short) - 1} more class(es))" if len(short) > 1 else ""
        raise UsageError(f"class {c}{name} has {count} training image(s), fewer than --shots {shots}{more}; lower --shots")
    picked = [np.zeros(0, np.int64)]
    for a, b in zip(starts, stops):
        rows = by_class[a:b]
        picked.append(rows[np.argpartition(keys[rows], shots - 1)[:shots]] if shots < len(rows) else rows)
    return np.sort(np.concatenate(picked))


def span(classes: list[int]) -> str:
    return f"{classes[0]}-{classes[-1]}"


class FewShotDataset(ImageDataset):
    """``shots`` images per class of ``parent`` (seeded, see the module docstring), in the parent's
    row order; ``ids`` are their parent positions (the split's ids). Its identity holds the
    parent's identity, the draw and a digest of the rows, so the fingerprint of its features does."""

    def __init__(self, parent: ImageDataset, shots: int, seed: int, classes: list[int], names: list[str] | None):
        self.parent = parent
        self.ids = few_shot_rows(parent.labels, classes, shots, seed, names)
        self.labels = np.asarray(parent.labels, np.int64)[self.ids]
        self.class_names = parent.class_names
        self.name = f"{parent.name}@shots={shots},seed={seed},classes={span(classes)}"
        #: what the split records (attrs ``few_shot``) and the fingerprint holds
        self.few_shot = {"shots": int(shots), "seed": int(seed), "classes": [classes[0], classes[-1]],
                         "parent": parent.identity(), "parent_n": len(parent), "rows": digest(self.ids.tolist())}

    def load(self, i: int):
        return self.parent.load(int(self.ids[i]))

    def identity(self) -> str:
        return f"{super().identity()}:subset={digest(self.few_shot)}"

    def unreadable(self, start: int = 0, stop: int | None = None) -> list[tuple[str, str]]:
        bad = []
        for r in self.ids[start:stop]:
            bad += self.parent.unreadable(int(r), int(r) + 1)
        return bad

    def content_hash(self) -> str | None:
        files = getattr(self.parent, "files", None)
        if files is None:
            return self.parent.content_hash()
        from oodcli.data.sources import hash_files

        return hash_files([files[int(r)] for r in self.ids])


def few_shot_subset(name: str, role: str, data: ImageDataset, shots: int | None, seed: int | None,
                    classes: str | None, n_classes: int | None = None) -> ImageDataset:
    """``data`` itself (no --shots) or its few-shot subset; bad --shots / --seed / --classes
    refused in one line before anything is written."""
    if shots is None:
        if classes is not None or seed is not None:
            raise UsageError(f"{'--classes' if classes is not None else '--seed'} goes with --shots N "
                             "(a few-shot subset of an ID split)")
        return data
    if shots < 1:
        raise UsageError(f"--shots must be at least 1, not {shots}")
    if role != "id":
        raise UsageError(f"--shots draws few-shot subsets of ID training data; split '{name}' is {role}: "
                         "name only ID splits with --split (e.g. --split train)")
    labels = np.asarray(data.labels, np.int64)
    names = data.class_names
    n_classes = len(names) if names else (n_classes or int(labels.max()) + 1)
    picked = class_range(n_classes, classes)
    return FewShotDataset(data, shots, 0 if seed is None else seed, picked, names)


def describe(held: dict) -> str:
    return f"the {held['shots']}-shot subset (seed {held['seed']}, classes {held['classes'][0]}-{held['classes'][1]})"


def check_replacing(split: str, held: dict | None, new: dict | None) -> None:
    """Refuse, in one line, extracting a few-shot subset over a split holding another subset
    (or a whole split over a subset); --overwrite replaces it."""
    if held == new or (held is None and new is None):
        return
    if held is not None and new is not None:
        same_draw = held["seed"] == new["seed"] and held["classes"] == new["classes"] and held["parent"] == new["parent"]
        hint = (f"; 'train --shots {new['shots']} --seed {new['seed']}' already reads its first {new['shots']} shots"
                if same_draw and new["shots"] < held["shots"] else "")
        raise UsageError(f"split '{split}' holds {describe(held)}, not {describe(new)}{hint}; "
                         "pass --overwrite to replace it (and all made from it)")
    if held is not None:
        raise UsageError(f"split '{split}' holds {describe(held)}, not the whole split; "
                         "pass --overwrite to replace it (and all made from it)")
    raise UsageError(f"split '{split}' holds a whole split, not {describe(new)}; extract the subset into another "
                     "--store, or pass --overwrite to replace the split (and all made from it)")


def rows_for_training(split: str, labels: np.ndarray, ids: np.ndarray, held: dict | None, classes: list[int],
                      shots: int, seed: int, names: list[str] | None) -> np.ndarray:
    """The rows of a split that ``train --shots`` learns from: the draw over the whole split, or
    over a few-shot split the ``shots``-shot prefix of what it holds (the same parent rows); a
    few-shot split refuses another seed, more shots or classes it lacks."""
    if held is not None:
        first, last = held["classes"]
        if seed != held["seed"]:
            raise UsageError(f"split '{split}' holds {describe(held)}; train with --seed {held['seed']}, "
                             f"or extract the subset of seed {seed} (extract --shots {shots} --seed {seed})")
        if shots > held["shots"]:
            raise UsageError(f"split '{split}' holds {describe(held)}, fewer than --shots {shots}; train with "
                             f"--shots {held['shots']} or fewer, or extract --shots {shots} --seed {seed}")
        if classes and (classes[0] < first or classes[-1] > last):
            raise UsageError(f"split '{split}' holds {describe(held)}; train on classes within {first}-{last} "
                             f"(--train-classes), not {span(classes)}")
    return few_shot_rows(labels, classes, shots, seed, names, ids)
