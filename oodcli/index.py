"""faiss nearest-neighbour indexes over 2-D arrays of the store (features or gradients).

An index is built from one store array, read chunk by chunk, and kept in the store
at ``index/<name>`` as the bytes of ``faiss.serialize_index`` (a uint8 array). Its
attributes say what it was built from (source array, that array's fingerprint and
row count) and how (kind, nlist, nprobe), so a reader can refuse an index made from
other data instead of returning wrong neighbours.

Two kinds, both on squared L2 distances: ``flat`` (exact search, ``IndexFlatL2``)
and ``ivf`` (``IndexIVFFlat``: vectors sorted into ``nlist`` k-means cells, a query
visits the ``nprobe`` nearest cells; exact when ``nprobe == nlist``). ``auto`` picks
flat for small sets, where IVF saves nothing. Building and searching run on a GPU
when the installed faiss sees one; the stored copy is always the CPU form.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Iterable, Iterator

import numpy as np

from oodcli import __version__
from oodcli.errors import OodError, UsageError
from oodcli.store import Store, check_name

KINDS = ("auto", "ivf", "flat")
FLAT_BELOW = 20_000  # 'auto' searches sets smaller than this exactly
TRAIN_PER_LIST = 64  # k-means sample for IVF: this many rows per cell (faiss asks for 39..256)

Progress = Callable[[str, int], Callable[[int], None]]


def _no_progress(description: str, total: int) -> Callable[[int], None]:
    return lambda rows: None


def index_node(name: str) -> str:
    return f"index/{name}"


def default_nlist(rows: int) -> int:
    """About sqrt(rows) cells: 224 for 50k rows, 316 for 100k, 1000 for 1M."""
    return max(1, min(rows, round(math.sqrt(rows))))


def default_nprobe(nlist: int) -> int:
    """Visit 1/16 of the cells (at least 8). On benchmarks/grood.py's gradients: recall@1
    0.98 at 100k rows and 0.996 at 1M, the neighbour found at most 0.03% farther on
    average, AUROC as with exact search."""
    return min(nlist, max(8, math.ceil(nlist / 16)))


def resolve(rows: int, kind: str = "auto", nlist: int | None = None, nprobe: int | None = None) -> dict:
    """The concrete kind, nlist and nprobe for ``rows`` vectors (defaults filled in, checked)."""
    if kind not in KINDS:
        raise UsageError(f"unknown index kind '{kind}'; use one of {', '.join(KINDS)}")
    if kind == "auto":
        kind = "ivf" if rows >= FLAT_BELOW or nlist is not None else "flat"
    if kind == "flat":
        if nlist is not None or nprobe is not None:
            raise UsageError("--nlist and --nprobe go with --kind ivf; a flat index searches every row")
        return {"kind": "flat", "nlist": None, "nprobe": None}
    nlist = int(nlist) if nlist is not None else default_nlist(rows)
    if not 1 <= nlist <= rows:
        raise UsageError(f"--nlist {nlist} must be between 1 and the {rows} rows to index; or use --kind flat")
    nprobe = int(nprobe) if nprobe is not None else default_nprobe(nlist)
    if nprobe < 1:
        raise UsageError(f"--nprobe must be at least 1, not {nprobe}")
    return {"kind": "ivf", "nlist": nlist, "nprobe": min(nprobe, nlist)}


# ---- building and searching (no store involved) -------------------------------------------


def gpu_available() -> bool:
    import faiss

    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


_GPU: list = []  # one StandardGpuResources, kept alive for every GPU index


def to_gpu(index):
    """The same index on GPU 0 when faiss sees a GPU, else the index unchanged."""
    if not gpu_available():
        return index
    import faiss

    if not _GPU:
        _GPU.append(faiss.StandardGpuResources())
    return faiss.index_cpu_to_gpu(_GPU[0], 0, index)


def to_cpu(index):
    import faiss

    return faiss.index_gpu_to_cpu(index) if gpu_available() else index


def _f32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def build(
    blocks: Callable[[], Iterable[np.ndarray]],
    rows: int,
    dim: int,
    kind: str = "auto",
    nlist: int | None = None,
    nprobe: int | None = None,
    seed: int = 0,
    advance: Callable[[int], None] = lambda n: None,
):
    """An index over the rows that ``blocks()`` yields; ``blocks`` is called once more for
    IVF, to draw the k-means sample. Returns it on the GPU when there is one."""
    import faiss

    cfg = resolve(rows, kind, nlist, nprobe)
    if cfg["kind"] == "flat":
        index = to_gpu(faiss.IndexFlatL2(dim))
    else:
        index = to_gpu(faiss.index_factory(dim, f"IVF{cfg['nlist']},Flat"))
        sample = _sample_rows(blocks(), rows, cfg["nlist"] * TRAIN_PER_LIST, seed)
        index.train(sample)
        set_nprobe(index, cfg["nprobe"])
    for block in blocks():
        index.add(_f32(block))
        advance(len(block))
    return index


def _sample_rows(blocks: Iterable[np.ndarray], rows: int, want: int, seed: int) -> np.ndarray:
    """About ``want`` rows drawn uniformly in one streamed pass (all rows when there are fewer)."""
    rng = np.random.default_rng(seed)
    keep = min(1.0, want / max(rows, 1))
    picked = [b if keep >= 1.0 else b[rng.random(len(b)) < keep] for b in blocks]
    return _f32(np.concatenate(picked))


def set_nprobe(index, nprobe: int) -> None:
    import faiss

    space = faiss.GpuParameterSpace() if type(index).__name__.startswith("Gpu") else faiss.ParameterSpace()
    space.set_index_parameter(index, "nprobe", int(nprobe))


def search(index, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(L2 distances, row ids) of the k nearest indexed rows, nearest first; [N, k] each."""
    sq, ids = index.search(_f32(queries), int(k))
    return np.sqrt(np.maximum(sq, 0.0)), ids


# ---- indexes kept in the store ---------------------------------------------------------------


def array_fingerprint(store: Store, name: str) -> str:
    """What identifies an array's content: its own ``fingerprint`` attribute (gradients),
    else its group's extraction fingerprint (feature layers), else a hash of its bytes;
    with the row count."""
    rows = store.shape(name)[0]
    own = store.node_attrs(name).get("fingerprint")
    if own:
        return f"{own}:{rows}"
    parent, _, leaf = name.rpartition("/")
    group = store.node_attrs(parent).get("fingerprint") if parent else None
    if group:
        return f"{group}:{leaf}:{rows}"
    return f"sha256:{store.content_hash(name)}:{rows}"


def check_source(store: Store, source: str) -> tuple[int, int]:
    """Refuse a source that is missing, unfinished or not a 2-D float array; return (rows, dim)."""
    if not store.is_array(source):
        raise OodError(f"store {store.path} has no array '{source}' to index (e.g. grads/grood/train "
                       "after 'oodcli synthesize grood', or splits/train/<backbone>/penultimate)")
    shape, dtype = store.shape(source), store.dtype(source)
    if len(shape) != 2 or dtype.kind != "f":
        raise OodError(f"'{source}' is {dtype} {shape}; an index needs a 2-D float array [rows, dim]")
    parent = source.rpartition("/")[0]
    flags = [store.node_attrs(source).get("complete"), store.node_attrs(parent).get("complete") if parent else None]
    if False in flags or flags == [None, None]:
        raise OodError(f"'{source}' is not completely written; re-run the command that makes it")
    if shape[0] == 0:
        raise OodError(f"'{source}' has no rows to index")
    return shape


def build_in_store(
    store: Store,
    source: str,
    name: str | None = None,
    kind: str = "auto",
    nlist: int | None = None,
    nprobe: int | None = None,
    progress: Progress = _no_progress,
) -> dict:
    """Build an index over ``source`` and write it to ``index/<name>`` (default: the source's
    own name); returns its attributes plus the build time."""
    check_name(source, "--source")
    name = check_name(name or source, "--name")
    rows, dim = check_source(store, source)
    cfg = resolve(rows, kind, nlist, nprobe)
    fingerprint = array_fingerprint(store, source)
    t0 = time.perf_counter()

    def blocks() -> Iterator[np.ndarray]:
        for _, block in store.iter_rows(source):
            yield block

    advance = progress(f"index {name}", rows)
    index = build(blocks, rows, dim, **cfg, advance=advance)
    data = faiss_bytes(to_cpu(index))
    attrs = {
        "source": source,
        "source_fingerprint": fingerprint,
        "rows": int(rows),
        "dim": int(dim),
        **cfg,
        "metric": "l2",
        "oodcli_version": __version__,
    }
    with store.transaction() as txn:  # replaces an older index of that name whole
        store.write_array(txn.stage(index_node(name)), data, **attrs)
    return {"name": name, **attrs, "seconds": time.perf_counter() - t0}


def faiss_bytes(index) -> np.ndarray:
    import faiss

    return faiss.serialize_index(index)


def stored_attrs(store: Store, name: str) -> dict:
    """What ``index/<name>`` was built from and how, or a one-line error if there is none."""
    node = index_node(name)
    attrs = store.node_attrs(node) if store.is_array(node) else {}
    if not attrs.get("complete"):
        raise OodError(f"store {store.path} has no index '{name}'; build it with "
                       f"'oodcli index --store {store.path} --source SOURCE'")
    return attrs


def load(store: Store, name: str) -> tuple[object, dict]:
    """The index stored as ``index/<name>`` (on the GPU when there is one) and its attributes."""
    import faiss

    attrs = stored_attrs(store, name)
    index = faiss.deserialize_index(np.ascontiguousarray(store.read(index_node(name)), dtype=np.uint8))
    if attrs.get("kind") == "ivf":
        set_nprobe(index, attrs["nprobe"])
    return to_gpu(index), attrs


def check_built_from(store: Store, name: str, attrs: dict, source: str) -> None:
    """Refuse an index that was not built from ``source`` as it is now."""
    how = f"rebuild it with 'oodcli index --store {store.path} --source {source}'"
    if attrs.get("source") != source:
        raise OodError(f"index '{name}' was built from '{attrs.get('source')}', not from '{source}'; {how}")
    if attrs.get("source_fingerprint") != array_fingerprint(store, source):
        raise OodError(f"index '{name}' was built from another version of '{source}' "
                       f"(it changed since); {how}")
