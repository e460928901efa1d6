"""The report: metrics per OOD set and near/far averages, machine formats, plots, HTML."""

import base64
import csv
import io
import json

import numpy as np
import pytest
from sklearn.metrics import roc_curve

from conftest import one_line_error, run
from oodcli.cli import main
from oodcli.metrics import ood_metrics
from oodcli.reporting import roc_points
from oodcli.store import open_store
from test_scorers import make_store

METHODS = ["msp", "energy", "vim"]


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    path = make_store(tmp_path_factory.mktemp("report") / "s.zarr")
    assert main(["-q", "score", ",".join(METHODS), "--store", str(path)]) == 0
    return path


def test_report_numbers_and_averages(capsys, scored):
    code, out, _ = run(capsys, "report", "--store", scored, "--json")
    assert code == 0
    report = json.loads(out)
    assert report["ood_splits"] == {"ood/far/b": "far", "ood/near/a": "near"}
    assert set(report["methods"]) == set(METHODS)
    with open_store(scored) as st:
        labels = st.read("splits/test/labels")
        logits = st.read("splits/test/m/logits")
        for method in METHODS:
            data = report["methods"][method]
            for split, group in report["ood_splits"].items():
                want = ood_metrics(st.read(f"scores/{method}/test"), st.read(f"scores/{method}/{split}")).as_dict()
                assert data["sets"][split] == pytest.approx(want)
                assert data["averages"][group] == pytest.approx(want)  # one set per group here
    assert report["id_accuracy"] == pytest.approx(np.mean(logits.argmax(1) == labels))
    assert report["methods"]["vim"]["hparams"] == {"dim": None}


def test_report_formats(capsys, scored):
    code, out, _ = run(capsys, "report", "--store", scored, "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and len(rows) == len(METHODS) * 4  # two sets + two averages each
    assert {r["ood_set"] for r in rows} == {"ood/near/a", "ood/far/b", "near_average", "far_average"}
    code, out, _ = run(capsys, "report", "--store", scored, "--format", "markdown", "--methods", "vim")
    assert code == 0 and "| vim |" in out and "| msp |" not in out
    code, out, _ = run(capsys, "report", "--store", scored)
    assert code == 0 and "near avg" in out and "far avg" in out and "ID accuracy" in out


def test_fpr_convention_chooses_the_tables_column_and_json_carries_both(capsys, scored):
    code, out, _ = run(capsys, "report", "--store", scored, "--json")
    report = json.loads(out)
    cell = report["methods"]["energy"]["sets"]["ood/near/a"]
    assert {"fpr95", "fpr95_openood", "aupr_in_openood", "aupr_out_openood"} <= set(cell)
    with open_store(scored) as st:
        id_s, ood_s = st.read("scores/energy/test"), st.read("scores/energy/ood/near/a")
    # OpenOOD: ID flagged at the first threshold catching 95% of OOD (OOD positive, score negated)
    is_ood = np.r_[np.zeros(len(id_s)), np.ones(len(ood_s))]
    fpr, tpr, _ = roc_curve(is_ood, -np.r_[id_s, ood_s])
    assert cell["fpr95_openood"] == pytest.approx(fpr[np.argmax(tpr >= 0.95)])
    rows = {}
    for convention in ("id", "openood"):
        code, out, _ = run(capsys, "report", "--store", scored, "--format", "markdown", "--fpr", convention,
                           "--methods", "energy")
        assert code == 0
        rows[convention] = next(line for line in out.splitlines() if line.startswith("| energy |"))
    key = {"id": "fpr95", "openood": "fpr95_openood"}
    for convention, line in rows.items():
        shown = line.split("|")[2].split("/")[1].strip().strip("*")
        assert shown == f"{100 * cell[key[convention]]:.1f}"
    code, out, _ = run(capsys, "report", "--store", scored, "--format", "markdown", "--fpr", "openood")
    assert "OOD positive" in out and "OpenOOD v1.5" in out
    code, out, _ = run(capsys, "report", "--store", scored, "--format", "csv")
    assert "fpr95_openood" in out.splitlines()[0]
    code, _, err = run(capsys, "report", "--store", scored, "--fpr", "oodpos")
    assert code == 2 and one_line_error(err) and "--fpr" in err


def test_constant_scores_are_said_and_marked_not_reported_as_chance(capsys, tmp_path):
    path = make_store(tmp_path / "flat.zarr")
    # at T = 1e30 the energy T * logsumexp(z / T) is T log C for every row in float32
    code, out, err = run(capsys, "score", "energy,msp", "--store", path, "-p", "energy.temperature=1e30")
    assert code == 0 and "constant" in err and "energy" in err
    with open_store(path) as st:
        assert np.ptp(st.read("scores/energy/test")) == 0
    code, out, _ = run(capsys, "report", "--store", path, "--json")
    energy = json.loads(out)["methods"]["energy"]
    assert energy["sets"] == {} and energy["averages"] == {}
    assert sorted(energy["constant"]) == ["ood/far/b", "ood/near/a"]
    code, out, _ = run(capsys, "report", "--store", path, "--format", "markdown")
    row = next(line for line in out.splitlines() if line.startswith("| energy |"))
    assert "const" in row and "50.0" not in row and "const = the same score" in out


def test_a_method_without_scores_on_the_id_split_is_left_out_with_its_command(capsys, tmp_path):
    from test_scorers import SPLITS

    path = make_store(tmp_path / "two_ids.zarr", splits={**SPLITS, "test2": 40})
    assert run(capsys, "-q", "score", "msp,energy", "--store", path)[0] == 0
    assert run(capsys, "-q", "score", "msp", "--store", path, "--id", "test2")[0] == 0
    code, out, _ = run(capsys, "report", "--store", path, "--id", "test2", "--json")
    report = json.loads(out)
    assert code == 0 and list(report["methods"]) == ["msp"]
    assert "oodcli score energy" in report["left_out"]["energy"] and "--id test2" in report["left_out"]["energy"]
    code, out, _ = run(capsys, "report", "--store", path, "--id", "test2", "--format", "markdown")
    assert code == 0 and "left out" in out and "energy" in out
    code, _, err = run(capsys, "report", "--store", path, "--id", "test2", "--methods", "energy")
    assert code == 1 and one_line_error(err) and "oodcli score energy" in err


def test_the_left_out_command_repeats_the_alias_backbone_and_hyperparameters(capsys, tmp_path):
    """Pasted as given, the command fills the gap with the settings of the scores already there."""
    import shlex

    from test_scorers import SPLITS

    path = make_store(tmp_path / "two_ids.zarr", splits={**SPLITS, "test2": 40})
    assert run(capsys, "-q", "score", "energy", "--as", "energy-t2", "-p", "energy.temperature=2", "--store", path)[0] == 0
    assert run(capsys, "-q", "score", "msp", "--store", path, "--id", "test2")[0] == 0
    code, out, _ = run(capsys, "report", "--store", path, "--id", "test2", "--json")
    command = json.loads(out)["left_out"]["energy-t2"].strip("'")
    args = shlex.split(command)
    assert args[:3] == ["oodcli", "score", "energy"] and "--as energy-t2" in command
    assert "-p energy.temperature=2.0" in command and "--id test2" in command and "--backbone" in command
    assert run(capsys, "-q", *args[1:])[0] == 0
    with open_store(path) as st:
        assert st.node_attrs("scores/energy-t2/test2")["hparams"] == {"temperature": 2.0}
    code, out, _ = run(capsys, "report", "--store", path, "--id", "test2", "--json")
    assert "energy-t2" in json.loads(out)["methods"]


def test_plots_and_self_contained_html(capsys, tmp_path, scored):
    plots, page = tmp_path / "plots", tmp_path / "out" / "report.html"
    code, out, err = run(capsys, "report", "--store", scored, "--plots", plots, "--html", page)
    assert code == 0, err
    names = sorted(p.name for p in plots.iterdir())
    assert names == sorted([f"hist_{m}.png" for m in METHODS] + [f"roc_{m}.png" for m in METHODS] + ["summary_heatmap.png"])
    for p in plots.iterdir():
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = page.read_text()
    embedded = html.split('src="data:image/png;base64,')[1:]
    assert len(embedded) == 2 * len(METHODS) + 1  # and the summary heatmap
    assert base64.b64decode(embedded[0].split('"')[0])[:4] == b"\x89PNG"
    assert "http" not in html.replace("http-equiv", "")  # nothing fetched from elsewhere
    assert "<table>" in html and "near avg" in html and "vim" in html
    assert "near avg" in out  # the table still goes to stdout


def test_roc_points_equal_sklearn():
    rng = np.random.default_rng(0)
    id_s, ood_s = np.round(rng.normal(1, 1, 200), 1), np.round(rng.normal(0, 1, 150), 1)  # with ties
    fpr, tpr = roc_points(id_s, ood_s)
    want_fpr, want_tpr, _ = roc_curve(np.r_[np.ones(200), np.zeros(150)], np.r_[id_s, ood_s], drop_intermediate=False)
    np.testing.assert_allclose(fpr, want_fpr)
    np.testing.assert_allclose(tpr, want_tpr)
    assert np.trapezoid(tpr, fpr) == pytest.approx(ood_metrics(id_s, ood_s).auroc)


def test_report_bad_input(capsys, tmp_path, scored):
    afile = tmp_path / "file.txt"
    afile.write_text("x")
    code, _, err = run(capsys, "report", "--store", scored, "--plots", afile)
    assert code == 2 and one_line_error(err) and "--plots" in err
    code, _, err = run(capsys, "report", "--store", scored, "--html", tmp_path)
    assert code == 2 and one_line_error(err) and "--html" in err
    empty = make_store(tmp_path / "empty.zarr")
    code, _, err = run(capsys, "report", "--store", empty)
    assert code == 1 and one_line_error(err) and "no scores yet" in err


def test_average_runs_merges_name_at_run_rows_and_keeps_plain_names():
    from oodcli.reporting import METRIC_NAMES, average_over_runs

    def row(auroc, sets=("a", "b")):
        metrics = {k: auroc for k in METRIC_NAMES}
        return {"backbone": "clip", "hparams": {}, "sets": {s: dict(metrics) for s in sets},
                "missing": [], "averages": {"far": dict(metrics)}}

    methods = {"mcm": row(0.5), "neg@1": row(0.6), "neg@2": row(0.8, sets=("a",)), "coop": row(0.7), "coop@1": row(0.9)}
    merged = average_over_runs(methods)
    assert list(merged) == ["mcm", "neg", "coop", "coop@mean"]
    assert merged["neg"]["runs"] == ["neg@1", "neg@2"]
    assert merged["neg"]["sets"]["a"]["auroc"] == pytest.approx(0.7)
    assert "b" not in merged["neg"]["sets"]  # a set only one run has is not averaged
    assert merged["coop"] is methods["coop"] and merged["coop@mean"]["runs"] == ["coop@1"]


# ---- --sort, --rank and the best value per column ----------------------------------------


def _auroc_table(report):
    """{method: {column key: auroc}} over every OOD set and group average."""
    return {m: {**{s: v["auroc"] for s, v in d["sets"].items()},
                **{f"avg:{g}": v["auroc"] for g, v in d["averages"].items()}} for m, d in report["methods"].items()}


def test_rank_is_the_mean_auroc_rank_over_ood_sets(capsys, scored):
    from scipy.stats import rankdata

    code, out, _ = run(capsys, "report", "--store", scored, "--json", "--rank")
    assert code == 0
    report = json.loads(out)
    sets = list(report["ood_splits"])
    aurocs = np.array([[report["methods"][m]["sets"][s]["auroc"] for s in sets] for m in METHODS])
    want = rankdata(-aurocs, axis=0).mean(axis=1)  # 1 = highest AUROC on a set, ties share
    for m, w in zip(METHODS, want):
        assert report["methods"][m]["mean_rank"] == pytest.approx(w)
    code, out, _ = run(capsys, "report", "--store", scored, "--json", "--rank", "--sort", "rank")
    ranks = [d["mean_rank"] for d in json.loads(out)["methods"].values()]
    assert ranks == sorted(ranks)
    code, out, _ = run(capsys, "report", "--store", scored, "--rank", "--format", "csv")
    assert code == 0 and sum(r["ood_set"] == "mean_rank" for r in csv.DictReader(io.StringIO(out))) == len(METHODS)


def test_sort_orders_methods_by_a_column_and_metric(capsys, scored):
    code, out, _ = run(capsys, "report", "--store", scored, "--json", "--sort", "near avg")
    report = json.loads(out)
    values = [d["averages"]["near"]["auroc"] for d in report["methods"].values()]
    assert code == 0 and values == sorted(values, reverse=True) and set(report["methods"]) == set(METHODS)
    assert report["sorted_by"] == {"column": "avg:near", "metric": "auroc"}
    code, out, _ = run(capsys, "report", "--store", scored, "--json", "--sort", "b:fpr95")  # a set by its title
    values = [d["sets"]["ood/far/b"]["fpr95"] for d in json.loads(out)["methods"].values()]
    assert code == 0 and values == sorted(values)  # lower FPR first
    code, out, _ = run(capsys, "report", "--store", scored, "--format", "markdown", "--sort", "ood/near/a:aupr_in")
    rows = [line.split("|")[1].strip() for line in out.splitlines()[2:2 + len(METHODS)]]
    with open_store(scored) as st:
        want = sorted(METHODS, key=lambda m: -ood_metrics(st.read(f"scores/{m}/test"),
                                                           st.read(f"scores/{m}/ood/near/a")).aupr_in)
    assert rows == want


def test_best_values_are_marked_in_table_markdown_and_html(capsys, tmp_path, scored):
    from oodcli.reporting import add_ranks, best_cells, build_report, render_table

    code, out, _ = run(capsys, "report", "--store", scored, "--format", "markdown", "--rank")
    assert code == 0
    header = [c.strip() for c in out.splitlines()[0].split("|")[2:-1]]
    table = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
             for line in out.splitlines()[2:2 + len(METHODS)]}
    with open_store(scored) as st:
        report = add_ranks(build_report(st))
    aurocs = _auroc_table(report)
    keys = ["ood/near/a", "avg:near", "ood/far/b", "avg:far"]
    assert header == ["a", "near avg", "b", "far avg", "mean rank"]
    for col, key in enumerate(keys):
        top = max(round(100 * aurocs[m][key], 1) for m in METHODS)
        for m in METHODS:
            auroc_text = table[m][col].split(" / ")[0]
            assert auroc_text.startswith("**") == (round(100 * aurocs[m][key], 1) == top), (m, key, table[m][col])
        fprs = {m: round(100 * (report["methods"][m]["sets"].get(key) or report["methods"][m]["averages"][key[4:]])
                         ["fpr95"], 1) for m in METHODS}
        for m in METHODS:
            assert table[m][col].split(" / ")[1].startswith("**") == (fprs[m] == min(fprs.values()))
    best_rank = min(report["methods"][m]["mean_rank"] for m in METHODS)
    for m in METHODS:
        assert table[m][4].startswith("**") == (report["methods"][m]["mean_rank"] == best_rank)
    # the terminal table styles the same cells
    best = best_cells(report)
    rich_table = render_table(report)
    for col, key in enumerate(keys, start=1):
        cells = rich_table.columns[col]._cells
        for m, cell in zip(report["methods"], cells):
            styled = [cell.plain[s.start:s.end] for s in cell.spans if "bold" in str(s.style)]
            want = [f"{100 * aurocs[m][key]:.1f}"] if m in best[key]["auroc"] else []
            assert styled[:len(want)] == want
    page = tmp_path / "r.html"
    code, _, _ = run(capsys, "report", "--store", scored, "--html", page, "--rank", "--sort", "rank")
    html = page.read_text()
    assert code == 0 and html.count('<b class="best">') == sum(len(v) for c in best.values() for v in c.values())
    assert "mean rank" in html and "http" not in html.replace("http-equiv", "")


def test_sort_bad_input(capsys, scored):
    code, _, err = run(capsys, "report", "--store", scored, "--sort", "nope")
    assert code == 2 and one_line_error(err) and "no column" in err and "near avg" in err
    code, _, err = run(capsys, "report", "--store", scored, "--sort", "near avg:acc")
    assert code == 2 and one_line_error(err) and "unknown metric" in err
    code, _, err = run(capsys, "report", "--store", scored, "--sort", "rank")
    assert code == 2 and one_line_error(err) and "needs --rank" in err
