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
