"""kill -9 matrix: every store-writing command killed right before its k-th store mutation,
for kill points spread over its whole run, then run again. The store must then equal the one
an uninterrupted run makes (every node, attribute and array byte; for Zarr every file), hold
no staging, and pass ``oodcli store verify``. Commands that write only through transactions
(score, synthesize, index, select-k, store rm) must also show a reader, right after the kill,
the store exactly as the transactions committed before the kill point left it: as before the
command up to the first commit marker, the whole result past the last one.

Deterministic, no timing: ``OODCLI_TEST_KILL_AT=k`` makes the process SIGKILL itself right
before its k-th store mutation (``oodcli.store._mutation``); an uninterrupted run in this
process counts the mutations. Commands run in children forked from the test process, where
torch, the data sets and the model code are already loaded, so a run costs only its work.
Two kill points run side by side (one job each, a forked process that runs the killed child,
checks, reruns and compares). Intra-op threads are held at one: OpenMP's thread pool does not
survive a fork (a child of a process that ran two threads hangs in its first convolution), and
one thread also keeps float results identical between runs.
"""

from __future__ import annotations

import faulthandler
import hashlib
import json
import os
import shutil
import signal
import sys
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import pytest

import oodcli.store as store_mod
from oodcli.cli import main
from oodcli.store import KILL_ENV, TXN_ROOT, Store, open_store

FAST_MODEL = "vit-tiny"  # random-init, small: extraction costs little more than its I/O
CNN_MODEL = "digits_cnn-tiny"  # what GROOD needs: a CNN with early/mid/head stages
SMALL = ["--chunk-rows", "64", "--batch-size", "64"]  # several chunk writes per split, whole batches per chunk
VOLATILE = {"seconds"}  # attributes that measure the run, not its result
PARALLEL = 2  # kill points run side by side (each job is single-threaded)
HANG_S = 120  # a safety net against a hung child only: no outcome depends on time


# ---- running a command in a forked child --------------------------------------------------------------


def _fork(body) -> int:
    """Fork; the child runs ``body()`` and exits with its return value (70 on an exception)."""
    sys.stdout.flush(), sys.stderr.flush()
    with warnings.catch_warnings():  # Python >= 3.12 warns about forking a process with threads: see the top
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid:
        return pid
    code = 70
    try:
        code = body()
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush(), sys.stderr.flush()
        finally:
            os._exit(code)


def _wait(pid: int, what: str) -> int:
    """Exit code of child ``pid`` (minus the signal that ended it)."""
    deadline = time.monotonic() + HANG_S
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"{what} hung")
        time.sleep(0.002)


def run_child(argv: list, kill_at: int | None, log: Path) -> int:
    """Run ``oodcli argv`` in a forked child, with ``OODCLI_TEST_KILL_AT=kill_at`` if given;
    its exit code, or minus the signal that ended it. Its output goes to ``log``."""

    def body() -> int:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1), os.dup2(fd, 2)
        sys.stdout = sys.stderr = open(1, "w", closefd=False)
        faulthandler.dump_traceback_later(HANG_S - 20, exit=True, file=sys.stderr)  # a hang shows where
        if kill_at is None:
            os.environ.pop(KILL_ENV, None)
        else:
            os.environ[KILL_ENV] = str(kill_at)
        store_mod._mutations = 0
        return main(["-q", *map(str, argv)])

    return _wait(_fork(body), f"oodcli {' '.join(map(str, argv))} (kill point {kill_at}), log {log}")


def _tail(log: Path, lines: int = 15) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def killed_run(argv: list, kill_at: int, log: Path) -> bool:
    """Run with a kill point: True if it died by SIGKILL, False if it finished first (the kill
    point lies past its last mutation: the matrix is exhausted); anything else fails."""
    code = run_child(argv, kill_at, log)
    assert code in (-signal.SIGKILL, 0), f"kill point {kill_at}: exit {code}, not killed; log:\n{_tail(log)}"
    return code == -signal.SIGKILL


def clean_run(argv: list, log: Path) -> None:
    code = run_child(argv, None, log)
    assert code == 0, f"rerun of oodcli {' '.join(map(str, argv))} exited {code}; log:\n{_tail(log)}"


def counted_run(argv: list, track: Path | None = None) -> tuple[int, list[int], list[dict]]:
    """Run ``oodcli argv`` uninterrupted in this process: how many store mutations it made,
    the number of each mutation that wrote a transaction's commit marker and, for the store
    at ``track``, a snapshot of it right after each transaction landed."""
    markers: list[int] = []
    states: list[dict] = []
    set_attrs, apply = Store.set_attrs, store_mod._apply

    def spy_marker(self, name, **values):
        if values.get("committed") is True:
            markers.append(store_mod._mutations + 1)
        return set_attrs(self, name, **values)

    def spy_apply(store, txn):
        apply(store, txn)
        if track is not None and store.path == track:
            states.append(snapshot(track, store))

    os.environ[KILL_ENV] = str(10**9)
    store_mod._mutations = 0
    Store.set_attrs, store_mod._apply = spy_marker, spy_apply
    try:
        code = quiet_main(*argv)
        assert code == 0, f"oodcli {' '.join(map(str, argv))} exited {code}"
        return store_mod._mutations, markers, states
    finally:
        Store.set_attrs, store_mod._apply = set_attrs, apply
        del os.environ[KILL_ENV]
        store_mod._mutations = 0


def quiet_main(*argv) -> int:
    """A command in this process with its output thrown away (only the exit code matters)."""
    saved = sys.stdout, sys.stderr
    with open(os.devnull, "w") as sink:
        sys.stdout = sys.stderr = sink
        try:
            return main(["-q", *map(str, argv)])
        finally:
            sys.stdout, sys.stderr = saved


def run_jobs(fn, items: list, tmp: Path) -> list:
    """``fn(item)`` for every item, each in its own forked process, ``PARALLEL`` at a time;
    their (JSON) results in order. Every failure is collected, then reported together."""
    results: list = [None] * len(items)
    errors: list[str] = []
    todo, running = list(enumerate(items)), {}
    while todo or running:
        while todo and len(running) < PARALLEL:
            i, item = todo.pop(0)
            out = tmp / f"job{i}.json"

            def body(item=item, out=out) -> int:
                try:
                    result = {"value": fn(item)}
                except BaseException as exc:  # noqa: BLE001 - handed to the parent
                    result = {"error": f"{item}: {type(exc).__name__}: {exc}"}
                out.write_text(json.dumps(result))
                return 0

            running[_fork(body)] = (i, item, out)
        for pid in list(running):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                i, item, out = running.pop(pid)
                try:
                    result = json.loads(out.read_text())
                except (OSError, ValueError):
                    result = {"error": f"{item}: job ended with status {os.waitstatus_to_exitcode(status)}"}
                if "error" in result:
                    errors.append(result["error"])
                else:
                    results[i] = result["value"]
        time.sleep(0.002)
    if errors:
        pytest.fail(f"{len(errors)} of {len(items)} kill points failed:\n\n" + "\n\n".join(sorted(errors)))
    return results


# ---- what a store holds, read with zarr / h5py directly (staging included) -----------------------------


def snapshot(path: Path, open_store_: Store | None = None) -> dict:
    """What the store holds, staging included. Zarr: every file, metadata parsed (attributes
    less VOLATILE), chunks by a hash of their bytes (checksummed encodings: equal bytes, equal
    data). HDF5: every node with its attributes, and for arrays dtype, shape, chunking and a
    hash of the data (read through ``open_store_``'s file when the store is open for writing)."""
    nodes: dict[str, tuple] = {}
    if path.suffix == ".h5":
        import h5py

        def attrs(obj) -> dict:
            return {k: json.loads(v) for k, v in obj.attrs.items() if k not in VOLATILE}

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                data = np.ascontiguousarray(obj[()]).tobytes()
                nodes[name] = ("array", attrs(obj), str(obj.dtype), obj.shape, obj.chunks,
                               hashlib.sha256(data).hexdigest()[:16])
            else:
                nodes[name] = ("group", attrs(obj))

        if open_store_ is not None:
            f = open_store_._root
            nodes[""] = ("group", attrs(f))
            f.visititems(visit)
            return nodes
        with h5py.File(path, "r") as f:
            nodes[""] = ("group", attrs(f))
            f.visititems(visit)
        return nodes
    for file in sorted(path.rglob("*")):
        if file.is_dir():
            continue
        name = str(file.relative_to(path))
        if file.name == "zarr.json":
            meta = json.loads(file.read_text())
            meta["attributes"] = {k: v for k, v in meta.get("attributes", {}).items() if k not in VOLATILE}
            nodes[name] = meta
        else:
            nodes[name] = hashlib.sha256(file.read_bytes()).hexdigest()[:16]
    return nodes


def differences(got: dict, want: dict) -> list[str]:
    return [f"  {key or '/'}: {_short(got.get(key))}\n    expected {_short(want.get(key))}"
            for key in sorted(set(got) | set(want)) if got.get(key) != want.get(key)]


def _short(value) -> str:
    text = repr(value)
    return text if len(text) < 240 else text[:237] + "..."


def assert_same_and_clean(path: Path, want: dict, what: str) -> None:
    """The store equals ``want``, holds no staging or other hidden node or file, a reader
    sees no hidden child, and ``oodcli store verify`` passes."""
    got = snapshot(path)
    lines = differences(got, want)
    assert not lines, f"{what}: the store differs from an uninterrupted run's:\n" + "\n".join(lines[:12])
    hidden = [n for n in got if any(part.startswith(".") or part.endswith(".partial") for part in n.split("/"))]
    assert not hidden, f"{what}: hidden nodes or files left in the store: {hidden[:5]}"
    with open_store(path) as st:
        assert st.children(hidden=True) == st.children(), f"{what}: hidden children at the root"
    assert quiet_main("store", "verify", path) == 0, f"{what}: 'oodcli store verify' found problems"


def _copy(src: Path, dst: Path) -> None:
    store_mod.remove_store(dst)
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copyfile(src, dst)


# ---- the prepared stores: each command's input is the previous command's output -----------------------


class Step:
    """One command: its input store (None: a fresh store), the store an uninterrupted run
    made from it, how many mutations that run made, where it wrote commit markers, and the
    store as it was before (``states[0]``) and after each of its transactions."""

    def __init__(self, name: str, argv, pre: Path | None, ref: Path):
        self.name, self.argv, self.pre, self.ref = name, argv, pre, ref
        if pre is not None:
            _copy(pre, ref)
        self.mutations, self.markers, after = counted_run(argv(ref), track=ref)
        assert len(after) == len(self.markers)
        self.pre_snapshot = snapshot(pre) if pre is not None else None
        self.ref_snapshot = snapshot(ref)
        self.states = [self.pre_snapshot, *after]


class Chain:
    """The reference stores of one backend, each made on first use by running the commands
    uninterrupted in this process. Extract and score use vit-tiny (the cheapest model to run):
    extract into a fresh store -> score. GROOD needs a CNN with stages: on a digits_cnn-tiny
    store, synthesize grood -> index -> select-k -> store rm (HDF5's store rm: on the score store)."""

    def __init__(self, root: Path, ext: str):
        self.root, self.ext = root / ext, ext
        self.root.mkdir()
        self.steps: dict[str, Step] = {}

    def path(self, name: str) -> Path:
        return self.root / f"{name}.{self.ext}"

    def step(self, name: str) -> Step:
        if name not in self.steps:
            self.steps[name] = getattr(self, f"_{name}")()
        return self.steps[name]

    def _extract(self) -> Step:
        """Two splits into a fresh store (the kill points fall in both, and between them)."""
        return Step("extract", lambda s: ["extract", "--model", FAST_MODEL, "--benchmark", "digits", "--split", "test",
                                          "--split", "ood/far/noise", "--store", s, *SMALL], None, self.path("extract"))

    def _score(self) -> Step:
        """On a store holding older msp and energy scores: replaces those, adds a fitted method."""
        pre = self.path("scored")
        _copy(self.step("extract").ref, pre)
        counted_run(["extract", "--model", FAST_MODEL, "--benchmark", "digits", "--split", "train", "--store", pre])
        counted_run(["score", "msp,energy", "--store", pre, "-p", "energy.temperature=2"])
        return Step("score", lambda s: ["score", "msp,energy,knn", "--store", s], pre,
                    self.path("score"))

    def base(self) -> Path:
        """digits_cnn-tiny features of the test split (GROOD's, select-k's and PALM's ID split
        here: half the size of train, so every run costs half) and of an OOD split, with scores."""
        path = self.path("base")
        if not path.exists():
            counted_run(["extract", "--model", CNN_MODEL, "--benchmark", "digits", "--split", "test",
                         "--split", "ood/far/noise", "--store", path])
            counted_run(["score", "msp,energy", "--store", path])
        return path

    def _synthesize(self) -> Step:
        """GROOD's mixup prototypes (chunks streamed inside a transaction), then the gradients of
        every split (one transaction each)."""
        return Step("synthesize", lambda s: ["synthesize", "grood", "--store", s, "--train", "test"], self.base(),
                    self.path("synthesize"))

    def _index(self) -> Step:
        return Step("index", lambda s: ["index", "--store", s, "--source", "grads/grood/test"],
                    self.step("synthesize").ref, self.path("index"))

    def _select_k(self) -> Step:
        return Step("select_k", lambda s: ["select-k", "--store", s, "--split", "test", "--k-range", "1..3",
                                           "--n-init", "1"], self.step("index").ref, self.path("select_k"))

    def _rm(self) -> Step:
        """A split (with its scores and gradients), a method (its scores and fitted state) and a node."""
        if self.ext == "zarr":  # an index and select-k's result there too
            return Step("rm", lambda s: ["store", "rm", s, "ood/far/noise", "energy", "fitted/select_k"],
                        self.step("select_k").ref, self.path("rm"))
        return Step("rm", lambda s: ["store", "rm", s, "ood/far/noise", "knn"], self.step("score").ref,
                    self.path("rm"))


@pytest.fixture(scope="module")
def chains(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("crash")
    return {ext: Chain(root, ext) for ext in ("zarr", "h5")}


def kill_points(n: int, count: int, markers: list[int]) -> list[int]:
    """Every kill point in 1..n if n <= count, else ``count`` evenly spaced ones from 1 to n;
    then each of ``markers`` (a commit marker: killed right before it) and the mutation after
    it (killed right after it); and n + 1, past the last mutation."""
    points = set(np.linspace(1, n, min(n, count)).round().astype(int).tolist())
    points |= {k for m in markers for k in (m, m + 1) if k <= n}
    return sorted(points) + [n + 1]


# ---- the matrix ----------------------------------------------------------------------------------------------

# Commands whose every store write is inside a transaction: right after a kill, a reader sees
# the store exactly as it was after the transactions committed before the kill point.
TRANSACTIONAL = {"score", "synthesize", "index", "select_k", "rm"}

CASES = [  # (command, backend, evenly spaced kill points, commit markers to kill at and after)
    ("extract", "zarr", 4, "all"),
    ("extract", "h5", 8, "all"),  # HDF5 runs cost less than Zarr's: more points
    ("score", "zarr", 3, "first and last"),  # every run costs a second: its work comes before its writes
    ("score", "h5", 3, "all"),
    ("synthesize", "zarr", 4, "first"),  # every run costs a second or two: the backbone, twice
    ("index", "zarr", 6, "all"),
    ("select_k", "zarr", 3, "all"),
    ("rm", "zarr", 6, "all"),
    ("rm", "h5", 6, "all"),
]


def _kill_and_rerun(step: Step, k: int, tmp: Path) -> str:
    """One kill point (run in a job process): kill, check what a reader sees, rerun, compare.
    Returns what a reader saw: 'S<j>' (the store after its first j transactions), 'partial'
    (extract: chunks filled in place) or 'finished' (k past the last mutation)."""
    ext = step.ref.suffix
    what = f"{step.name} ({ext[1:]}) killed before mutation {k} of {step.mutations}"
    work, log = tmp / f"k{k}{ext}", tmp / f"k{k}.log"
    if step.pre is not None:
        _copy(step.pre, work)
    died = killed_run(step.argv(work), k, log)
    assert died == (k <= step.mutations), f"{what}: it {'died' if died else 'finished'}; log:\n{_tail(log)}"
    if not died:
        assert_same_and_clean(work, step.ref_snapshot, what)
        return "finished"
    seen = "partial"
    if step.name in TRANSACTIONAL:  # what a reader finds right after the crash
        landed = sum(m < k for m in step.markers)  # transactions whose commit marker was written
        peek = tmp / f"peek{k}{ext}"
        _copy(work, peek)
        with open_store(peek) as st:  # drops uncommitted staging, finishes committed work
            scores = list(st.walk_arrays("scores"))
            incomplete = [n for n in scores if not (st.is_array(n) and st.node_attrs(n).get("complete"))]
        assert not incomplete, f"{what}: a reader finds incomplete scores {incomplete}"
        lines = differences(snapshot(peek), step.states[landed])
        assert not lines, (f"{what}: a reader does not see the store as its {landed} committed transaction(s) "
                           "left it:\n" + "\n".join(lines[:12]))
        if step.name == "score":  # the report of the scores there (old or new) works
            assert quiet_main("report", "--store", peek) == 0, f"{what}: 'oodcli report' fails on the killed store"
        store_mod.remove_store(peek)
        seen = f"S{landed}"
    if step.name == "rm" and seen == "S1":  # the removal is done: a rerun finds nothing to remove
        code = run_child(step.argv(work), None, log)
        assert code == 2 and "has no split, method or node 'ood/far/noise'" in log.read_text(), _tail(log)
    else:
        clean_run(step.argv(work), log)
    assert_same_and_clean(work, step.ref_snapshot, f"{what}, then rerun")
    store_mod.remove_store(work)
    return seen


@pytest.mark.parametrize("command,ext,count,markers", CASES, ids=[f"{c}-{e}" for c, e, _, _ in CASES])
def test_killed_then_rerun_equals_an_uninterrupted_run(chains, tmp_path, command, ext, count, markers):
    step = chains[ext].step(command)
    chosen = {"all": step.markers, "first": step.markers[:1],
              "first and last": sorted({step.markers[0], step.markers[-1]})}[markers]
    points = kill_points(step.mutations, count, chosen)
    print(f"{command} ({ext}): {step.mutations} mutations, commit markers at {step.markers}; kill points {points}")
    assert step.mutations >= 3 and step.markers, (step.mutations, step.markers)
    if command in TRANSACTIONAL:  # nothing written after its last transaction
        assert step.states[-1] == step.ref_snapshot
    seen = dict(zip(points, run_jobs(lambda k: _kill_and_rerun(step, k, tmp_path), points, tmp_path)))
    assert seen.pop(step.mutations + 1) == "finished"
    if command in TRANSACTIONAL and markers == "all":  # every state, from the old store to the result, was seen
        assert set(seen.values()) >= {f"S{j}" for j in range(len(step.markers) + 1)}, seen


@pytest.mark.parametrize("ext", ["zarr", "h5"])
def test_new_store_killed_as_it_is_created(chains, tmp_path, ext):
    """Killed around the creation of a new store (HDF5 writes a new file's header only on
    flush), it leaves no store or one the rerun adopts, and nothing else beside it."""
    step = chains[ext].step("extract")
    for k in (1, 2):
        folder = tmp_path / f"k{k}"
        folder.mkdir()
        work, log = folder / f"s.{ext}", tmp_path / f"k{k}.log"
        assert killed_run(step.argv(work), k, log)
        clean_run(step.argv(work), log)  # adopts what the kill left, if anything
        assert_same_and_clean(work, step.ref_snapshot, f"extract ({ext}) killed before mutation {k}, then rerun")
        assert sorted(p.name for p in folder.iterdir()) == [f".s.{ext}.lock", f"s.{ext}"]


def test_score_killed_before_its_commit_marker_leaves_the_old_scores(chains, tmp_path):
    """Killed right before writing its first commit marker, score leaves the store exactly as
    it was: the old msp and energy scores whole and reportable, nothing new visible."""
    step = chains["zarr"].step("score")
    work = tmp_path / "s.zarr"
    _copy(step.pre, work)
    assert killed_run(step.argv(work), step.markers[0], tmp_path / "log")
    with open_store(work) as st:
        assert st.children("scores") == ["energy", "msp"] and not st.exists(TXN_ROOT)
        scores = list(st.walk_arrays("scores"))
        assert len(scores) == 2 * 2  # on test and on ood/far/noise
        for name in scores:
            attrs = st.node_attrs(name)
            assert attrs["complete"] is True and attrs["method"] == name.split("/")[1]
        assert st.node_attrs("scores/energy/test")["hparams"]["temperature"] == 2.0  # the old ones
    assert snapshot(work) == step.pre_snapshot
    assert quiet_main("report", "--store", work) == 0


# ---- a trained model file ------------------------------------------------------------------------------------


@pytest.mark.parametrize("old_file", [False, True], ids=["new-file", "over-old-file"])
def test_killed_train_leaves_no_half_file(chains, tmp_path, old_file):
    """train palm --head-only writes its file atomically: after a kill at every mutation, the
    file is absent (or still the old one) or whole; a rerun writes one equal to an
    uninterrupted run's, it loads, and no partial file is left beside it."""
    from oodcli.train.apex import read_model

    store = chains["zarr"].base()  # read only: every run reads the same store
    ref = tmp_path / "ref" / "p.safetensors"

    def argv(out, k=2):
        return ["train", "palm", "--head-only", "--store", store, "--split", "test", "--k", k, "--epochs", 2,
                "--out", out]

    def content(path):  # safetensors orders its metadata differently in every process: compare what it holds
        meta, tensors = read_model(path)
        return meta, {name: (t.dtype, tuple(t.shape), t.numpy().tobytes()) for name, t in tensors.items()}

    ref.parent.mkdir()
    n = counted_run(argv(ref))[0]
    old = tmp_path / "old.safetensors"
    counted_run(argv(old, k=1))
    want, before = content(ref), content(old)
    assert want != before
    for k in range(1, n + 2):
        out = tmp_path / f"k{k}" / "p.safetensors"
        out.parent.mkdir()
        if old_file:
            shutil.copyfile(old, out)
        died = killed_run(argv(out), k, tmp_path / "log")
        assert died == (k <= n)
        if out.exists():  # whole: it loads, and holds the old model or the new one
            assert content(out) in (before, want), f"kill point {k}: the file holds neither model"
        else:
            assert not old_file, f"kill point {k}: the old file is gone"
        clean_run(argv(out), tmp_path / "log")
        assert content(out) == want
        assert [p.name for p in out.parent.iterdir()] == ["p.safetensors"], f"kill point {k}: files left beside it"
