"""Benchmarks are data: one JSON file each under ``oodcli/data/benchmarks/``.

A file names the ID classes and maps every split (``train``, ``test``,
``ood/near/<set>``, ``ood/far/<set>``...) to a source spec and a role, so adding a
benchmark means adding a file, not code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from oodcli.data.base import ImageDataset, SplitDef, open_source
from oodcli.errors import OodError, UsageError

BENCHMARK_DIR = Path(__file__).with_name("benchmarks")
#: ``ood``, ``ood-near`` and ``ood-far`` splits are OOD test sets; ``ood-val`` is OOD data held out
#: for choosing hyperparameters (``oodcli sweep``); ``synthetic`` holds generated OOD images
#: (SynOOD) used for training. All three kinds of OOD carry labels -1; score and report never
#: count ``ood-val`` or ``synthetic`` as a test set. ``csid`` splits are covariate-shifted ID
#: (full-spectrum OOD, ``report --fsood``): they keep their class labels and are scored like OOD sets.
ROLES = ("id", "ood-near", "ood-far", "ood", "ood-val", "synthetic", "csid")


@dataclass(frozen=True)
class Benchmark:
    name: str
    num_classes: int
    #: the ID class names in label order: a list, a path to a file with one name per
    #: line (relative to the benchmarks folder or the data root), or None
    class_names: list[str] | str | None
    description: str
    splits: list[SplitDef] = field(default_factory=list)
    #: the names CLIP prompts are built from, when they differ from ``class_names`` (CLIP's
    #: cleaned ImageNet list): a list, a names file, {"file": ..., "rows": [start, stop]} or,
    #: for scattered classes, {"file": ..., "indices": [row, row, ...]} (rows in label order)
    prompt_names: list[str] | str | dict | None = None

    def split(self, name: str) -> SplitDef:
        for s in self.splits:
            if s.name == name:
                return s
        raise UsageError(
            f"benchmark '{self.name}' has no split '{name}'; use one of: "
            f"{', '.join(s.name for s in self.splits)}"
        )

    def split_names(self, role_prefix: str = "") -> list[str]:
        """Split names in file order, e.g. ``split_names("ood")`` for every OOD split."""
        return [s.name for s in self.splits if s.role.startswith(role_prefix)]

    def open(self, split: str, root: Path) -> ImageDataset:
        """The data set behind a split, labels -1 when the split is OOD."""
        s = self.split(split)
        return open_source(s.source, root, s.is_ood)

    def resolve_class_names(self, root: Path | None = None) -> list[str] | None:
        """The class names as a list, reading the names file when one is named."""
        if not isinstance(self.class_names, str):
            return self.class_names
        candidates = [BENCHMARK_DIR / self.class_names]
        if root is not None:
            candidates.append(Path(root) / self.class_names)
        for path in candidates:
            if path.is_file():
                names = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
                if len(names) != self.num_classes:
                    raise OodError(f"{path} lists {len(names)} class names; expected {self.num_classes}")
                return names
        raise OodError(f"class names file '{self.class_names}' of benchmark '{self.name}' not found")

    def resolve_prompt_names(self, root: Path | None = None) -> list[str] | None:
        """The class names for text prompts (CLIP), falling back to ``class_names``."""
        spec = self.prompt_names
        if spec is None:
            return self.resolve_class_names(root)
        if isinstance(spec, list):
            return spec
        file, rows = (spec["file"], spec.get("rows")) if isinstance(spec, dict) else (spec, None)
        path = BENCHMARK_DIR.parent / file  # shipped beside the benchmark files, in oodcli/data
        if not path.is_file():
            raise OodError(f"prompt names file '{file}' of benchmark '{self.name}' not found")
        names = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
        indices = spec.get("indices") if isinstance(spec, dict) else None
        if indices is not None:
            bad = [i for i in indices if not 0 <= i < len(names)]
            if bad:
                raise OodError(f"{path} has no row {bad[0]} for the prompt names of benchmark '{self.name}'")
            names = [names[i] for i in indices]
        names = names[rows[0] : rows[1]] if rows else names
        if len(names) != self.num_classes:
            raise OodError(f"{path} gives {len(names)} prompt names to benchmark '{self.name}'; expected {self.num_classes}")
        return names


def _parse(path: Path) -> Benchmark:
    """Read and check one benchmark file; a malformed file is a bug in the package."""
    doc = json.loads(path.read_text())
    splits = [SplitDef(s["name"], s["role"], s["source"], bool(s.get("optional", False))) for s in doc["splits"]]
    names = [s.name for s in splits]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: duplicate split names")
    bad = [s.role for s in splits if s.role not in ROLES]
    if bad:
        raise ValueError(f"{path}: unknown roles {bad}; use {ROLES}")
    class_names = doc.get("class_names")
    if isinstance(class_names, list) and len(class_names) != doc["num_classes"]:
        raise ValueError(f"{path}: {len(class_names)} class names for {doc['num_classes']} classes")
    return Benchmark(
        name=doc["name"],
        num_classes=int(doc["num_classes"]),
        class_names=class_names,
        description=doc.get("description", ""),
        splits=splits,
        prompt_names=doc.get("prompt_names"),
    )


@lru_cache(maxsize=None)
def _all() -> dict[str, Benchmark]:
    out = {}
    for path in sorted(BENCHMARK_DIR.glob("*.json")):
        bench = _parse(path)
        if bench.name != path.stem:
            raise ValueError(f"{path}: name '{bench.name}' differs from the file name")
        out[bench.name] = bench
    return out


def list_benchmarks() -> list[str]:
    """Names of the shipped benchmarks, sorted."""
    return sorted(_all())


def get_benchmark(name: str) -> Benchmark:
    try:
        return _all()[name]
    except KeyError:
        raise UsageError(f"unknown benchmark '{name}'; use one of: {', '.join(list_benchmarks())}") from None
