"""Plugins (``oodcli.plugins``): a tiny distribution made in a temporary folder adds a backbone, a
scorer and a data source kind through the ``oodcli.plugins`` entry-point group; the commands run in
fresh interpreters with that folder on the path, as an installed plugin would be found."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import one_line_error

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_plugin() -> tuple[str, str]:
    """(module name, source) of the README's plugin example, so the documented plugin is the one tested."""
    text = README.read_text()
    section = text[text.index("### Plugins\n"):]
    entry = re.search(r"```toml\n.*?^(\w+) = \"(\w+):register\"", section, re.S | re.M)
    block = re.search(r"```python\n(.*?)```", section, re.S)
    assert entry and block and entry.group(1) == "noise"
    return entry.group(2), block.group(1)


#: lets a test see whether the plugin module was imported at all
MARKER = """import os
from pathlib import Path

if os.environ.get("PLUGIN_MARKER"):
    Path(os.environ["PLUGIN_MARKER"]).write_text("imported")
"""

BROKEN_MODULE = 'raise ImportError("needs the package frobnicate, which is not installed")\n'

CLASHING_MODULE = '''
def register():
    from oodcli.backbones.registry import DIGITS
    from oodcli.backbones.spec import BackboneSpec, Lazy, register as register_backbone
    from oodcli.scorers.base import Scorer, register as register_scorer

    @register_scorer
    class Early(Scorer):
        """Registered before the clash: must not survive it."""

        name = "clash_early"

    register_backbone(BackboneSpec(
        name="digits_cnn", family="digits_cnn", description="takes a built-in's name", layers=("logits",),
        default_layers=("logits",), preprocess=DIGITS, builder=Lazy("oodcli.backbones.digits_cnn:build"),
    ))
'''


def make_dist(site: Path, dist: str, module: str, source: str, entry_point: str) -> None:
    """A distribution as pip would install it: the module plus ``DIST.dist-info`` whose entry point
    ``entry_point`` names the module's ``register``."""
    (site / f"{module}.py").write_text(source)
    info = site / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[oodcli.plugins]\n{entry_point} = {module}:register\n")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("plugins")
    good = root / "good"
    good.mkdir()
    module, source = readme_plugin()
    make_dist(good, "oodcli-noise-plugin", module, MARKER + source, "noise")
    broken = root / "broken"
    broken.mkdir()
    make_dist(broken, "oodcli-broken-plugin", "oodcli_broken_plugin", BROKEN_MODULE, "broken")
    clashing = root / "clashing"
    clashing.mkdir()
    make_dist(clashing, "oodcli-clashing-plugin", "oodcli_clashing_plugin", CLASHING_MODULE, "clash")
    return root


def oodcli(site: Path, *args, dists=("good",), marker: Path | None = None) -> subprocess.CompletedProcess:
    """One command in a fresh interpreter that finds the given plugin folders."""
    env = dict(os.environ)
    paths = [str(site / d) for d in dists]
    env["PYTHONPATH"] = os.pathsep.join([*paths, str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    env.pop("PLUGIN_MARKER", None)
    if marker is not None:
        env["PLUGIN_MARKER"] = str(marker)
    return subprocess.run([sys.executable, "-m", "oodcli", "-q", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


@pytest.fixture(scope="module")
def store(site, tmp_path_factory):
    """A store made by the plugin's backbone over the plugin's data source."""
    path = tmp_path_factory.mktemp("plugin-store") / "noise.zarr"
    for split, spec in (("train", "noise:24"), ("test", "noise:12"), ("ood/far/noise", "noise:10")):
        proc = oodcli(site, "extract", "--model", "noise_cnn", "--data", spec, "--split", split, "--store", path,
                      "--json")
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert json.loads(proc.stdout)[0]["status"] == "extracted"
    return path


def test_plugin_backbone_and_source_extract_and_its_scorer_scores(site, store):
    from oodcli.store import open_store

    with open_store(store, "r") as st:
        logits = st.read("splits/test/noise_cnn/logits")
        labels = st.read("splits/ood/far/noise/labels")
    assert logits.shape == (12, 6) and np.isfinite(logits).all()
    assert (labels == -1).all()

    proc = oodcli(site, "score", "neg_norm,msp", "--store", store, "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout)
    assert {r["method"] for r in rows} == {"neg_norm", "msp"}
    with open_store(store, "r") as st:
        penultimate = st.read("splits/test/noise_cnn/penultimate").astype(np.float64)
        scores = st.read("scores/neg_norm/test")
    np.testing.assert_allclose(scores, -np.linalg.norm(penultimate, axis=1), rtol=1e-5)

    proc = oodcli(site, "report", "--store", store, "--format", "json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "neg_norm" in proc.stdout


def test_listings_say_where_each_entry_comes_from(site):
    proc = oodcli(site, "score", "--list", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    origins = {r["method"]: r["origin"] for r in json.loads(proc.stdout)}
    assert origins["neg_norm"] == "plugin oodcli-noise-plugin:noise"
    assert origins["msp"] == "built-in"

    proc = oodcli(site, "score", "--list")
    line = next(line for line in proc.stdout.splitlines() if "neg_norm" in line)
    assert "oodcli-noise-plugin:noise" in line

    proc = oodcli(site, "extract", "--list-models")
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if "noise_cnn" in line)
    assert "plugin oodcli-noise-plugin:noise" in line
    assert "built-in" in next(line for line in proc.stdout.splitlines() if "digits_cnn-tiny" in line)


def test_report_and_store_info_do_not_import_plugins(site, store, tmp_path):
    for command in (("report", "--store", store), ("store", "info", store), ("score", "msp", "--store", store)):
        marker = tmp_path / "imported"
        proc = oodcli(site, *command, marker=marker)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert not marker.exists(), command
    proc = oodcli(site, "score", "neg_norm", "--store", store, marker=marker)  # the control: a miss imports it
    assert proc.returncode == 0 and marker.exists(), proc.stderr[-3000:]


def test_a_broken_plugin_is_one_line_and_leaves_other_commands_working(site, store):
    proc = oodcli(site, "score", "msp", "--store", store, dists=("good", "broken"))
    assert proc.returncode == 0, proc.stderr[-3000:]  # needs no plugin: the broken one is never imported
    assert "broken" not in proc.stderr

    proc = oodcli(site, "score", "neg_norm", "--store", store, dists=("good", "broken"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    notes = [line for line in proc.stderr.splitlines() if "could not be loaded" in line]
    assert notes == ["note: plugin broken (dist oodcli-broken-plugin) could not be loaded: ImportError: needs the "
                     "package frobnicate, which is not installed; the commands that do not use it are unaffected"]

    proc = oodcli(site, "score", "frob_score", "--store", store, dists=("broken",))
    assert proc.returncode == 2
    error = [line for line in proc.stderr.splitlines() if not line.startswith("note:")]
    assert one_line_error("\n".join(error)), proc.stderr
    assert "unknown method 'frob_score'" in error[0] and "ImportError: needs the package frobnicate" in error[0]

    proc = oodcli(site, "extract", "--model", "frob_net", "--data", "frob:3", "--split", "test", "--store",
                  store.parent / "never.zarr", dists=("broken",))
    assert proc.returncode == 2 and "unknown model 'frob_net'" in proc.stderr and "frobnicate" in proc.stderr
    assert not (store.parent / "never.zarr").exists()


def test_a_plugin_taking_a_built_in_name_keeps_nothing(site):
    proc = oodcli(site, "score", "--list", "--json", dists=("clashing", "good"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    methods = {r["method"] for r in json.loads(proc.stdout)}
    assert "clash_early" not in methods and "neg_norm" in methods  # the good plugin still loads
    assert "plugin clash (dist oodcli-clashing-plugin) could not be loaded: ValueError: backbone 'digits_cnn' " \
           "registered twice" in proc.stderr


def test_unknown_data_source_kind_names_the_failed_plugin(site, tmp_path):
    proc = oodcli(site, "extract", "--model", "digits_cnn-tiny", "--data", "frob:3", "--split", "test", "--store",
                  tmp_path / "s.zarr", dists=("broken",))
    assert proc.returncode == 2 and "unknown data source 'frob:3'" in proc.stderr
    assert "plugin broken (dist oodcli-broken-plugin) could not be loaded" in proc.stderr.splitlines()[-1]
    assert not (tmp_path / "s.zarr").exists()


def test_built_ins_first_imported_by_a_plugin_stay_built_in(site):
    """A backbone lookup loads the plugins before any scorer is imported; the plugin's own import of
    the scorers declares the built-ins, which must not be counted as the plugin's."""
    code = ("import sys\n"
            "from oodcli.backbones import get_spec\n"
            "assert 'oodcli.scorers' not in sys.modules\n"
            "get_spec('noise_cnn')\n"
            "from oodcli.plugins import origin\n"
            "print(origin('scorer', 'msp'), '|', origin('scorer', 'neg_norm'), '|', origin('data source', 'noise'))\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site / "good"), str(Path(__file__).resolve().parents[1])]))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split("|") == ["built-in ", " plugin oodcli-noise-plugin:noise ",
                                      " plugin oodcli-noise-plugin:noise\n"]
