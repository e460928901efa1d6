"""Turn stored scores into OOD metrics: per OOD set, near/far averages (OpenOOD layout).

``build_report`` returns plain data; the renderers turn it into a rich table,
JSON, CSV or Markdown.
"""

from __future__ import annotations

import csv
import io
import json

import numpy as np

from oodcli.errors import OodError, UsageError
from oodcli.metrics import ood_metrics
from oodcli.scoring import default_id_split, ood_splits, read_scores, scored_methods
from oodcli.store import Store, features_node, split_node, split_role

FORMATS = ("table", "json", "csv", "markdown")
METRIC_NAMES = ("fpr95", "auroc", "aupr_in", "aupr_out")


def _group(role: str) -> str:
    return {"ood-near": "near", "ood-far": "far"}.get(role, "ood")


def build_report(store: Store, methods: list[str] | None = None, id_split: str | None = None) -> dict:
    available = scored_methods(store)
    if not available:
        raise OodError(f"store {store.path} has no scores yet; run 'oodcli score METHOD --store {store.path}'")
    methods = methods or available
    missing = [m for m in methods if m not in available]
    if missing:
        raise UsageError(f"no scores for {', '.join(missing)} in {store.path}; scored: {', '.join(available)}")
    id_split = id_split or default_id_split(store)
    labels = store.read(f"{split_node(id_split)}/labels")
    oods = ood_splits(store)
    groups = {s: _group(split_role(store, s)) for s in oods}
    report: dict = {
        "store": str(store.path),
        "id_split": id_split,
        "ood_splits": {s: groups[s] for s in oods},
        "methods": {},
    }
    for method in methods:
        id_scores = read_scores(store, method, id_split)
        if len(id_scores) != len(labels):
            raise OodError(f"scores of '{method}' on '{id_split}' are stale (row count differs); re-score")
        attrs = store.node_attrs(f"scores/{method}/{id_split}")
        per_set = {}
        for split in oods:
            node = f"scores/{method}/{split}"
            if not store.is_array(node):
                continue
            if store.node_attrs(node).get("model_id") != attrs.get("model_id"):
                raise OodError(
                    f"scores of '{method}' on '{split}' and '{id_split}' come from different models; re-score both"
                )
            per_set[split] = ood_metrics(id_scores, read_scores(store, method, split)).as_dict()
        averages = {}
        for group in ("near", "far"):
            members = [per_set[s] for s in per_set if groups[s] == group]
            if members:
                averages[group] = {k: float(np.mean([m[k] for m in members])) for k in METRIC_NAMES}
        report["methods"][method] = {
            "backbone": attrs.get("backbone"),
            "hparams": attrs.get("hparams", {}),
            "sets": per_set,
            "averages": averages,
        }
    report["id_accuracy"] = _id_accuracy(store, report, id_split, labels)
    return report


def _id_accuracy(store: Store, report: dict, id_split: str, labels: np.ndarray) -> float | None:
    backbones = {m["backbone"] for m in report["methods"].values()}
    if len(backbones) != 1:
        return None
    node = f"{features_node(id_split, backbones.pop())}/logits"
    if not store.is_array(node) or (labels < 0).any():
        return None
    correct = 0
    for start, block in store.iter_rows(node):
        correct += int((block.argmax(1) == labels[start : start + len(block)]).sum())
    return correct / len(labels)


def _columns(report: dict) -> list[tuple[str, str | None]]:
    """(column title, OOD split or average group) in OpenOOD order: near sets, near avg, far sets, far avg."""
    cols: list[tuple[str, str | None]] = []
    for group in ("near", "far", "ood"):
        sets = [s for s, g in report["ood_splits"].items() if g == group]
        cols += [(s.split("/")[-1], s) for s in sets]
        if group != "ood" and sets:
            cols.append((f"{group} avg", f"avg:{group}"))
    return cols


def _cell(method: dict, key: str) -> dict | None:
    if key.startswith("avg:"):
        return method["averages"].get(key[4:])
    return method["sets"].get(key)


def _fmt(m: dict | None) -> str:
    return "-" if m is None else f"{100 * m['auroc']:.1f} / {100 * m['fpr95']:.1f}"


def render_table(report: dict):
    from rich.table import Table

    acc = report["id_accuracy"]
    title = f"OOD detection, AUROC / FPR@95 (%), ID = {report['id_split']}"
    if acc is not None:
        title += f", ID accuracy {100 * acc:.1f}%"
    table = Table(title=title)
    table.add_column("method", style="bold")
    cols = _columns(report)
    for name, key in cols:
        table.add_column(name, justify="right", style="cyan" if key and key.startswith("avg:") else None)
    for method, data in report["methods"].items():
        table.add_row(method, *[_fmt(_cell(data, key)) for _, key in cols])
    return table


def render_markdown(report: dict) -> str:
    cols = _columns(report)
    lines = [
        "| method | " + " | ".join(name for name, _ in cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for method, data in report["methods"].items():
        lines.append(f"| {method} | " + " | ".join(_fmt(_cell(data, key)) for _, key in cols) + " |")
    acc = report["id_accuracy"]
    footer = f"\nAUROC / FPR@95 in %, ID split `{report['id_split']}`"
    if acc is not None:
        footer += f", ID accuracy {100 * acc:.2f}%"
    return "\n".join(lines) + "\n" + footer + "\n"


def render_csv(report: dict) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["method", "ood_set", "group", *METRIC_NAMES])
    for method, data in report["methods"].items():
        for split, m in data["sets"].items():
            writer.writerow([method, split, report["ood_splits"][split], *(f"{m[k]:.6f}" for k in METRIC_NAMES)])
        for group, m in data["averages"].items():
            writer.writerow([method, f"{group}_average", group, *(f"{m[k]:.6f}" for k in METRIC_NAMES)])
    return buf.getvalue()


def render_json(report: dict) -> str:
    return json.dumps(report, indent=2, sort_keys=False)
