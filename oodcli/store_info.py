"""Describe and verify a store (``oodcli store info`` / ``oodcli store verify``)."""

from __future__ import annotations

import numpy as np

from oodcli.data.base import is_ood_role
from oodcli.data.benchmarks import ROLES
from oodcli.errors import OodError
from oodcli.store import TXN_ROOT, Store, StoreDamaged, features_node, list_backbones, split_node, split_states


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
    whole, half = split_states(store)
    for split in whole:
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
                "activation": parts.get("activation") or battrs.get("activation"),
                "fingerprint": battrs.get("fingerprint"),
                "nonfinite_rows": battrs.get("nonfinite_rows", 0),
                "layers": {layer: _array_info(store, f"{bnode}/{layer}") for layer in store.children(bnode)},
            }
        info["splits"][split] = entry
    info["half_made_splits"] = half
    for section in ("backbones", "fitted", "grads", "index", "scores"):
        info[section] = {name: _array_info(store, name) for name in store.walk_arrays(section)} if store.exists(section) else {}
    return info


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _preprocess_text(p: dict) -> str:
    """The preprocessing as ``--preprocess`` spells it."""
    def triple(values) -> str:
        return "/".join(f"{float(v):g}" for v in values)

    return (f"resize={p.get('resize')},crop={p.get('crop')},mean={triple(p.get('mean', ()))},"
            f"std={triple(p.get('std', ()))},interpolation={p.get('interpolation')}")


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
            if b.get("activation"):
                bnode.add(f"[dim]activation {b['activation']}[/dim]")
            if b.get("preprocess"):
                bnode.add(f"[dim]preprocess {_preprocess_text(b['preprocess'])}[/dim]")
            for layer, a in b["layers"].items():
                bnode.add(f"{layer}  {tuple(a['shape'])} {a['dtype']}  {_size(a['bytes'])}")
    for split in info.get("half_made_splits", []):
        splits.add(f"[bold red]{split}[/bold red]  [red]half-made (an interrupted extract): re-run it or 'oodcli store rm'[/red]")
    for section in ("backbones", "fitted", "grads", "index", "scores"):
        if info[section]:
            sec = tree.add(section)
            for name, a in info[section].items():
                sec.add(f"{name.split('/', 1)[1]}  {tuple(a['shape'])} {a['dtype']}  {_size(a['bytes'])}")
    return tree


def verify_store(store: Store) -> tuple[list[str], int]:
    """Read every chunk of every array and check the store's invariants without trusting an
    attribute: missing or altered chunks, arrays the attributes promise but the tree lacks,
    non-finite values, row counts that disagree, half-made splits and unfinished writes.
    Returns (problems, arrays checked)."""
    problems: list[str] = []
    checked: dict[str, bool] = {}  # array -> finite (None if unreadable)

    def scan(name: str) -> bool | None:
        """Read ``name`` chunk by chunk; whether it is all finite (None: unreadable)."""
        if name in checked:
            return checked[name]
        finite: bool | None = True
        try:
            gone = store.missing_chunks(name)
            if gone:
                problems.append(f"{name}: {len(gone)} chunk(s) missing (first: chunk {gone[0]})")
                finite = None
            else:
                floating = store.dtype(name).kind in "fc"
                for _, block in store.iter_rows(name):
                    if floating and not np.isfinite(block).all():
                        finite = False
        except StoreDamaged as exc:
            problems.append(f"{name}: unreadable: {exc.what}")
            finite = None
        checked[name] = finite
        return finite

    def guarded(what: str, check) -> None:
        try:
            check()
        except StoreDamaged as exc:
            problems.append(f"{what}: unreadable: {exc.what}")
        except OodError as exc:
            problems.append(f"{what}: {exc}")

    if "schema" not in store.attrs:
        problems.append("root: no schema attribute")
    if store.exists(TXN_ROOT):
        problems.append(f"{TXN_ROOT}: an unfinished write (another command is writing, or one crashed: "
                        "the next command that writes this store finishes or drops it)")
    splits: list[str] = []

    def list_them() -> None:
        whole, half = split_states(store)
        for split in half:
            problems.append(f"{split}: half-made split (labels, ids or their attributes missing); re-run the extract "
                            f"that makes it or remove it with 'oodcli store rm {store.path} {split}'")
        splits.extend(whole)

    guarded("splits", list_them)
    rows: dict[str, int] = {}
    for split in splits:
        guarded(split, lambda: _verify_split(store, split, rows, scan, problems))
    guarded("labels", lambda: _verify_id_labels(store, splits, problems))
    for section in ("backbones", "fitted", "grads", "index", "scores"):
        guarded(section, lambda: _verify_section(store, section, splits, rows, scan, problems))
    return problems, len(checked)


def _verify_split(store: Store, split: str, rows: dict, scan, problems: list[str]) -> None:
    node = split_node(split)
    attrs = store.node_attrs(node)
    n = rows[split] = int(attrs["n"])
    if n == 0:
        problems.append(f"{split}: 0 rows (score and report refuse it); re-extract it or remove it with "
                        f"'oodcli store rm {store.path} {split}'")
    scan(f"{node}/ids")
    if scan(f"{node}/labels"):
        labels = store.read(f"{node}/labels")
        role = attrs.get("role", "id")
        if role not in ROLES:
            problems.append(f"{split}: unknown role '{role}' (expected one of {', '.join(ROLES)})")
        elif is_ood_role(role) and (labels != -1).any():
            what = "synthetic OOD" if role == "synthetic" else "OOD"
            problems.append(f"{split}: {what} split with class labels (expected -1 everywhere)")
        elif not is_ood_role(role) and (labels < 0).any():
            problems.append(f"{split}: ID split with OOD labels (-1)")
    for backbone in list_backbones(store, split):
        bnode = features_node(split, backbone)
        battrs = store.node_attrs(bnode)
        where = f"{split}/{backbone}"
        if not battrs.get("complete"):
            problems.append(f"{where}: incomplete ({battrs.get('rows_done', 0)} of {n} rows); re-run extract to resume")
        elif battrs.get("rows_done", n) != n:
            problems.append(f"{where}: marked complete with {battrs.get('rows_done')} of {n} rows done")
        present = store.children(bnode)
        for layer in battrs.get("layers", []):
            if layer not in present:
                problems.append(f"{where}: layer '{layer}' promised by its attributes is missing")
        for layer in present:
            name = f"{bnode}/{layer}"
            if store.shape(name)[0] != n:
                problems.append(f"{where}/{layer}: {store.shape(name)[0]} rows, split has {n}")
                continue
            if not battrs.get("complete"):
                continue  # rows past rows_done are legitimately unwritten
            if scan(name) is False:
                problems.append(f"{where}/{layer}: holds NaN or inf")


def _verify_id_labels(store: Store, splits: list[str], problems: list[str]) -> None:
    """ID splits whose labels name classes the train split does not have."""
    if "train" not in splits or not store.is_array(f"{split_node('train')}/labels"):
        return
    known = np.unique(store.read(f"{split_node('train')}/labels"))
    for split in splits:
        if split == "train" or is_ood_role(store.node_attrs(split_node(split)).get("role", "id")):
            continue
        labels = store.read(f"{split_node(split)}/labels")
        strange = np.setdiff1d(np.unique(labels[labels >= 0]), known)
        if strange.size:
            problems.append(f"{split}: labels {', '.join(map(str, strange[:5].tolist()))}"
                            f"{' ...' if strange.size > 5 else ''} are no class of the train split")


def _verify_section(store: Store, section: str, splits: list[str], rows: dict, scan, problems: list[str]) -> None:
    lost: set[str] = set()  # score arrays already reported gone (every array of the run names them)
    for name in store.walk_arrays(section):
        finite = scan(name)
        if section in ("scores", "grads"):
            split = name.split("/", 2)[2] if name.count("/") >= 2 else ""
            if split not in rows:
                problems.append(f"{name}: made from split '{split}', which the store no longer holds")
            elif store.shape(name)[0] != rows[split]:
                problems.append(f"{name}: {store.shape(name)[0]} rows, split '{split}' has {rows[split]}")
            attrs = store.node_attrs(name)
            if not attrs.get("complete"):
                problems.append(f"{name}: written without its attributes (no complete flag)")
            if section == "scores":  # the splits scored in the same run must all still be there
                method = name.split("/")[1]
                for other in attrs.get("splits", []):
                    if other in rows and f"{method}/{other}" not in lost and not store.is_array(f"scores/{method}/{other}"):
                        lost.add(f"{method}/{other}")
                        problems.append(f"scores/{method}: scored on '{other}' with '{split}', but "
                                        f"scores/{method}/{other} is gone; re-run 'oodcli score {attrs.get('method', method)}'")
        if finite is False:
            problems.append(f"{name}: holds NaN or inf")
