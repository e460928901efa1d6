"""Sharded extraction: N processes write disjoint whole chunks of one Zarr store; the result
equals one process's, each shard resumes on its own, and readers (plain zarr, dask, xarray)
see an ordinary store."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import one_line_error
from oodcli.cli import main
from oodcli.extraction import shard_rows
from oodcli.store import KILL_ENV, open_store

MODEL = "digits_cnn-tiny"
ARGS = ["--model", MODEL, "--benchmark", "digits", "--chunk-rows", "64", "--batch-size", "64", "--device", "cpu"]


def _extract(store, *extra, env=None, wait=True):
    cmd = [sys.executable, "-m", "oodcli", "-q", "extract", *ARGS, "--store", str(store), "--json", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    return proc.communicate() + (proc.returncode,) if wait else proc


def _arrays(path):
    with open_store(path) as st:
        return {name: st.read(name) for name in st.walk_arrays()}


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    path = tmp_path_factory.mktemp("single") / "one.zarr"
    out, err, code = _extract(path)
    assert code == 0, err
    return path


@pytest.mark.parametrize("n", [1, 2, 3, 7, 12, 100])
def test_shards_cover_the_rows_in_whole_chunks(n):
    for rows in (1, 63, 64, 65, 758, 6400):
        ranges = [shard_rows(rows, 64, (i, n)) for i in range(n)]
        assert ranges[0][0] == 0 and ranges[-1][1] == rows
        for (a, b), (c, _) in zip(ranges, ranges[1:]):
            assert b == c and a <= b and a % 64 == 0


def test_two_processes_give_the_arrays_of_one(tmp_path, single):
    store = tmp_path / "two.zarr"
    procs = [_extract(store, "--shard", f"{i}/2", wait=False) for i in range(2)]
    outs = [p.communicate() + (p.returncode,) for p in procs]
    assert all(code == 0 for _, _, code in outs), [err for _, err, _ in outs]
    computed = [{r["split"]: r["rows_computed"] for r in json.loads(out)} for out, _, _ in outs]
    assert computed[0]["train"] + computed[1]["train"] == 609  # each row computed once
    a, b = _arrays(single), _arrays(store)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    with open_store(store) as st:
        attrs = st.node_attrs(f"splits/train/{MODEL}")
        assert (attrs["complete"], attrs["rows_done"], attrs["shards"]) == (True, 609, 2)
    assert main(["-q", "store", "verify", str(store)]) == 0


def test_a_killed_shard_resumes_on_its_own(tmp_path, single):
    store = tmp_path / "s.zarr"
    _, _, code = _extract(store, "--shard", "1/2", env={KILL_ENV: "40"})
    assert code == -9  # SIGKILL before its 40th store mutation, part-way through
    out, err, code = _extract(store, "--shard", "0/2")
    assert code == 0, err
    with open_store(store) as st:  # shard 1 is still missing: not complete
        assert not st.node_attrs(f"splits/train/{MODEL}").get("complete")
    out, err, code = _extract(store, "--shard", "1/2")
    assert code == 0, err
    statuses = {r["split"]: r["status"] for r in json.loads(out)}
    assert "resumed" in statuses.values() or "extracted" in statuses.values()
    a, b = _arrays(single), _arrays(store)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_sharding_mistakes_are_one_line(tmp_path, capsys):
    h5 = tmp_path / "s.h5"
    assert main(["extract", *ARGS, "--store", str(h5), "--shard", "0/2"]) == 2
    err = capsys.readouterr().err
    assert one_line_error(err) and "HDF5" in err and not h5.exists()
    for bad in ("2/2", "x/2", "1", "-1/2"):
        assert main(["extract", *ARGS, "--store", str(tmp_path / "x.zarr"), "--shard", bad]) == 2
        assert "is not I/N" in capsys.readouterr().err
    store = tmp_path / "s.zarr"
    _, _, code = _extract(store, "--split", "train", "--shard", "0/2")
    assert code == 0
    assert main(["extract", *ARGS, "--split", "train", "--store", str(store)]) == 1
    assert "being extracted in 2 shards" in capsys.readouterr().err
    assert main(["extract", *ARGS, "--split", "train", "--store", str(store), "--shard", "0/3"]) == 1
    assert "--shard I/2" in capsys.readouterr().err


def test_cluster_readers_see_a_plain_store(single):
    """dask and xarray read the arrays lazily, chunk by chunk, straight from the store."""
    import dask.array as da
    import xarray as xr

    node = f"splits/test/{MODEL}"
    lazy = da.from_zarr(str(single), component=f"{node}/penultimate")
    with open_store(single) as st:
        expected = st.read(f"{node}/penultimate")
        assert lazy.chunks[0][0] == st.chunk_rows(f"{node}/penultimate")
    np.testing.assert_array_equal(lazy.compute(), expected)
    assert float(lazy.astype("float64").mean().compute()) == pytest.approx(expected.astype(np.float64).mean())
    ds = xr.open_zarr(str(single), group=node, consolidated=False, zarr_format=3)
    np.testing.assert_array_equal(ds["penultimate"].values, expected)


def test_shards_starting_together_create_the_store_once(tmp_path):
    """Two shards opening a store that does not exist yet: one creates it, the other opens it
    (without the setup lock around creation, zarr raises ContainsGroupError in the second)."""
    import threading

    errors = []

    def open_shard(path):
        try:
            open_store(path, "a", shared=True).close()
        except Exception as exc:  # collected: an exception in a thread would not fail the test
            errors.append(exc)

    for i in range(25):
        path = tmp_path / f"s{i}.zarr"
        threads = [threading.Thread(target=open_shard, args=(path,)) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        with open_store(path) as st:
            assert st.attrs["schema"] == 1
    assert errors == []
