"""Turn stored scores into OOD metrics: per OOD set, near/far averages (OpenOOD layout).

``build_report`` returns plain data; ``add_ranks`` and ``sort_methods`` order and rank it;
the renderers turn it into a rich table, JSON, CSV, Markdown or HTML, with the best value
of every column marked (highest AUROC, lowest FPR@95, lowest mean rank; compared as shown,
to 0.1 %, so that values that read the same are marked alike). Validation splits
(role ``ood-val``, for ``oodcli sweep``) are never among the OOD sets.

Full-spectrum OOD (``fsood``, OpenOOD v1.5): the covariate-shifted ID splits (role ``csid``) join
the ID test split as positives of every metric, and the accuracy over ID + cs-ID is reported
beside each split's own. Without it cs-ID splits count nowhere, as in OpenOOD's plain OOD
evaluation (``Evaluator.eval_ood(fsood=False)`` never loads them); the notes name them.
"""

from __future__ import annotations

import csv
import io
import json

import numpy as np

from oodcli.errors import OodError, UsageError
from oodcli.metrics import ood_metrics
from oodcli.scoring import (check_splits_exist, csid_splits, default_id_split, ood_splits, read_scores,
                             rescore_command, scored_methods)
from oodcli.store import Store, check_name, features_node, split_node, split_role

FORMATS = ("table", "json", "csv", "markdown")
METRIC_NAMES = ("fpr95", "auroc", "aupr_in", "aupr_out", "fpr95_openood", "aupr_in_openood", "aupr_out_openood")
LOWER_IS_BETTER = ("fpr95", "fpr95_openood", "rank")
# --fpr: which FPR@95 the tables show (JSON and CSV always carry both)
FPR_CONVENTIONS = {"id": "fpr95", "openood": "fpr95_openood"}
FPR_CAPTIONS = {
    "id": "FPR@95 with ID positive (share of OOD kept at 95% ID recall; MCM/NegLabel convention)",
    "openood": "FPR@95 with OOD positive (share of ID flagged at 95% OOD recall; OpenOOD v1.5 convention)",
}
RANK = "rank"  # the mean-rank column (--rank), and its key in --sort


def _group(role: str) -> str:
    return {"ood-near": "near", "ood-far": "far"}.get(role, "ood")


def build_report(store: Store, methods: list[str] | None = None, id_split: str | None = None,
                 average_runs: bool = False, fpr: str = "id", fsood: bool = False) -> dict:
    """Metrics of every method on every OOD set. ``fpr`` (``id`` or ``openood``) only chooses
    which FPR@95 the tables show; both are computed (see ``oodcli.metrics``). ``fsood`` counts
    the cs-ID splits as ID (OpenOOD's full-spectrum rule): a method needs scores on all of them."""
    if fpr not in FPR_CONVENTIONS:
        raise UsageError(f"unknown --fpr '{fpr}'; use one of {', '.join(FPR_CONVENTIONS)}")
    available = scored_methods(store)
    if not available:
        raise OodError(f"store {store.path} has no scores yet; run 'oodcli score METHOD --store {store.path}'")
    methods = methods or available
    missing = [m for m in methods if m not in available]
    if missing:
        raise UsageError(f"no scores for {', '.join(missing)} in {store.path}; scored: {', '.join(available)}")
    if id_split is not None:
        check_name(id_split, "--id")
    id_split = id_split or default_id_split(store)
    oods = ood_splits(store)
    csids = csid_splits(store)
    if fsood and not csids:
        raise OodError(f"store {store.path} has no cs-ID split (role csid) for --fsood; extract one, e.g. "
                       "'oodcli extract ... --benchmark cifar10 --split csid/cifar10c' or --data SOURCE --split csid/NAME")
    positives = [id_split, *csids] if fsood else [id_split]  # every row counted as ID
    check_splits_exist(store, [*positives, *oods])
    labels = store.read(f"{split_node(id_split)}/labels")
    groups = {s: _group(split_role(store, s)) for s in oods}
    report: dict = {
        "store": str(store.path),
        "id_split": id_split,
        "fpr": fpr,
        "fsood": fsood,
        "csid_splits": csids if fsood else [],
        "csid_not_counted": [] if fsood else csids,
        "ood_splits": {s: groups[s] for s in oods},
        "methods": {},
        "left_out": {},  # method -> the command that scores it on the ID (and, with fsood, cs-ID) splits
    }
    for method in methods:
        id_node = f"scores/{method}/{id_split}"
        attrs = store.node_attrs(id_node) if store.is_array(id_node) else {}
        if not attrs.get("complete"):
            # one method without scores on this ID split must not hide every other method's numbers
            report["left_out"][method] = _fill_command(store, method, id_split)
            continue
        id_scores = store.read(id_node)
        if len(id_scores) != len(labels):
            raise OodError(f"scores of '{method}' on '{id_split}' are stale (row count differs); re-score")
        if fsood:
            unscored = [s for s in csids if not _complete(store, f"scores/{method}/{s}")]
            if unscored:  # ID rows missing from the positives would change every number: no row at all
                report["left_out"][method] = _fill_command(store, method, id_split, ood=unscored)
                continue
            id_scores = np.concatenate([id_scores, *(_checked_scores(store, method, s, id_split, attrs) for s in csids)])
        per_set, missing, constant = {}, [], []
        for split in oods:
            node = f"scores/{method}/{split}"
            if not store.is_array(node):
                missing.append(split)
                continue
            ood_scores = _checked_scores(store, method, split, id_split, attrs)
            if np.ptp(np.r_[id_scores, ood_scores]) == 0:  # one value for every row: no ranking to measure
                constant.append(split)
                continue
            per_set[split] = ood_metrics(id_scores, ood_scores).as_dict()
        averages = {}
        for group in ("near", "far"):
            members = [per_set[s] for s in per_set if groups[s] == group]
            # an average over fewer sets than the store holds would pass for the full one
            if members and not any(groups[s] == group for s in missing + constant):
                averages[group] = {k: float(np.mean([m[k] for m in members])) for k in METRIC_NAMES}
        report["methods"][method] = {
            "backbone": attrs.get("backbone"),
            "hparams": attrs.get("hparams", {}),
            "sets": per_set,
            "missing": missing,
            "constant": constant,  # scored, but one value on ID and OOD alike: no metric, no average
            "averages": averages,
        }
        _add_threshold(store, report["methods"][method], method, id_split, id_scores, oods)
    if not report["methods"]:
        raise OodError(f"no method has scores on {' and '.join(positives)}; run "
                       f"{next(iter(report['left_out'].values()))}")
    accuracy = _accuracies(store, report, positives)
    report["id_accuracy"] = accuracy.get(id_split)
    if fsood:  # each cs-ID split's accuracy, and OpenOOD's FS-OOD ACC: ID test and cs-ID pooled
        report["csid_accuracy"] = {s: accuracy.get(s) for s in csids}
        report["fsood_accuracy"] = accuracy.get(None)
    if average_runs:
        report["methods"] = average_over_runs(report["methods"])
    return report


def _complete(store: Store, node: str) -> bool:
    return store.is_array(node) and bool(store.node_attrs(node).get("complete"))


def _checked_scores(store: Store, method: str, split: str, id_split: str, id_attrs: dict) -> np.ndarray:
    """A method's scores on ``split``, refused when they come from another model than its ID
    scores or no longer match the split's rows."""
    if store.node_attrs(f"scores/{method}/{split}").get("model_id") != id_attrs.get("model_id"):
        raise OodError(f"scores of '{method}' on '{split}' and '{id_split}' come from different models; re-score both")
    scores = read_scores(store, method, split)
    if len(scores) != store.shape(f"{split_node(split)}/labels")[0]:
        raise OodError(f"scores of '{method}' on '{split}' are stale (row count differs); re-score")
    return scores


def _add_threshold(store: Store, entry: dict, method: str, id_split: str, id_scores: np.ndarray,
                   oods: list[str]) -> None:
    """The decision at the threshold 'oodcli threshold' recorded, if any: the ID share kept (TPR)
    and, per OOD set, the share let through (FPR); or why the recorded one no longer holds."""
    from oodcli.deploy import read_threshold, threshold_node

    if not store.exists(threshold_node(method)):
        return
    try:
        t = read_threshold(store, method, id_split)
    except OodError as exc:
        entry["threshold"] = {"stale": str(exc)}
        return
    fpr = {s: float(np.mean(read_scores(store, method, s) >= t.value)) for s in oods if store.is_array(f"scores/{method}/{s}")}
    entry["threshold"] = {"value": t.value, "split": t.split, "tpr_asked": t.tpr,
                          "tpr": float(np.mean(id_scores >= t.value)), "fpr": fpr}


def _threshold_note(report: dict) -> str:
    """One clause per method with a recorded threshold (score >= t is in-distribution)."""
    parts = []
    for method, data in report["methods"].items():
        t = data.get("threshold")
        if not t:
            continue
        if "stale" in t:
            parts.append(f"{method}: recorded threshold no longer holds ({t['stale']})")
            continue
        sets = ", ".join(f"{s.split('/')[-1]} {100 * v:.1f}%" for s, v in t["fpr"].items())
        parts.append(f"{method} at t = {t['value']:.6g} (set on {t['split']} at TPR {100 * t['tpr_asked']:g}%): "
                     f"TPR {_positives_name(report)} {100 * t['tpr']:.1f}%, FPR {sets}")
    return ("at the recorded thresholds (score >= t is ID): " + "; ".join(parts)) if parts else ""


def _fill_command(store: Store, method: str, id_split: str, ood: list[str] = ()) -> str:
    """The command that gives ``method`` (a name written by ``score``, maybe an ``--as`` alias)
    scores on ``id_split`` (and the ``ood`` splits) with the settings of its existing scores."""
    identity = {"method": method}
    for child in store.children(f"scores/{method}"):
        node = f"scores/{method}/{child}"
        attrs = store.node_attrs(node) if store.is_array(node) else {}
        if attrs.get("method"):
            identity = attrs
            break
    return f"'{rescore_command(store, method, identity, id_split, ood)}'"


def average_over_runs(methods: dict) -> dict:
    """Merge methods named ``NAME@RUN`` (e.g. ``negprompt@seed1``, from ``score --as``) into one
    row ``NAME`` with each metric averaged over the runs; ``runs`` lists them. Only sets and
    averages every run has are kept, so a mean never mixes a different number of runs."""
    groups: dict[str, list[str]] = {}
    for name in methods:  # a plain NAME stays its own row; the runs' mean is then NAME@mean
        base = name.split("@", 1)[0]
        groups.setdefault(name if "@" not in name else base + ("@mean" if base in methods else ""), []).append(name)
    merged = {}
    for base, names in groups.items():
        if "@" not in names[0]:
            merged[base] = methods[base]
            continue
        rows = [methods[n] for n in names]

        def mean(tables: list[dict]) -> dict:
            keys = set.intersection(*(set(t) for t in tables))
            return {k: {m: float(np.mean([t[k][m] for t in tables])) for m in METRIC_NAMES} for k in sorted(keys)}

        merged[base] = {
            "backbone": rows[0]["backbone"] if len({r["backbone"] for r in rows}) == 1 else None,
            "hparams": rows[0]["hparams"],
            "sets": mean([r["sets"] for r in rows]),
            "missing": sorted({s for r in rows for s in r["missing"]}),
            "constant": sorted({s for r in rows for s in r.get("constant", [])}),
            "averages": mean([r["averages"] for r in rows]),
            "runs": names,
        }
    return merged


def _accuracies(store: Store, report: dict, splits: list[str]) -> dict[str | None, float]:
    """Classification accuracy from the stored logits, per split and (key None) over all of them
    pooled; a split without logits of the one classifier backbone, or with OOD labels, has none
    (and then neither has the pool)."""
    backbones = {m["backbone"] for m in report["methods"].values()}
    # only a backbone with a classifier has an accuracy (APEX/PALM models beside it have none)
    backbones = {b for b in backbones if store.is_array(f"{features_node(splits[0], b)}/logits")}
    if len(backbones) != 1:
        return {}
    backbone = backbones.pop()
    out: dict[str | None, float] = {}
    counts = []
    for split in splits:
        node = f"{features_node(split, backbone)}/logits"
        labels = store.read(f"{split_node(split)}/labels")
        if not store.is_array(node) or (labels < 0).any():
            continue
        correct = 0
        for start, block in store.iter_rows(node):
            correct += int((block.argmax(1) == labels[start : start + len(block)]).sum())
        out[split] = correct / len(labels)
        counts.append((correct, len(labels)))
    if len(counts) == len(splits):
        out[None] = sum(c for c, _ in counts) / sum(n for _, n in counts)
    return out


def _columns(report: dict) -> list[tuple[str, str | None]]:
    """(column title, OOD split or average group) in OpenOOD order: near sets, near avg, far sets, far avg."""
    cols: list[tuple[str, str | None]] = []
    for group in ("near", "far", "ood"):
        sets = [s for s, g in report["ood_splits"].items() if g == group]
        cols += [(s.split("/")[-1], s) for s in sets]
        if group != "ood" and sets:
            cols.append((f"{group} avg", f"avg:{group}"))
    return cols


def fpr_key(report: dict) -> str:
    """The metric behind the tables' FPR@95 column."""
    return FPR_CONVENTIONS[report.get("fpr", "id")]


def _cell(method: dict, key: str) -> dict | None:
    if key.startswith("avg:"):
        return method["averages"].get(key[4:])
    return method["sets"].get(key)


def _label(name: str, method: dict) -> str:
    return f"{name} (mean of {len(method['runs'])})" if method.get("runs") else name


def _shown(value: float, metric: str) -> float:
    """A value as the tables show it: metrics in % to 0.1, ranks to 0.01."""
    return round(value, 2) if metric == RANK else round(100 * value, 1)


# ---- ranking, sorting and the best value per column -----------------------------------------


def add_ranks(report: dict) -> dict:
    """Each method's mean rank over the OOD test sets (``mean_ranks``), stored as
    ``methods[m]["mean_rank"]`` (None: no set)."""
    for m, r in mean_ranks(report).items():
        report["methods"][m]["mean_rank"] = r
    report["ranked"] = True
    return report


def mean_ranks(report: dict) -> dict[str, float | None]:
    """Per set, methods ranked by AUROC (1 = highest; ties share their mean rank, among the
    methods scored on that set), then averaged over the sets each method has (None: no set)."""
    from oodcli.metrics import average_ranks

    names = list(report["methods"])
    ranks: dict[str, list[float]] = {m: [] for m in names}
    for split in report["ood_splits"]:
        have = [m for m in names if split in report["methods"][m]["sets"]]
        if not have:
            continue
        values = np.array([-report["methods"][m]["sets"][split]["auroc"] for m in have])
        for m, r in zip(have, average_ranks(values)):
            ranks[m].append(float(r))
    return {m: float(np.mean(ranks[m])) if ranks[m] else None for m in names}


def rank_order(report: dict) -> list[str]:
    """The methods best mean rank first (the summary heatmap's rows); methods without one last,
    equal ranks in the report's order."""
    ranks = mean_ranks(report)
    order = sorted(enumerate(ranks), key=lambda item: (ranks[item[1]] is None, ranks[item[1]] or 0.0, item[0]))
    return [m for _, m in order]


def _value(report: dict, method: str, key: str, metric: str) -> float | None:
    data = report["methods"][method]
    if key == RANK:
        return data.get("mean_rank")
    cell = _cell(data, key)
    return None if cell is None else cell[metric]


def sort_key_of(report: dict, text: str) -> tuple[str, str]:
    """``--sort COLUMN[:METRIC]`` as (column key, metric). COLUMN: a table column title ('near avg',
    'textures'), an OOD split name, or 'rank' (with --rank); METRIC: auroc (default), fpr95,
    aupr_in or aupr_out."""
    column, _, metric = text.rpartition(":") if ":" in text else (text, "", "auroc")
    column, metric = column.strip(), metric.strip() or "auroc"
    if metric not in METRIC_NAMES:
        raise UsageError(f"--sort '{text}': unknown metric '{metric}'; use one of {', '.join(METRIC_NAMES)}")
    if column == RANK:
        if not report.get("ranked"):
            raise UsageError("--sort rank needs --rank (the mean rank over OOD sets)")
        return RANK, RANK
    cols = _columns(report)
    for title, key in cols:
        if column in (title, key):
            return key, metric
    choices = [title for title, _ in cols] + ([RANK] if report.get("ranked") else [])
    raise UsageError(f"--sort '{column}' is no column of this report; use one of: {', '.join(choices)}")


def sort_methods(report: dict, text: str) -> dict:
    """Reorder ``report["methods"]`` best first by ``--sort COLUMN[:METRIC]``; methods without a
    value in that column go last; equal values keep their order."""
    key, metric = sort_key_of(report, text)
    sign = 1.0 if metric in LOWER_IS_BETTER else -1.0
    names = list(report["methods"])

    def order(item):
        i, m = item
        v = _value(report, m, key, metric)
        return (v is None, 0.0 if v is None else sign * v, i)

    report["methods"] = {m: report["methods"][m] for _, m in sorted(enumerate(names), key=order)}
    report["sorted_by"] = {"column": key, "metric": metric}
    return report


def best_cells(report: dict) -> dict[str, dict[str, list[str]]]:
    """Per column key and metric (auroc, fpr95; 'rank' for the rank column), the methods with the
    best value as shown (the highest AUROC, the lowest FPR@95 or mean rank)."""
    keys = [(key, ("auroc", fpr_key(report))) for _, key in _columns(report)]
    if report.get("ranked"):
        keys.append((RANK, (RANK,)))
    best: dict[str, dict[str, list[str]]] = {}
    for key, metrics in keys:
        for metric in metrics:
            values = {m: _value(report, m, key, metric) for m in report["methods"]}
            shown = {m: _shown(v, metric) for m, v in values.items() if v is not None}
            if not shown:
                continue
            top = (min if metric in LOWER_IS_BETTER else max)(shown.values())
            best.setdefault(key, {})[metric] = [m for m, v in shown.items() if v == top]
    return best


def _marked_parts(report: dict, best: dict, method: str, key: str) -> list[tuple[str, bool]]:
    """A cell as (text, is best) pieces: 'AUROC', ' / ', 'FPR'; or the mean rank."""
    if key == RANK:
        v = report["methods"][method].get("mean_rank")
        return [("-" if v is None else f"{v:.2f}", method in best.get(RANK, {}).get(RANK, []))]
    cell = _cell(report["methods"][method], key)
    if cell is None:
        return [("const" if key in report["methods"][method].get("constant", ()) else "-", False)]
    marks = best.get(key, {})
    return [(f"{100 * cell['auroc']:.1f}", method in marks.get("auroc", [])), (" / ", False),
            (f"{100 * cell[fpr_key(report)]:.1f}", method in marks.get(fpr_key(report), []))]


def _table_keys(report: dict) -> list[tuple[str, str]]:
    return _columns(report) + ([("mean rank", RANK)] if report.get("ranked") else [])


def _mark_note(report: dict) -> str:
    note = "best per column in bold (highest AUROC, lowest FPR@95"
    note += ", lowest mean rank over the OOD sets by AUROC)" if report.get("ranked") else ")"
    if report.get("sorted_by"):
        by = report["sorted_by"]
        column = next((t for t, k in _table_keys(report) if k == by["column"]), by["column"])
        note += f"; sorted by {column}" + ("" if by["metric"] == RANK else f" {by['metric']}")
    return note


def _positives_name(report: dict) -> str:
    """What counts as ID: the ID split, with --fsood joined by the cs-ID splits."""
    return " + ".join([report["id_split"], *report.get("csid_splits", [])])


def accuracy_note(report: dict, digits: int = 1) -> str:
    """'ID accuracy 97.1%' and, with --fsood, each cs-ID split's and the pooled ID + cs-ID one
    (OpenOOD's FS-OOD ACC); empty without a classifier's logits."""
    def pct(v):
        return f"{100 * v:.{digits}f}%"

    parts = [] if report.get("id_accuracy") is None else [f"ID accuracy {pct(report['id_accuracy'])}"]
    csid = {s: v for s, v in report.get("csid_accuracy", {}).items() if v is not None}
    if csid:
        parts.append("cs-ID accuracy " + ", ".join(f"{s} {pct(v)}" for s, v in csid.items()))
    if report.get("fsood_accuracy") is not None:
        parts.append(f"ID + cs-ID {pct(report['fsood_accuracy'])}")
    return ", ".join(parts)


def _csid_note(report: dict) -> str:
    if report.get("fsood"):
        return "full-spectrum OOD: cs-ID splits counted as ID (OpenOOD v1.5 FS-OOD)"
    if report.get("csid_not_counted"):
        return f"cs-ID splits {', '.join(report['csid_not_counted'])} not counted (--fsood counts them as ID)"
    return ""


def render_table(report: dict):
    from rich.table import Table

    acc = accuracy_note(report)
    title = f"OOD detection, AUROC / FPR@95 (%), ID = {_positives_name(report)}" + (f", {acc}" if acc else "")
    table = Table(title=title)
    from rich.text import Text

    table.add_column("method", style="bold")
    cols = _table_keys(report)
    for name, key in cols:
        table.add_column(name, justify="right", style="cyan" if key and key.startswith("avg:") else None)
    best = best_cells(report)
    for method, data in report["methods"].items():
        cells = [Text.assemble(*((t, "bold green") if b else t for t, b in _marked_parts(report, best, method, key)))
                 for _, key in cols]
        table.add_row(Text(_label(method, data)), *cells)
    table.caption = "; ".join(n for n in (FPR_CAPTIONS[report.get("fpr", "id")], _mark_note(report), _csid_note(report),
                                          _missing_note(report), _threshold_note(report)) if n)
    return table


def _missing_note(report: dict) -> str:
    """Which methods lack scores on some OOD sets (their averages over those groups are left out)."""
    gaps = [f"{m} ({', '.join(d['missing'])})" for m, d in report["methods"].items() if d.get("missing")]
    flat = [f"{m} ({', '.join(d['constant'])})" for m, d in report["methods"].items() if d.get("constant")]
    notes = []
    if gaps:
        notes.append(f"- = not scored; no average over a group with a missing set: {'; '.join(gaps)}")
    if report.get("left_out"):
        notes.append(f"left out, no scores on {_positives_name(report)}: "
                     + "; ".join(f"{m} (run {cmd})" for m, cmd in report["left_out"].items()))
    if flat:
        notes.append(f"const = the same score for every ID and OOD row, no metric and no average: {'; '.join(flat)}")
    return "; ".join(notes)


def render_markdown(report: dict) -> str:
    cols = _table_keys(report)
    best = best_cells(report)
    lines = [
        "| method | " + " | ".join(name for name, _ in cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for method, data in report["methods"].items():
        cells = ["".join(f"**{t}**" if b else t for t, b in _marked_parts(report, best, method, key)) for _, key in cols]
        lines.append(f"| {_label(method, data)} | " + " | ".join(cells) + " |")
    acc = accuracy_note(report, digits=2)
    ids = ", ".join(f"`{s}`" for s in _positives_name(report).split(" + "))
    footer = f"\nAUROC / FPR@95 in %, ID split{'s' * bool(report.get('csid_splits'))} {ids}; " \
             f"{FPR_CAPTIONS[report.get('fpr', 'id')]}"
    footer += (f", {acc}" if acc else "") + "".join(f"; {n}" for n in (_mark_note(report), _csid_note(report)) if n)
    for note in (_missing_note(report), _threshold_note(report)):
        if note:
            footer += f"\n\n{note}"
    return "\n".join(lines) + "\n" + footer + "\n"


CSV_STYLES = ("oodcli", "openood")
OPENOOD_CSV_COLUMNS = ("FPR@95", "AUROC", "AUPR_IN", "AUPR_OUT", "ACC")


def _acc_column(report: dict) -> float | None:
    """OpenOOD's ACC: ID accuracy, or with --fsood the accuracy over ID and cs-ID pooled."""
    return report.get("fsood_accuracy") if report.get("fsood") else report.get("id_accuracy")


def render_csv(report: dict, style: str = "oodcli") -> str:
    """Every metric per (method, OOD set) and near/far averages, fractions to 6 decimals, with
    ``accuracy`` (OpenOOD's ACC) on each row; with --fsood one row per ID and cs-ID split holds
    that split's accuracy alone. ``style="openood"``: OpenOOD's own table instead."""
    if style not in CSV_STYLES:
        raise UsageError(f"unknown --csv-style '{style}'; use one of {', '.join(CSV_STYLES)}")
    if style == "openood":
        return render_csv_openood(report)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["method", "ood_set", "group", *METRIC_NAMES, "threshold", "tpr_at_threshold", "fpr_at_threshold",
                     "accuracy"])
    acc = _acc_column(report)
    acc = "" if acc is None else f"{acc:.6f}"
    blank = [""] * (len(METRIC_NAMES) + 3)
    for method, data in report["methods"].items():
        if data.get("mean_rank") is not None:  # --rank: one row with the mean rank in place of the metrics
            writer.writerow([method, "mean_rank", "rank", f"{data['mean_rank']:.6f}", *blank[1:], ""])
        if report.get("fsood"):
            for split, value in [(report["id_split"], report.get("id_accuracy")), *report["csid_accuracy"].items()]:
                writer.writerow([method, split, "csid" if split in report["csid_splits"] else "id", *blank,
                                 "" if value is None else f"{value:.6f}"])
        t = data.get("threshold") or {}
        at = [f"{t['value']:.9g}", f"{t['tpr']:.6f}"] if "value" in t else ["", ""]
        for split, m in data["sets"].items():
            fpr = f"{t['fpr'][split]:.6f}" if split in t.get("fpr", {}) else ""
            writer.writerow([method, split, report["ood_splits"][split], *(f"{m[k]:.6f}" for k in METRIC_NAMES),
                             *at, fpr, acc])
        for group, m in data["averages"].items():
            writer.writerow([method, f"{group}_average", group, *(f"{m[k]:.6f}" for k in METRIC_NAMES), "", "", "", acc])
    return buf.getvalue()


def openood_rows(report: dict, method: str) -> list[tuple[str, dict]]:
    """(dataset, metrics) in the order of OpenOOD's evaluator table: near sets by their short
    names, ``nearood`` (their mean), far sets, ``farood``; sets of neither group after them."""
    data = report["methods"][method]
    rows = []
    for group in ("near", "far", "ood"):
        rows += [(s.split("/")[-1], data["sets"][s]) for s, g in report["ood_splits"].items()
                 if g == group and s in data["sets"]]
        if group in data["averages"]:
            rows.append((f"{group}ood", data["averages"][group]))
    return rows


def render_csv_openood(report: dict) -> str:
    """OpenOOD v1.5's CSV (what ``eval_ood.py --save-csv`` writes per method: the evaluator's
    table, values in % to 2 decimals), one block per method after a ``method`` column. Its
    metrics are OpenOOD's own whatever --fpr says: FPR@95 with OOD positive, trapezoid
    AUPR_IN / AUPR_OUT, and ACC the ID accuracy (with --fsood over ID and cs-ID pooled)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["method", "dataset", *OPENOOD_CSV_COLUMNS])
    acc = _acc_column(report)
    for method in report["methods"]:
        for name, m in openood_rows(report, method):
            values = [m["fpr95_openood"], m["auroc"], m["aupr_in_openood"], m["aupr_out_openood"], acc]
            writer.writerow([method, name, *("" if v is None else f"{100 * v:.2f}" for v in values)])
    return buf.getvalue()


def render_json(report: dict) -> str:
    return json.dumps(report, indent=2, sort_keys=False)


# ---- plots and the HTML report ---------------------------------------------------------


def roc_points(id_scores: np.ndarray, ood_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) at every distinct threshold, ID positive, from (0, 0) to (1, 1)."""
    scores = np.concatenate([id_scores, ood_scores]).astype(np.float64)
    is_id = np.r_[np.ones(len(id_scores)), np.zeros(len(ood_scores))]
    order = np.argsort(-scores, kind="mergesort")
    scores, is_id = scores[order], is_id[order]
    last = np.r_[np.flatnonzero(np.diff(scores) != 0), scores.size - 1]  # end of each run of ties
    tp = np.cumsum(is_id)[last]
    fp = (last + 1) - tp
    return np.r_[0.0, fp / len(ood_scores)], np.r_[0.0, tp / len(id_scores)]


def _png(fig, dpi: int = 90) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


SUMMARY_PNG = "summary_heatmap.png"


def summary_heatmap(report: dict) -> bytes:
    """One figure for many methods: heatmaps of AUROC and of FPR@95 (the report's convention),
    methods (rows, best mean rank first, the rank beside the name) by OOD set and near/far
    average (columns, OpenOOD's order), the value printed in every cell and the best of each
    column (as the tables mark it) in bold with a box. A cell's colour is its method's rank in
    the column, worst red to best green: sets differ too much in difficulty, and a few failing
    methods stretch a value scale too far, for one scale to tell methods apart."""
    from oodcli.metrics import average_ranks

    from matplotlib import colormaps
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    methods = rank_order(report)
    ranks = mean_ranks(report)
    cols = _columns(report)
    best = best_cells(report)
    labels = [_label(m, report["methods"][m]) + ("" if ranks[m] is None else f"  ({ranks[m]:.1f})") for m in methods]
    n, k = len(methods), len(cols)
    width = 2 * (0.55 * k + 0.9) + 0.075 * max(len(t) for t in labels)
    fig = Figure(figsize=(width, 0.24 * n + 1.9), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    colours = colormaps["RdYlGn"].with_extremes(bad="#e6e6e6")
    for ax, (metric, title) in zip(axes, (("auroc", "AUROC (%), higher is better"),
                                          (fpr_key(report), "FPR@95 (%), lower is better"))):
        values = np.array([[np.nan if (v := _value(report, m, key, metric)) is None else 100 * v for _, key in cols]
                           for m in methods], dtype=np.float64)
        scaled = np.full_like(values, np.nan)  # 0 worst .. 1 best within each column
        for j in range(k):
            have = np.isfinite(values[:, j])
            if have.any():
                ranks = average_ranks(values[have, j] * (-1.0 if metric in LOWER_IS_BETTER else 1.0))
                scaled[have, j] = (ranks - 1) / max(have.sum() - 1, 1)
        ax.imshow(np.ma.masked_invalid(scaled), cmap=colours, norm=Normalize(0, 1), aspect="auto",
                  interpolation="nearest")
        for i, m in enumerate(methods):
            for j, (_, key) in enumerate(cols):
                v = values[i, j]
                top = m in best.get(key, {}).get(metric, [])
                if np.isfinite(v):
                    r, g, b, _ = colours(scaled[i, j])
                    ink = "white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.45 else "black"
                    text = f"{v:.1f}"
                else:
                    ink, text = "#555555", "const" if key in report["methods"][m].get("constant", ()) else "-"
                ax.text(j, i, text, ha="center", va="center", fontsize=7, color=ink,
                        fontweight="bold" if top else "normal")
                if top:
                    ax.add_patch(Rectangle((j - 0.46, i - 0.42), 0.92, 0.84, fill=False, edgecolor="#1030ff", lw=2))
        for j, (_, key) in enumerate(cols[:-1]):
            if key.startswith("avg:"):  # a white gap after each group's average
                ax.axvline(j + 0.5, color="white", lw=3)
        ax.set_xticks(range(k), [t for t, _ in cols], rotation=35, ha="right", fontsize=8)
        ax.set_yticks(range(n), labels, fontsize=8)
        ax.tick_params(length=0)
        ax.set_title(title, fontsize=9)
    fig.suptitle(f"{n} method{'s' * (n != 1)}, ID = {_positives_name(report)}: rows by mean rank (AUROC) over the "
                 "OOD sets; colour per column, best bold and boxed", fontsize=9)
    return _png(fig, dpi=110)


def _positive_scores(store: Store, report: dict, method: str) -> np.ndarray:
    """A method's scores on every row counted as ID: the ID split, with --fsood the cs-ID splits too."""
    return np.concatenate([read_scores(store, method, s) for s in [report["id_split"], *report.get("csid_splits", [])]])


def make_plots(store: Store, report: dict, progress=None) -> dict[str, bytes]:
    """The summary heatmap of every method (``summary_heatmap``) and, per method, histograms of ID
    vs each OOD set's scores and ROC curves; PNG bytes by file name.

    Uses matplotlib's Agg canvas directly (no pyplot, no display, no global backend change).
    """
    from matplotlib.figure import Figure

    id_split = _positives_name(report)
    advance = progress("plots", len(report["methods"])) if progress else (lambda n: None)
    images: dict[str, bytes] = {}
    if _columns(report):
        images[SUMMARY_PNG] = summary_heatmap(report)
    for method, data in report["methods"].items():
        if data.get("runs"):  # a mean over runs has no score distribution of its own
            advance(1)
            continue
        id_scores = _positive_scores(store, report, method)
        order = [key for _, key in _columns(report) if key in data["sets"]]  # near sets first
        sets = {s: read_scores(store, method, s) for s in order}
        cols = min(3, max(1, len(sets)))
        rows = -(-len(sets) // cols) or 1
        fig = Figure(figsize=(4.2 * cols, 3.0 * rows), layout="constrained")
        axes = fig.subplots(rows, cols, squeeze=False).ravel()
        for ax, (split, ood) in zip(axes, sets.items()):
            both = np.concatenate([id_scores, ood])
            lo, hi = np.quantile(both, [0.005, 0.995])  # keep far outliers from squashing the view
            hi = hi if hi > lo else lo + 1.0
            bins = np.linspace(lo, hi, 50)
            ax.hist(np.clip(id_scores, lo, hi), bins=bins, density=True, alpha=0.55, label=f"ID ({id_split})")
            ax.hist(np.clip(ood, lo, hi), bins=bins, density=True, alpha=0.55, label=split.split("/")[-1])
            ax.set_title(f"{split}  AUROC {100 * data['sets'][split]['auroc']:.1f}%", fontsize=9)
            ax.legend(fontsize=7)
        for ax in axes[len(sets):]:
            ax.set_visible(False)
        fig.suptitle(f"{method}: score histograms (higher = more ID)", fontsize=10)
        images[f"hist_{method}.png"] = _png(fig)

        fig = Figure(figsize=(4.5, 4.2), layout="constrained")
        ax = fig.subplots()
        for split, ood in sets.items():
            fpr, tpr = roc_points(id_scores, ood)
            ax.plot(fpr, tpr, label=f"{split.split('/')[-1]} ({100 * data['sets'][split]['auroc']:.1f})")
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        ax.set(xlabel="FPR (OOD kept)", ylabel="TPR (ID kept)", title=f"{method}: ROC, ID positive")
        ax.legend(fontsize=7, title="OOD set (AUROC %)", title_fontsize=7)
        images[f"roc_{method}.png"] = _png(fig)
        advance(1)
    return images


def render_html(report: dict, images: dict[str, bytes]) -> str:
    """One self-contained page: the table, every metric, hyperparameters, plots as base64 PNG."""
    import base64
    from html import escape

    cols = _table_keys(report)
    best = best_cells(report)
    acc = accuracy_note(report, digits=2)
    head = "".join(f"<th>{escape(name)}</th>" for name, _ in cols)
    rows = "".join(
        f"<tr><td>{escape(_label(m, d))}</td>"
        + "".join("<td>" + "".join(f'<b class="best">{escape(t)}</b>' if b else escape(t)
                                   for t, b in _marked_parts(report, best, m, key)) + "</td>" for _, key in cols)
        + "</tr>"
        for m, d in report["methods"].items()
    )
    detail = "".join(
        f"<tr><td>{escape(m)}</td><td>{escape(s)}</td><td>{escape(report['ood_splits'][s])}</td>"
        + "".join(f"<td>{100 * v[k]:.2f}</td>" for k in METRIC_NAMES) + "</tr>"
        for m, d in report["methods"].items() for s, v in d["sets"].items()
    )
    params = "".join(
        f"<tr><td>{escape(m)}</td><td>{escape(str(d['backbone']))}</td><td><code>{escape(json.dumps(d['hparams']))}</code></td></tr>"
        for m, d in report["methods"].items()
    )
    figures = "".join(
        f'<h3>{escape(m)}</h3><div class="plots">'
        + "".join(
            f'<img alt="{escape(name)}" src="data:image/png;base64,{base64.b64encode(images[name]).decode()}">'
            for name in (f"hist_{m}.png", f"roc_{m}.png") if name in images
        )
        + "</div>"
        for m in report["methods"]
    )
    summary = "" if SUMMARY_PNG not in images else (
        '<h2>Summary</h2><p>Every method by OOD set, best mean rank first.</p>'
        f'<img alt="summary heatmap" src="data:image/png;base64,{base64.b64encode(images[SUMMARY_PNG]).decode()}">')
    accuracies = "" if not report.get("fsood") else (
        "<h2>Accuracy (%)</h2><table><tr><th>split</th><th>role</th><th>accuracy</th></tr>" + "".join(
            f"<tr><td>{escape(name)}</td><td>{role}</td><td>{'-' if v is None else f'{100 * v:.2f}'}</td></tr>"
            for name, role, v in [(report["id_split"], "id", report.get("id_accuracy")),
                                  *((s, "csid", v) for s, v in report["csid_accuracy"].items()),
                                  ("ID + cs-ID", "pooled (OpenOOD's ACC)", report.get("fsood_accuracy"))])
        + "</table>")
    accuracy = (f", {escape(acc)}" if acc else "") + (f". {escape(_csid_note(report))}" if _csid_note(report) else "")
    ids = ", ".join(f"<code>{escape(s)}</code>" for s in _positives_name(report).split(" + "))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>oodcli report: {escape(report['store'])}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; margin-bottom: 1.5em; }}
th, td {{ border: 1px solid #ccc; padding: 3px 8px; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
.plots img {{ margin: 4px; border: 1px solid #eee; }}
b.best {{ color: #0a6e31; }}
</style></head><body>
<h1>OOD detection report</h1>
<p>Store <code>{escape(report['store'])}</code>, ID split{'s' * bool(report.get('csid_splits'))} {ids}{accuracy}.
Higher score = more in-distribution. The detail table holds both conventions: <code>fpr95</code>,
<code>aupr_in</code>, <code>aupr_out</code> with ID positive (step-sum AUPR); the <code>*_openood</code>
columns as OpenOOD v1.5 computes them (OOD positive, trapezoid AUPR).</p>
<h2>AUROC / FPR@95 (%)</h2>
<p>{escape(FPR_CAPTIONS[report.get('fpr', 'id')])}; {escape(_mark_note(report))}.</p>
<table><tr><th>method</th>{head}</tr>{rows}</table>
{accuracies}
{summary}
<h2>Every metric (%)</h2>
<table><tr><th>method</th><th>OOD set</th><th>group</th>{''.join(f'<th>{k}</th>' for k in METRIC_NAMES)}</tr>{detail}</table>
<h2>Hyperparameters</h2>
<table><tr><th>method</th><th>backbone</th><th>parameters</th></tr>{params}</table>
<h2>Plots</h2>
{figures}
</body></html>
"""
