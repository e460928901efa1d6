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

What a crash can and cannot do (the guarantees the README states):

- Whole nodes (a split's labels + ids, a method's scores and fitted state, an index,
  a text cache...) are written through a :class:`Transaction`: built under the hidden
  ``.txn/`` group, then moved into place after one commit marker. A crash before the
  marker leaves the store as it was (the staging is dropped by the next open); a crash
  after it is finished by the next open (roll forward). Readers never see half a node.
- Extraction fills its arrays in place, chunk by chunk, with ``rows_done`` advanced
  only after a chunk is on disk, so a resumed extraction equals an uninterrupted one.
- Every array chunk carries a checksum (crc32c in Zarr, fletcher32 in HDF5) and every
  chunk is written, so a truncated, altered or missing chunk is an error, never zeros.
- One writer at a time: writers hold an exclusive lock (``.<store name>.lock`` beside
  the store); a second writer is refused with one line.
- Ctrl-C is held back while a store operation runs, so it lands between operations.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import threading
import uuid
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from oodcli import __version__
from oodcli.errors import OodError, UsageError

SCHEMA_VERSION = 1
TARGET_CHUNK_BYTES = 8 << 20  # ~8 MiB chunks: big enough for fast I/O, small enough to stream
TXN_ROOT = ".txn"  # hidden staging area of transactions
KILL_ENV = "OODCLI_TEST_KILL_AT"  # test hook: SIGKILL this process before its N-th store mutation


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


# ---- names ---------------------------------------------------------------------------

_RESERVED = {"zarr.json", ".zgroup", ".zarray", ".zattrs", "c"}
_BAD_CHARS = re.compile(r"[\\\x00-\x1f\x7f]")


def check_name(name: str, what: str = "name") -> str:
    """The one rule for every name that becomes a node (split, --as name, index name, ...):
    '/'-separated non-empty parts, none of them '.', '..' or starting with '.', no
    surrounding spaces, no backslash or control characters. Returns the name."""
    problem = None
    if not isinstance(name, str) or not name:
        problem = "it is empty"
    elif name.startswith("/") or name.endswith("/"):
        problem = "it starts or ends with '/'"
    elif "//" in name:
        problem = "it has an empty part ('//')"
    elif _BAD_CHARS.search(name):
        problem = "it holds a backslash or a control character"
    else:
        for part in name.split("/"):
            if part in {".", ".."}:
                problem = f"it has a '{part}' part"
            elif part.startswith("."):
                problem = f"part '{part}' starts with '.' (reserved)"
            elif part != part.strip():
                problem = f"part '{part}' has surrounding spaces"
            elif part in _RESERVED:
                problem = f"part '{part}' is reserved by the store format"
            if problem:
                break
    if problem:
        raise UsageError(  # repr: a newline or tab in the name shows as \\n, the message stays one line
            f"{what} {name!r} is not a valid name: {problem}; use '/'-separated parts such as 'ood/far/textures'"
        )
    return name


# ---- crash hook and interrupts ------------------------------------------------------------

_mutations = 0
_crit = threading.local()


def _mutation() -> None:
    """Counts store mutations; the kill-9 tests set OODCLI_TEST_KILL_AT=N to die before the N-th."""
    global _mutations
    at = os.environ.get(KILL_ENV)
    if not at:
        return
    _mutations += 1
    if _mutations >= int(at):
        os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def uninterrupted():
    """Hold back Ctrl-C (SIGINT) until the block is done, then raise it. A store operation
    interrupted half-way (inside zarr's event loop or HDF5's C code) is what leaves
    attribute-less arrays and asyncio noise; between operations an interrupt is harmless."""
    if threading.current_thread() is not threading.main_thread() or getattr(_crit, "depth", 0):
        _crit.depth = getattr(_crit, "depth", 0) + 1
        try:
            yield
        finally:
            _crit.depth -= 1
        return
    pending: list[int] = []
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
    except ValueError:  # not the main interpreter
        yield
        return
    _crit.depth = 1
    try:
        yield
    finally:
        _crit.depth = 0
        signal.signal(signal.SIGINT, previous)
        if pending:
            raise KeyboardInterrupt


# ---- the writer lock -------------------------------------------------------------------------


class _WriterLock:
    """A flock on a file beside the store; the OS drops it when the process dies. Writers hold it
    exclusively; the shards of one sharded extraction hold it shared (see ``Store.setup``)."""

    def __init__(self, path: Path, suffix: str = "lock"):
        self.file = path.parent / f".{path.name}.{suffix}"
        self.fd: int | None = None

    def try_acquire(self, shared: bool = False, wait: bool = False) -> bool:
        self.file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB))
        except OSError:
            os.close(fd)
            return False
        if not shared:
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        return True

    def holder(self) -> str:
        try:
            pid = self.file.read_text().strip()
            return f"pid {pid}" if pid else "a sharded extraction"
        except OSError:
            return "?"

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _busy(path: Path, lock: _WriterLock) -> OodError:
    return OodError(
        f"another oodcli command is writing store {path} ({lock.holder()}); "
        "wait for it to finish, then run this one again"
    )


class StoreDamaged(OodError):
    """Part of the store cannot be read back as written (missing or altered chunk, garbled metadata)."""

    def __init__(self, path: Path, what: str):
        super().__init__(f"store {path} is damaged: {what}; {_REPAIR}")
        self.what = what


class Store:
    """A store on disk. Node names are '/'-separated paths from the root.

    Reads of arrays written by this version check that every chunk they touch exists
    and matches its checksum; anything unreadable is a :class:`StoreDamaged` error
    naming the node and what to do, never a traceback and never fill values.
    """

    def __init__(self, path: Path, root, backend: str, writable: bool, lock: _WriterLock | None = None,
                 shared: bool = False):
        self.path = path
        self._root = root
        self.backend = backend
        self.writable = writable
        self.shared = shared  # one of several shards writing disjoint rows (see ``setup``)
        self._lock = lock

    @contextlib.contextmanager
    def setup(self):
        """Where a shard changes the tree (creates a split or a features node): one shard at a
        time, behind a second lock, with what a crashed shard left staged finished or dropped
        first. For an exclusive writer this is a plain block."""
        if not self.shared:
            yield
            return
        lock = _WriterLock(self.path, "setup.lock")
        with uninterrupted():
            lock.try_acquire(wait=True)
        try:
            if self.exists(TXN_ROOT):
                _recover(self)
            yield
        finally:
            lock.release()

    # ---- attributes -------------------------------------------------------------
    @property
    def attrs(self) -> dict[str, Any]:
        return self.node_attrs("")

    def node_attrs(self, name: str) -> dict[str, Any]:
        node = self._node(name)
        with self._reading(name):
            if self.backend == "hdf5":
                return {k: json.loads(v) for k, v in node.attrs.items()}
            return dict(node.attrs)

    def set_attrs(self, name: str, **values: Any) -> None:
        self._check_writable()
        node = self._node(name)
        _mutation()
        with uninterrupted():
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

    def children(self, name: str = "", hidden: bool = False) -> list[str]:
        """Child names of a group; names starting with '.' (staging) only if ``hidden``."""
        if not self.exists(name):
            return []
        node = self._node(name)
        if _is_array(node):
            return []
        with self._reading(name), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # zarr warns about its own leftover '*.partial' files
            keys = sorted(node.keys())
        return [k for k in keys if hidden or not k.startswith(".")]

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
        if not name:
            return self._root
        if self.exists(name):
            node = self._node(name)
            if _is_array(node):
                raise OodError(f"store {self.path}: '{name}' is an array, not a group")
            return node
        _mutation()
        with uninterrupted():
            return self._root.require_group(name)

    def delete(self, name: str) -> None:
        """Remove a node. Outside a transaction this is not atomic for big nodes: use
        ``Transaction.remove`` for anything a reader may look at."""
        self._check_writable()
        if not name:
            raise ValueError("refusing to delete the root")
        if not self.exists(name):
            return
        _mutation()
        with uninterrupted():
            if self.backend == "hdf5":
                del self._root[name]
                self._root.flush()
            else:
                shutil.rmtree(self.path / name)

    def move(self, source: str, target: str) -> None:
        """Rename a node (atomic: one rename in the file system, one link change in HDF5)."""
        self._check_writable()
        parent = target.rpartition("/")[0]
        if parent:
            self.require_group(parent)
        _mutation()
        with uninterrupted():
            if self.backend == "hdf5":
                self._root.move(source, target)
                self._root.flush()
            else:
                os.rename(self.path / source, self.path / target)

    def transaction(self) -> "Transaction":
        """``with store.transaction() as txn:`` write whole nodes all or nothing (see Transaction)."""
        self._check_writable()
        return Transaction(self)

    # ---- arrays -----------------------------------------------------------------
    def create_array(
        self,
        name: str,
        shape: tuple[int, ...],
        dtype,
        chunk_rows: int | None = None,
        attrs: dict | None = None,
    ):
        """Allocate an array of its full shape, chunked along rows, every chunk checksummed
        and stored even when it is all zeros (so a missing chunk is damage); replaces any old one."""
        self._check_writable()
        self.delete(name)
        parent, _, leaf = name.rpartition("/")
        group = self.require_group(parent)
        rows = chunk_rows or chunk_rows_for(shape[1:], dtype)
        chunks = (max(1, min(rows, shape[0] or 1)),) + tuple(shape[1:])
        _mutation()
        with uninterrupted():
            if self.backend == "hdf5":
                chunked = shape[0] > 0 and all(shape)
                group.create_dataset(leaf, shape=shape, dtype=dtype, chunks=chunks if chunked else None,
                                     fletcher32=chunked)
            else:
                from zarr.codecs import Crc32cCodec

                group.create_array(
                    leaf, shape=shape, dtype=dtype, chunks=chunks, compressors=[Crc32cCodec()], fill_value=0,
                    dimension_names=_dimension_names(leaf, len(shape)),
                )
        if attrs:
            self.set_attrs(name, **attrs)

    def write_rows(self, name: str, start: int, data: np.ndarray) -> None:
        self._check_writable()
        arr = self._node(name)
        if self.backend == "zarr":  # every chunk on disk, zeros too: a missing chunk is then always damage
            arr = arr.with_config({"write_empty_chunks": True})
        _mutation()
        with uninterrupted():
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
        rows = rows if rows is not None else slice(None)
        if self.backend == "zarr":
            self._check_chunks(name, node, rows)
        with self._reading(name, rows):
            return np.asarray(node[rows])

    def missing_chunks(self, name: str) -> list[int]:
        """Row-chunk indices of a checksummed Zarr array whose chunk file is gone."""
        node = self._node(name)
        if self.backend != "zarr" or not _all_chunks_written(node) or not node.shape or not node.shape[0]:
            return []
        step = int(node.chunks[0])
        return [i for i in range(-(-node.shape[0] // step)) if not self._chunk_file(name, node, i).exists()]

    def _chunk_file(self, name: str, node, i: int) -> Path:
        key = node.metadata.encode_chunk_key((i,) + (0,) * (len(node.shape) - 1))
        return self.path / name / key

    def _check_chunks(self, name: str, node, rows: slice) -> None:
        if not node.shape or not node.shape[0] or not _all_chunks_written(node):
            return
        start, stop, _ = rows.indices(node.shape[0])
        step = int(node.chunks[0])
        for i in range(start // step, -(-stop // step)):
            if not self._chunk_file(name, node, i).exists():
                raise StoreDamaged(
                    self.path, f"chunk {i} of '{name}' (rows {i * step}-{min(node.shape[0], (i + 1) * step) - 1}) is missing"
                )

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
        with self._reading(name, missing_ok=True):
            try:
                return self._root[name]
            except (KeyError, FileNotFoundError):
                raise KeyError(name) from None

    @contextlib.contextmanager
    def _reading(self, name: str, rows: slice | None = None, missing_ok: bool = False):
        """Backend errors while reading become one StoreDamaged line (KeyError passes for lookups)."""
        try:
            with uninterrupted():
                yield
        except (KeyError, FileNotFoundError):
            if missing_ok:
                raise
            raise StoreDamaged(self.path, f"'{name}' vanished while reading") from None
        except (OodError, KeyboardInterrupt):
            raise
        except Exception as exc:
            where = f" rows {rows.start}-{rows.stop}" if rows is not None and rows.start is not None else ""
            raise StoreDamaged(self.path, f"cannot read '{name}'{where} ({type(exc).__name__}: {_first_line(exc)})") from None

    def _check_writable(self) -> None:
        if not self.writable:
            raise OodError(f"store {self.path} is open read-only")

    def close(self) -> None:
        try:
            if self.backend == "hdf5":
                self._root.close()
        finally:
            if self._lock is not None:
                self._lock.release()
                self._lock = None

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r}, backend={self.backend})"


_REPAIR = ("'oodcli store verify' lists the damage; remove the damaged part with 'oodcli store rm' "
           "and re-run the command that made it")


def _dimension_names(leaf: str, ndim: int) -> tuple[str, ...]:
    """Zarr v3 dimension names, which xarray needs: rows are shared by every array of a split,
    the other axes belong to their array (logits_1 and penultimate_1 differ in length)."""
    return ("row",) + tuple(f"{leaf}_{axis}" for axis in range(1, ndim))


def _is_array(node) -> bool:
    return hasattr(node, "shape") and hasattr(node, "dtype")


def _all_chunks_written(node) -> bool:
    """Arrays made by this version (checksummed, empty chunks written): a missing chunk is damage.
    Older arrays skipped all-zero chunks, so there a missing chunk may be zeros."""
    return any(type(c).__name__ == "Crc32cCodec" for c in getattr(node, "compressors", ()) or ())


class Transaction:
    """Write whole nodes all or nothing::

        with store.transaction() as txn:
            staged = txn.stage("scores/msp/test")     # build the node under the staging name
            store.write_array(staged, values, method="msp")
            txn.remove("scores/old")                   # and/or remove nodes
        # on success: commit marker, then every staged node replaces its target

    An exception (Ctrl-C included) inside the block drops the staging and leaves the store
    as it was. After the commit marker, a crash is finished by the next ``open_store``.
    """

    def __init__(self, store: Store):
        self.store = store
        self.node = f"{TXN_ROOT}/{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.targets: list[str] = []
        self.removals: list[str] = []

    def __enter__(self) -> "Transaction":
        self.store.require_group(self.node)
        self.store.set_attrs(self.node, committed=False)
        return self

    def stage(self, target: str, internal: bool = False) -> str:
        """The staging name under which to build the node that will replace ``target``
        (``internal``: oodcli's own hidden nodes, whose '.' parts the name rule refuses)."""
        if not internal:
            check_name(target, "node")
        self._check_disjoint(target)
        self.targets.append(target)
        return f"{self.node}/n{len(self.targets) - 1}"

    def remove(self, target: str) -> None:
        check_name(target, "node")
        self._check_disjoint(target)
        self.removals.append(target)

    def _check_disjoint(self, target: str) -> None:
        for other in self.targets + self.removals:
            if target == other or target.startswith(other + "/") or other.startswith(target + "/"):
                raise ValueError(f"transaction touches '{target}' and '{other}'; they overlap")

    def __exit__(self, kind, exc, tb) -> None:
        if kind is not None:
            with contextlib.suppress(Exception):
                with uninterrupted():
                    _drop(self.store, self.node)
            return
        with uninterrupted():  # past the marker, a Ctrl-C waits until every node is in place
            self.store.set_attrs(self.node, targets=self.targets, removals=self.removals, committed=True)
            _apply(self.store, self.node)


def _apply(store: Store, txn: str) -> None:
    """Move a committed transaction's nodes into place; safe to run again after a crash."""
    attrs = store.node_attrs(txn)
    for j, target in enumerate(attrs.get("removals", [])):
        if store.exists(target):
            store.move(target, f"{txn}/r{j}")
    for i, target in enumerate(attrs.get("targets", [])):
        staged = f"{txn}/n{i}"
        if not store.exists(staged):
            continue  # moved before a crash
        if store.exists(target):
            store.move(target, f"{txn}/o{i}")
        store.move(staged, target)
    _drop(store, txn)


def _drop(store: Store, txn: str) -> None:
    """Delete a transaction's group, and the staging area with it once it is empty."""
    store.delete(txn)
    if store.exists(TXN_ROOT) and not store.children(TXN_ROOT, hidden=True):
        store.delete(TXN_ROOT)


def _recover(store: Store) -> list[str]:
    """Finish committed transactions and drop uncommitted ones (the writer lock is held)."""
    done = []
    for name in store.children(TXN_ROOT, hidden=True):
        txn = f"{TXN_ROOT}/{name}"
        try:
            committed = store.node_attrs(txn).get("committed")
        except OodError:
            committed = False  # its marker was being deleted with it
        if committed:
            _apply(store, txn)
            done.append(f"finished {name}")
        else:
            _drop(store, txn)
            done.append(f"dropped {name}")
    if store.exists(TXN_ROOT) and not store.children(TXN_ROOT, hidden=True):
        store.delete(TXN_ROOT)
    return done


def _has_pending(path: Path, backend: str) -> bool:
    if backend == "zarr":
        return (path / TXN_ROOT).exists()
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return TXN_ROOT in f
    except Exception:
        return False


def _open_root(path: Path, backend: str, writable: bool):
    try:
        with uninterrupted():
            if backend == "hdf5":
                import h5py

                return h5py.File(path, "a" if writable else "r")
            import zarr

            return zarr.open_group(path, mode="a" if writable else "r", zarr_format=3)
    except Exception as exc:  # corrupt files surface as many different library errors
        raise OodError(
            f"cannot open store {path} ({type(exc).__name__}: {_first_line(exc)}); "
            "it is damaged or not an oodcli store: pick another path, or extract into a new store"
        ) from None


def open_store(path: str | Path, mode: str = "r", shared: bool = False) -> Store:
    """Open a store: ``'r'`` read-only and ``'r+'`` writable need an existing store;
    ``'a'`` creates one if missing. Writers take the store's lock (refused in one line
    if another command holds it); any opener finishes what a crashed writer committed.
    ``shared`` (Zarr only): one shard of a sharded extraction, which shares the lock with
    the other shards and changes the tree only inside ``Store.setup``."""
    if mode not in {"r", "r+", "a"}:
        raise ValueError(f"mode must be r, r+ or a, not {mode!r}")
    path = Path(path)
    backend = backend_for(path)
    exists = path.exists()
    if mode in {"r", "r+"} and not exists:
        raise OodError(
            f"no store at {path}; create one with 'oodcli extract ... --store {path}'"
        )
    if exists and backend == "zarr" and not path.is_dir():
        raise OodError(f"{path} is a file, not a Zarr store directory; pick another --store path (*.h5 for HDF5)")
    writable = mode != "r"
    if shared and (not writable or backend != "zarr"):
        raise UsageError(f"sharded writing needs a Zarr store; {path} is HDF5, which allows one writer: "
                         "extract into a .zarr store, or run without --shard")
    if not exists and mode == "a" and backend == "hdf5":
        _create_hdf5(path)  # whole or not at all: h5py writes a new file's header only on flush
        exists = True
    lock = _WriterLock(path)
    if writable:
        if not lock.try_acquire(shared=shared):
            raise _busy(path, lock)
    elif exists and _has_pending(path, backend) and lock.try_acquire():
        try:  # a writer died after its commit marker: finish its work before reading
            with Store(path, _open_root(path, backend, True), backend, True) as fixer:
                _recover(fixer)
        finally:
            lock.release()
    creating = _WriterLock(path, "setup.lock") if shared else None
    if creating is not None:  # shards starting together: one creates the root, the others then open it
        with uninterrupted():
            creating.try_acquire(wait=True)
    try:
        store = Store(path, _open_root(path, backend, writable), backend, writable, lock if writable else None, shared)
        if creating is not None and "schema" not in store.attrs and not store.children(hidden=True):
            store.set_attrs("", schema=SCHEMA_VERSION, oodcli_version=__version__)
    except OodError:
        if not writable and lock.try_acquire():  # not busy: the file itself is the problem
            lock.release()
            raise
        if not writable:  # HDF5 refuses readers while a writer has the file open
            raise _busy(path, lock) from None
        lock.release()
        raise
    except BaseException:
        lock.release()
        raise
    finally:
        if creating is not None:
            creating.release()
    try:
        attrs = store.attrs
        if exists and "schema" not in attrs:
            # only 'a' (extract) may adopt a place that holds nothing yet, e.g. an empty folder
            if mode != "a" or attrs or store.children(hidden=True):
                raise OodError(f"{path} is not an oodcli store (no schema attribute); pick another --store path")
        if "schema" in attrs and attrs["schema"] != SCHEMA_VERSION:
            raise OodError(
                f"store {path} has schema {attrs['schema']} but this oodcli reads schema {SCHEMA_VERSION}; "
                "re-extract it with this version"
            )
        if writable:
            if "schema" not in attrs:
                store.set_attrs("", schema=SCHEMA_VERSION, oodcli_version=__version__)
            if store.exists(TXN_ROOT) and not shared:  # shards recover inside Store.setup
                _recover(store)
    except BaseException:
        store.close()
        raise
    return store


def _create_hdf5(path: Path) -> None:
    """A new HDF5 store, made beside its path and renamed into place once its header and
    schema are on disk (a kill during h5py's first write would leave a file nothing opens)."""
    import h5py

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.new")
    _mutation()
    with uninterrupted():
        try:
            with h5py.File(tmp, "w") as f:
                f.attrs["schema"] = json.dumps(SCHEMA_VERSION)
                f.attrs["oodcli_version"] = json.dumps(__version__)
            os.replace(tmp, path)
        except OSError as exc:  # h5py's errors carry no file name: say which store could not be made
            if exc.filename is not None and exc.filename != str(tmp):
                raise
            raise OodError(f"cannot create store {path}: {os.strerror(exc.errno) if exc.errno else _first_line(exc)}; "
                           "pick a folder you can write to") from None
        finally:
            tmp.unlink(missing_ok=True)


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


def split_groups(store: Store) -> list[str]:
    """Every group under ``splits/`` that is (or was being made into) a split."""
    found: list[str] = []

    def visit(prefix: str) -> None:
        for child in store.children(split_node(prefix) if prefix else "splits"):
            name = f"{prefix}/{child}" if prefix else child
            node = split_node(name)
            if store.is_array(node):
                continue
            if store.exists(f"{node}/labels") or store.exists(f"{node}/ids") or "n" in store.node_attrs(node):
                found.append(name)
            else:
                visit(name)

    visit("")
    return found


def split_is_whole(store: Store, split: str) -> bool:
    """labels and ids present with the row count the split's attributes promise."""
    node = split_node(split)
    if not (store.is_array(f"{node}/labels") and store.is_array(f"{node}/ids")):
        return False
    n = store.node_attrs(node).get("n")
    return n is not None and store.shape(f"{node}/labels")[0] == n == store.shape(f"{node}/ids")[0]


def split_states(store: Store) -> tuple[list[str], list[str]]:
    """(whole splits, half-made splits) from one walk of ``splits/``; half-made ones are what an
    interrupted or failed command left without labels, ids or their attributes."""
    whole, half = [], []
    for split in split_groups(store):
        (whole if split_is_whole(store, split) else half).append(split)
    return whole, half


def list_splits(store: Store) -> list[str]:
    """Every whole split in the store (see ``half_made_splits`` for the others)."""
    return split_states(store)[0]


def half_made_splits(store: Store) -> list[str]:
    return split_states(store)[1]


def require_whole_splits(store: Store) -> list[str]:
    """Every whole split, refused while the store holds half-made ones: a result over fewer
    sets than the store holds would look complete."""
    splits, broken = split_states(store)
    if broken:
        raise OodError(
            f"store {store.path} holds half-made split(s) {', '.join(broken)} (an interrupted extract); "
            f"re-run that extract, or remove them with 'oodcli store rm {store.path} {broken[0]}'"
        )
    return splits


def split_dependents(store: Store, split: str) -> list[str]:
    """Nodes made from a split that go when it goes: its scores and gradients of every method."""
    found = []
    for section in ("scores", "grads"):
        for method in store.children(section):
            if store.exists(f"{section}/{method}/{split}"):
                found.append(f"{section}/{method}/{split}")
    return found


def resolve_removal(store: Store, target: str) -> list[str]:
    """What ``store rm TARGET`` removes: a split (whole or half-made) with its scores and
    gradients; a method with its scores, fitted state, sweep and gradients; or any node by path."""
    check_name(target, "what to remove")
    if target in split_groups(store):
        return [split_node(target), *split_dependents(store, target)]
    method = [f"{section}/{target}" for section in ("scores", "fitted", "fitted/sweeps", "grads")
              if store.exists(f"{section}/{target}")]
    if method and "/" not in target:
        return method
    if store.exists(target):
        return [target]
    raise UsageError(
        f"store {store.path} has no split, method or node '{target}'; splits: "
        f"{', '.join(split_groups(store)) or 'none'}; methods: {', '.join(store.children('scores')) or 'none'}"
    )


def remove_nodes(store: Store, targets: list[str]) -> list[str]:
    """Remove what ``targets`` name (see ``resolve_removal``) in one transaction; returns the nodes."""
    nodes = list(dict.fromkeys(node for target in targets for node in resolve_removal(store, target)))
    nodes = [n for n in nodes if not any(n.startswith(other + "/") for other in nodes if other != n)]
    with store.transaction() as txn:
        for node in nodes:
            txn.remove(node)
    return nodes


def list_backbones(store: Store, split: str) -> list[str]:
    node = split_node(split)
    return [c for c in store.children(node) if not store.is_array(f"{node}/{c}")]


def split_role(store: Store, split: str) -> str:
    return store.node_attrs(split_node(split)).get("role", "id")
