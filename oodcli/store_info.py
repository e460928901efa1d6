"""Describe and verify a store (``oodcli store info`` / ``oodcli store verify``)."""

from __future__ import annotations

import numpy as np

from oodcli.store import Store, features_node, list_backbones, list_splits, split_node


def _array_info(store: Store, name: str) -> dict:
    return {
        "shape": list(store.shape(name)),
        "dtype": str(store.dtype(name)),
        "bytes": store.nbytes(name),
        "chunk_rows": store.chunk_rows(name),
    }


def describe_store(store: Store) -> dict:
    """Everything ``store info`` shows, as plain data."""
    info: dict = {"path": str(store.path), "backend": store.backend, "attrs": store.attrs, "splits": {}}
    for split in list_splits(store):
        node = split_node(split)
        attrs = store.node_attrs(node)
        entry = {
            "role": attrs.get("role"),
            "rows": attrs.get("n", store.shape(f"{node}/labels")[0]),
            "source": attrs.get("source"),
            "backbones": {},
        }
        for backbone in list_backbones(store, split):
            bnode = features_node(split, backbone)
            battrs = store.node_attrs(bnode)
            parts = battrs.get("parts", {})
            entry["backbones"][backbone] = {
                "complete": bool(battrs.get("complete")),
                "rows_done": battrs.get("rows_done"),
                "weights": parts.get("weights"),
                "preprocess": parts.get("preprocess"),
                "fingerprint": battrs.get("fingerprint"),
                "nonfinite_rows": battrs.get("nonfinite_rows", 0),
                "layers": {layer: _array_info(store, f"{bnode}/{layer}") for layer in store.children(bnode)},
            }
        info["splits"][split] = entry
    for section in ("backbones", "fitted", "grads", "index", "scores"):
        info[section] = {name: _array_info(store, name) for name in store.walk_arrays(section)} if store.exists(section) else {}
    return info


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def render_tree(info: dict):
    from rich.tree import Tree

    attrs = info["attrs"]
    tree = Tree(
        f"[bold]{info['path']}[/bold] ({info['backend']}, schema {attrs.get('schema')}, "
        f"oodcli {attrs.get('oodcli_version')}, benchmark {attrs.get('benchmark', '-')})"
    )
    splits = tree.add("splits")
    for split, entry in info["splits"].items():
        node = splits.add(f"[bold]{split}[/bold]  {entry['role']}, {entry['rows']} rows  [dim]{entry['source']}[/dim]")
        for backbone, b in entry["backbones"].items():
            state = "[green]complete[/green]" if b["complete"] else f"[yellow]partial: {b['rows_done']} rows[/yellow]"
            bad = f", [red]{b['nonfinite_rows']} non-finite rows[/red]" if b["nonfinite_rows"] else ""
            bnode = node.add(f"{backbone}  {state}{bad}  [dim]weights {b['weights']}[/dim]")
            for layer, a in b["layers"].items():
                bnode.add(f"{layer}  {tuple(a['shape'])} {a['dtype']}  {_size(a['bytes'])}")
    for section in ("backbones", "fitted", "grads", "index", "scores"):
        if info[section]:
            sec = tree.add(section)
            for name, a in info[section].items():
                sec.add(f"{name.split('/', 1)[1]}  {tuple(a['shape'])} {a['dtype']}  {_size(a['bytes'])}")
    return tree


def verify_store(store: Store) -> tuple[list[str], int]:
    """Read every array once and check the store's invariants. Returns (problems, arrays checked)."""
    problems: list[str] = []
    checked = 0

    def readable(name: str) -> bool:
        nonlocal checked
        checked += 1
        try:
            for _ in store.iter_rows(name):
                pass
            return True
        except Exception as exc:  # a corrupt chunk shows up as a decoding or I/O error
            problems.append(f"{name}: unreadable ({type(exc).__name__})")
            return False

    if "schema" not in store.attrs:
        problems.append("root: no schema attribute")
    for split in list_splits(store):
        node = split_node(split)
        n = store.shape(f"{node}/labels")[0]
        for arr in ("labels", "ids"):
            if not store.is_array(f"{node}/{arr}"):
                problems.append(f"{split}: no {arr} array")
                continue
            readable(f"{node}/{arr}")
            if store.shape(f"{node}/{arr}")[0] != n:
                problems.append(f"{split}: {arr} has {store.shape(f'{node}/{arr}')[0]} rows, labels {n}")
        for backbone in list_backbones(store, split):
            bnode = features_node(split, backbone)
            attrs = store.node_attrs(bnode)
            if not attrs.get("complete"):
                problems.append(
                    f"{split}/{backbone}: incomplete ({attrs.get('rows_done', 0)} of {n} rows); re-run extract to resume"
                )
            if attrs.get("nonfinite_rows"):
                problems.append(f"{split}/{backbone}: {attrs['nonfinite_rows']} rows hold NaN or inf")
            for layer in store.children(bnode):
                name = f"{bnode}/{layer}"
                if store.shape(name)[0] != n:
                    problems.append(f"{split}/{backbone}/{layer}: {store.shape(name)[0]} rows, split has {n}")
                readable(name)
    for name in store.walk_arrays("scores") if store.exists("scores") else []:
        split = name.split("/", 2)[2]
        if store.is_array(f"{split_node(split)}/labels") and store.shape(name)[0] != store.shape(f"{split_node(split)}/labels")[0]:
            problems.append(f"{name}: row count differs from split '{split}'")
        if readable(name) and not np.isfinite(store.read(name)).all():
            problems.append(f"{name}: NaN or inf scores")
    return problems, checked
