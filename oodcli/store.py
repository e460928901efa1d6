"""The feature store: one tree of arrays and attributes, on Zarr v3 (default) or HDF5.

Layout (see DESIGN.md)::

    <store>/                      attrs: schema, oodcli_version, benchmark
      splits/<split>/             attrs: role, source, data identity, n
        labels, ids               int64 [N]
        <backbone>/<layer>        [N, ...] float16/float32; group attrs: fingerprint,
                                  complete, rows_done, weights, preprocess, ...
      backbones/<backbone>/head/{weight,bias}
      fitted/<method>/...
      scores/<method>/<split>     float32 [N]

Both backends hold the same tree; plain ``zarr`` / ``h5py`` users can open it.
Attribute values are JSON-serialisable; HDF5 keeps them as JSON strings.

Arrays are written in whole chunks (Zarr writes each chunk file atomically), and a
group's ``complete`` flag is set last, so an interrupted write is never mistaken
for a finished one.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from oodcli import __version__
from oodcli.errors import OodError

SCHEMA_VERSION = 1
TARGET_CHUNK_BYTES = 8 << 20  # ~8 MiB chunks: big enough for fast I/O, small enough to stream


def chunk_rows_for(row_shape: tuple[int, ...], dtype, target: int = TARGET_CHUNK_BYTES) -> int:
    """Rows per chunk so that one chunk is about ``target`` bytes (16..65536 rows)."""
    row_bytes = int(np.prod(row_shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    return int(np.clip(target // max(row_bytes, 1), 16, 65536))


def digest(obj) -> str:
    """A short stable hash of JSON-serialisable values: fingerprints, cache keys, model ids."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def backend_for(path: Path) -> str:
    if path.suffix in {".h5", ".hdf5"}:
        return "hdf5"
    return "zarr"


class Store:
    """A store on disk. Node names are '/'-separated paths from the root."""

    def __init__(self, path: Path, root, backend: str, writable: bool):
        self.path = path
        self._root = root
        self.backend = backend
        self.writable = writable

    # ---- attributes -------------------------------------------------------------
    @property
    def attrs(self) -> dict[str, Any]:
        return self.node_attrs("")

    def node_attrs(self, name: str) -> dict[str, Any]:
        node = self._node(name)
        if self.backend == "hdf5":
            return {k: json.loads(v) for k, v in node.attrs.items()}
        return dict(node.attrs)

    def set_attrs(self, name: str, **values: Any) -> None:
        node = self._node(name)
        if self.backend == "hdf5":
            for k, v in values.items():
                node.attrs[k] = json.dumps(v)
            self._root.flush()
        else:
            node.attrs.update(values)

    # ---- tree -------------------------------------------------------------------
    def exists(self, name: str) -> bool:
        try:
            self._node(name)
            return True
        except KeyError:
            return False

    def is_array(self, name: str) -> bool:
        return self.exists(name) and _is_array(self._node(name))

    def children(self, name: str = "") -> list[str]:
        if not self.exists(name):
            return []
        node = self._node(name)
        if _is_array(node):
            return []
        return sorted(node.keys())

    def walk_arrays(self, name: str = "") -> Iterator[str]:
        """Every array below ``name``, as full node names."""
        for child in self.children(name):
            full = f"{name}/{child}" if name else child
            if self.is_array(full):
                yield full
            else:
                yield from self.walk_arrays(full)

    def require_group(self, name: str):
        self._check_writable()
        return self._root.require_group(name) if name else self._root

    def delete(self, name: str) -> None:
        self._check_writable()
        if not self.exists(name):
            return
        if self.backend == "hdf5":
            del self._root[name]
            self._root.flush()
        else:
            parent, _, leaf = name.rpartition("/")
            del self._node(parent)[leaf]

    # ---- arrays -----------------------------------------------------------------
    def create_array(
        self,
        name: str,
        shape: tuple[int, ...],
        dtype,
        chunk_rows: int | None = None,
        attrs: dict | None = None,
    ):
        """Allocate an array of its full shape, chunked along rows; replaces any old one."""
        self._check_writable()
        self.delete(name)
        parent, _, leaf = name.rpartition("/")
        group = self.require_group(parent)
        rows = chunk_rows or chunk_rows_for(shape[1:], dtype)
        chunks = (max(1, min(rows, shape[0] or 1)),) + tuple(shape[1:])
        if self.backend == "hdf5":
            group.create_dataset(leaf, shape=shape, dtype=dtype, chunks=chunks if shape[0] else None)
        else:
            group.create_array(
                leaf, shape=shape, dtype=dtype, chunks=chunks, compressors=None, fill_value=0
            )
        if attrs:
            self.set_attrs(name, **attrs)

    def write_rows(self, name: str, start: int, data: np.ndarray) -> None:
        arr = self._node(name)
        arr[start : start + len(data)] = data
        if self.backend == "hdf5":
            self._root.flush()

    def write_array(self, name: str, data: np.ndarray, **attrs: Any) -> None:
        """Write a whole (small) array in one go, then mark it complete."""
        data = np.asarray(data)
        self.create_array(name, data.shape, data.dtype)
        if data.size:
            self.write_rows(name, 0, data)
        self.set_attrs(name, complete=True, **attrs)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._node(name).shape)

    def dtype(self, name: str) -> np.dtype:
        return np.dtype(self._node(name).dtype)

    def chunk_rows(self, name: str) -> int:
        node = self._node(name)
        return int(node.chunks[0]) if node.chunks else max(1, self.shape(name)[0])

    def nbytes(self, name: str) -> int:
        return int(np.prod(self.shape(name), dtype=np.int64)) * self.dtype(name).itemsize

    def read(self, name: str, rows: slice | None = None) -> np.ndarray:
        """Read an array (or a row range). Use ``iter_rows`` for anything large."""
        node = self._node(name)
        return np.asarray(node[rows if rows is not None else slice(None)])

    def content_hash(self, *names: str) -> str:
        """sha256 of the arrays' bytes, read chunk by chunk (for arrays that carry no fingerprint)."""
        h = hashlib.sha256()
        for name in names:
            for _, block in self.iter_rows(name):
                h.update(np.ascontiguousarray(block).tobytes())
        return h.hexdigest()[:16]

    def iter_rows(self, name: str, block_rows: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(start, block)`` over the rows, one chunk-aligned block at a time."""
        n = self.shape(name)[0]
        step = block_rows or self.chunk_rows(name)
        for start in range(0, n, step):
            yield start, self.read(name, slice(start, min(n, start + step)))

    # ---- internals --------------------------------------------------------------
    def _node(self, name: str):
        if not name:
            return self._root
        try:
            return self._root[name]
        except (KeyError, FileNotFoundError):
            raise KeyError(name) from None

    def _check_writable(self) -> None:
        if not self.writable:
            raise OodError(f"store {self.path} is open read-only")

    def close(self) -> None:
        if self.backend == "hdf5":
            self._root.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r}, backend={self.backend})"


def _is_array(node) -> bool:
    return hasattr(node, "shape") and hasattr(node, "dtype")


def open_store(path: str | Path, mode: str = "r") -> Store:
    """Open a store: ``'r'`` read-only and ``'r+'`` writable need an existing store;
    ``'a'`` creates one if missing."""
    if mode not in {"r", "r+", "a"}:
        raise ValueError(f"mode must be r, r+ or a, not {mode!r}")
    path = Path(path)
    backend = backend_for(path)
    exists = path.exists()
    if mode in {"r", "r+"} and not exists:
        raise OodError(
            f"no store at {path}; create one with 'oodcli extract ... --store {path}'"
        )
    try:
        if backend == "hdf5":
            import h5py

            root = h5py.File(path, "r" if mode == "r" else "a")
        else:
            import zarr

            root = zarr.open_group(path, mode="r" if mode == "r" else "a", zarr_format=3)
    except OodError:
        raise
    except Exception as exc:  # corrupt files surface as many different library errors
        raise OodError(
            f"cannot open store {path} ({type(exc).__name__}: {_first_line(exc)}); "
            "it may be corrupt or not an oodcli store: check it with 'oodcli store verify' or re-extract"
        ) from None
    store = Store(path, root, backend, writable=mode != "r")
    attrs = store.attrs
    if exists and "schema" not in attrs:
        if mode == "r" or store.children():
            store.close()
            raise OodError(f"{path} is not an oodcli store (no schema attribute); pick another --store path")
    if "schema" in attrs and attrs["schema"] != SCHEMA_VERSION:
        store.close()
        raise OodError(
            f"store {path} has schema {attrs['schema']} but this oodcli reads schema {SCHEMA_VERSION}; "
            "re-extract it with this version"
        )
    if mode != "r" and "schema" not in attrs:
        store.set_attrs("", schema=SCHEMA_VERSION, oodcli_version=__version__)
    return store


def remove_store(path: str | Path) -> None:
    path = Path(path)
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else ""


# ---- the split / backbone view of the tree ---------------------------------------


def split_node(split: str) -> str:
    return f"splits/{split}"


def features_node(split: str, backbone: str) -> str:
    return f"splits/{split}/{backbone}"


def list_splits(store: Store) -> list[str]:
    """Every split in the store: groups under ``splits/`` that hold a ``labels`` array."""
    found: list[str] = []

    def visit(prefix: str) -> None:
        for child in store.children(split_node(prefix) if prefix else "splits"):
            name = f"{prefix}/{child}" if prefix else child
            node = split_node(name)
            if store.is_array(node):
                continue
            if store.is_array(f"{node}/labels"):
                found.append(name)
            else:
                visit(name)

    visit("")
    return found


def list_backbones(store: Store, split: str) -> list[str]:
    node = split_node(split)
    return [c for c in store.children(node) if not store.is_array(f"{node}/{c}")]


def split_role(store: Store, split: str) -> str:
    return store.node_attrs(split_node(split)).get("role", "id")
