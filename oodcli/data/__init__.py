"""Data sources and benchmarks: what ``extract`` reads images from.

``open_source("torchvision:cifar10:test", root)`` opens one source;
``get_benchmark("cifar10").split("ood/near/tin")`` says which source a benchmark
split uses and whether it is ID or OOD. See ``sources`` for the source kinds, ``external``
for a user's own data (Hugging Face datasets, WebDataset shards, CSV / JSON-lines lists).
"""

from oodcli.data.base import (
    DATA_ROOT_ENV,
    ImageDataset,
    SplitDef,
    TransformedDataset,
    data_root,
    open_source,
    register_source,
)
from oodcli.data.benchmarks import Benchmark, get_benchmark, list_benchmarks
from oodcli.data import sources  # noqa: F401  (registers the source kinds; imports no PIL)
from oodcli.data import external  # noqa: F401  (hf:, webdataset:, csv:, jsonl:; imports no datasets)
from oodcli.data.base import _SOURCES
from oodcli.plugins import track

track("data source", _SOURCES)  # every built-in kind is registered: plugins may add theirs

__all__ = [
    "DATA_ROOT_ENV",
    "Benchmark",
    "ImageDataset",
    "SplitDef",
    "TransformedDataset",
    "data_root",
    "get_benchmark",
    "list_benchmarks",
    "open_source",
    "register_source",
]
