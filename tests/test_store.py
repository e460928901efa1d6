import json

import numpy as np
import pytest

from oodcli.errors import OodError
from oodcli.store import chunk_rows_for, list_backbones, list_splits, open_store


@pytest.fixture(params=["s.zarr", "s.h5"])
def store_path(request, tmp_path):
    return tmp_path / request.param


def _fill(path):
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(70, 5)).astype(np.float16)
    with open_store(path, "a") as st:
        st.write_array("splits/ood/far/x/labels", -np.ones(70, dtype=np.int64))
        st.write_array("splits/ood/far/x/ids", np.arange(70, dtype=np.int64))
        st.set_attrs("splits/ood/far/x", role="ood-far", n=70)
        st.create_array("splits/ood/far/x/net/penultimate", (70, 5), np.float16, chunk_rows=16)
        for start in range(0, 70, 16):
            st.write_rows("splits/ood/far/x/net/penultimate", start, feats[start : start + 16])
        st.set_attrs("splits/ood/far/x/net", complete=True, layers=["penultimate"], nested={"a": [1, 2]})
    return feats


def test_round_trip(store_path):
    feats = _fill(store_path)
    with open_store(store_path) as st:
        assert st.backend == ("hdf5" if store_path.suffix == ".h5" else "zarr")
        assert st.attrs["schema"] == 1
        assert list_splits(st) == ["ood/far/x"]
        assert list_backbones(st, "ood/far/x") == ["net"]
        assert st.node_attrs("splits/ood/far/x/net") == {
            "complete": True, "layers": ["penultimate"], "nested": {"a": [1, 2]}
        }
        np.testing.assert_array_equal(st.read("splits/ood/far/x/net/penultimate"), feats)
        blocks = list(st.iter_rows("splits/ood/far/x/net/penultimate"))
        assert [start for start, _ in blocks] == [0, 16, 32, 48, 64]
        np.testing.assert_array_equal(np.concatenate([b for _, b in blocks]), feats)
        assert st.dtype("splits/ood/far/x/net/penultimate") == np.float16


def test_both_backends_hold_the_same_tree(tmp_path):
    a, b = tmp_path / "a.zarr", tmp_path / "b.h5"
    _fill(a), _fill(b)
    with open_store(a) as za, open_store(b) as hb:
        assert list(za.walk_arrays()) == list(hb.walk_arrays())
        for name in za.walk_arrays():
            np.testing.assert_array_equal(za.read(name), hb.read(name))
            assert za.node_attrs(name) == hb.node_attrs(name)


def test_plain_zarr_and_h5py_can_read_a_store(tmp_path):
    import h5py
    import zarr

    feats = _fill(tmp_path / "a.zarr")
    _fill(tmp_path / "b.h5")
    z = zarr.open_group(tmp_path / "a.zarr", mode="r")
    np.testing.assert_array_equal(z["splits/ood/far/x/net/penultimate"][:], feats)
    with h5py.File(tmp_path / "b.h5", "r") as f:
        np.testing.assert_array_equal(f["splits/ood/far/x/net/penultimate"][:], feats)
        assert json.loads(f["splits/ood/far/x/net"].attrs["complete"]) is True


def test_missing_store_is_a_clear_error(tmp_path):
    with pytest.raises(OodError, match="no store at"):
        open_store(tmp_path / "nope.zarr")


def test_corrupt_store_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.zarr"
    bad.mkdir()
    (bad / "zarr.json").write_text("{not json")
    with pytest.raises(OodError, match="cannot open store .*corrupt") as info:
        open_store(bad)
    assert "\n" not in str(info.value)
    bad_h5 = tmp_path / "bad.h5"
    bad_h5.write_bytes(b"garbage" * 100)
    with pytest.raises(OodError, match="cannot open store"):
        open_store(bad_h5)


def test_foreign_zarr_group_is_refused(tmp_path):
    import zarr

    g = zarr.open_group(tmp_path / "other.zarr", mode="w")
    g.create_array("x", shape=(3,), dtype="f4")
    with pytest.raises(OodError, match="not an oodcli store"):
        open_store(tmp_path / "other.zarr", "a")


def test_chunk_rows_scale_with_row_size():
    assert chunk_rows_for((10,), np.float16) == 65536
    assert chunk_rows_for((196, 512), np.float16) == 41  # ~8 MiB of patch tokens
    assert chunk_rows_for((10_000_000,), np.float32) == 16


# ---- names, transactions, locks, damage -------------------------------------------------

from oodcli.errors import UsageError  # noqa: E402
from oodcli.store import (  # noqa: E402
    TXN_ROOT,
    StoreDamaged,
    Transaction,
    check_name,
    half_made_splits,
    remove_nodes,
    uninterrupted,
)


@pytest.mark.parametrize("name", ["train", "ood/far/textures", "ood/near/ssb-hard", "a b/c_d.e+f"])
def test_good_names_pass(name):
    assert check_name(name) == name


@pytest.mark.parametrize("name,why", [
    ("", "empty"), ("/ood/x", "starts or ends"), ("ood/x/", "starts or ends"), ("ood//x", "empty part"),
    ("ood/../x", "'..' part"), ("ood/./x", "'.' part"), (".txn", "reserved"), ("ood/.x", "reserved"),
    (" ood", "surrounding spaces"), ("ood/x ", "surrounding spaces"), ("a\\b", "backslash"),
    ("a\nb", "control"), ("zarr.json", "reserved"), ("ood/c", "reserved"),
])
def test_bad_names_are_one_usage_error(name, why):
    with pytest.raises(UsageError, match=why) as info:
        check_name(name, "--split")
    assert "\n" not in str(info.value).replace(name, "")


def _snapshot(path):
    with open_store(path) as st:
        return {name: (st.read(name).tobytes(), st.node_attrs(name)) for name in st.walk_arrays()}


def test_transaction_lands_whole_or_not_at_all(store_path):
    _fill(store_path)
    before = _snapshot(store_path)
    with open_store(store_path, "r+") as st:
        with pytest.raises(RuntimeError):
            with st.transaction() as txn:
                st.write_array(txn.stage("scores/m/ood/far/x"), np.ones(70, np.float32), method="m")
                txn.remove("splits/ood/far/x")
                raise RuntimeError("fails half-way")
        assert not st.exists(TXN_ROOT) or not st.children(TXN_ROOT, hidden=True)
    assert _snapshot(store_path) == before
    with open_store(store_path, "r+") as st:
        with st.transaction() as txn:
            st.write_array(txn.stage("scores/m/ood/far/x"), np.ones(70, np.float32), method="m")
        assert st.read("scores/m/ood/far/x").sum() == 70
        assert st.node_attrs("scores/m/ood/far/x") == {"complete": True, "method": "m"}
        assert st.children(TXN_ROOT, hidden=True) == []


def test_committed_transaction_is_finished_by_the_next_open(store_path, monkeypatch):
    """A crash after the commit marker (simulated: the apply step dies half-way) is rolled
    forward by whoever opens the store next, readers included."""
    _fill(store_path)
    with open_store(store_path, "r+") as st:
        with st.transaction() as txn:
            st.write_array(txn.stage("scores/m/ood/far/x"), np.zeros(70, np.float32))
        moves = []
        real_move = type(st).move

        def dying_move(self, source, target):
            moves.append(target)
            if len(moves) == 2:  # old node parked, new one not yet in place
                raise SystemExit("killed")
            real_move(self, source, target)

        monkeypatch.setattr(type(st), "move", dying_move)
        with pytest.raises(SystemExit):
            with st.transaction() as txn:
                st.write_array(txn.stage("scores/m/ood/far/x"), np.full(70, 2.0, np.float32), method="new")
        monkeypatch.setattr(type(st), "move", real_move)
        assert not st.exists("scores/m/ood/far/x")  # mid-apply: the old one is parked
    with open_store(store_path) as st:  # a reader finishes it
        assert st.read("scores/m/ood/far/x").tolist() == [2.0] * 70
        assert st.node_attrs("scores/m/ood/far/x")["method"] == "new"
        assert not st.exists(TXN_ROOT)


def test_uncommitted_staging_is_dropped_by_the_next_writer(store_path):
    _fill(store_path)
    before = _snapshot(store_path)
    with open_store(store_path, "r+") as st:
        txn = Transaction(st).__enter__()
        st.write_array(txn.stage("scores/m/ood/far/x"), np.zeros(70, np.float32))  # then "killed"
    with open_store(store_path, "r+") as st:
        assert not st.exists(TXN_ROOT)
    assert _snapshot(store_path) == before


def test_transaction_refuses_overlapping_nodes(store_path):
    _fill(store_path)
    with open_store(store_path, "r+") as st:
        with pytest.raises(ValueError, match="overlap"):
            with st.transaction() as txn:
                txn.stage("scores/m")
                txn.remove("scores/m/x")


def test_second_writer_is_refused_in_one_line(store_path):
    _fill(store_path)
    with open_store(store_path, "r+"):
        with pytest.raises(OodError, match="another oodcli command is writing") as info:
            open_store(store_path, "r+")
        assert "\n" not in str(info.value)
        if store_path.suffix == ".zarr":
            with open_store(store_path) as reader:  # readers do not wait for writers
                assert list_splits(reader) == ["ood/far/x"]
    with open_store(store_path, "r+"):  # released on close
        pass


def test_missing_chunk_is_damage_not_zeros(tmp_path):
    path = tmp_path / "s.zarr"
    _fill(path)
    (path / "splits/ood/far/x/net/penultimate/c/1/0").unlink()
    with open_store(path) as st:
        st.read("splits/ood/far/x/net/penultimate", slice(0, 16))  # other chunks still read
        with pytest.raises(StoreDamaged, match="chunk 1 of 'splits/ood/far/x/net/penultimate' .rows 16-31. is missing"):
            st.read("splits/ood/far/x/net/penultimate")
        assert st.missing_chunks("splits/ood/far/x/net/penultimate") == [1]


def test_all_zero_chunks_are_stored(store_path):
    """Zarr skips chunks equal to the fill value by default; then a lost chunk would read as zeros."""
    with open_store(store_path, "a") as st:
        st.write_array("z", np.zeros(40, np.int64))
        assert st.missing_chunks("z") == []
    if store_path.suffix == ".zarr":
        assert (store_path / "z/c/0").exists()


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_altered_chunk_fails_its_checksum(store_path, damage):
    _fill(store_path)
    if store_path.suffix == ".zarr":
        chunk = store_path / "splits/ood/far/x/net/penultimate/c/2/0"
        data = bytearray(chunk.read_bytes())
        if damage == "truncate":
            del data[-7:]
        else:
            data[5] ^= 0xFF
        chunk.write_bytes(bytes(data))
    else:
        import h5py

        with h5py.File(store_path, "r") as f:
            offset = f["splits/ood/far/x/net/penultimate"].id.get_chunk_info(2).byte_offset
        raw = bytearray(store_path.read_bytes())
        raw[offset + 5] ^= 0xFF
        store_path.write_bytes(bytes(raw))
    with open_store(store_path) as st:
        with pytest.raises(StoreDamaged, match="cannot read 'splits/ood/far/x/net/penultimate' rows 32-48"):
            list(st.iter_rows("splits/ood/far/x/net/penultimate"))


def test_half_made_split_is_recognised(store_path):
    _fill(store_path)
    with open_store(store_path, "r+") as st:
        st.write_array("splits/ood/far/y/labels", -np.ones(5, np.int64))  # ids and attributes never came
        assert list_splits(st) == ["ood/far/x"]
        assert half_made_splits(st) == ["ood/far/y"]
        assert remove_nodes(st, ["ood/far/y"]) == ["splits/ood/far/y"]
        assert half_made_splits(st) == []


def test_remove_a_split_takes_its_scores_and_gradients(store_path):
    _fill(store_path)
    with open_store(store_path, "r+") as st:
        st.write_array("scores/m/ood/far/x", np.zeros(70, np.float32))
        st.write_array("grads/g/ood/far/x", np.zeros((70, 2), np.float32))
        st.write_array("scores/m/test", np.zeros(3, np.float32))
        removed = remove_nodes(st, ["ood/far/x"])
        assert removed == ["splits/ood/far/x", "scores/m/ood/far/x", "grads/g/ood/far/x"]
        assert list(st.walk_arrays()) == ["scores/m/test"]
        assert remove_nodes(st, ["m"]) == ["scores/m"]
        with pytest.raises(UsageError, match="no split, method or node 'nope'"):
            remove_nodes(st, ["nope"])


def test_interrupt_waits_for_the_store_operation(ctrl_c):
    import os
    import signal

    done = []
    with pytest.raises(KeyboardInterrupt):
        with uninterrupted():
            os.kill(os.getpid(), signal.SIGINT)
            done.append("finished")
    assert done == ["finished"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
