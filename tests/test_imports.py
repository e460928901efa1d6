"""No import cycle among the modules that used to import each other: the backbone specs and
their registry, the data base, its sources and the digits, scoring and sweep; and none among
the command modules of ``oodcli.cli``. An import inside a function counts as much as one at
the top: it runs the same module, only later. (The scorers and ``oodcli.scoring`` still import
each other; they are not checked here.)
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "oodcli"


def _modules() -> dict[str, tuple[Path, bool]]:
    """Dotted name -> (file, is a package's __init__) for every module of the package."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere in its text (top level or in a function).

    ``from a.b import c`` imports ``a.b`` and, if ``c`` is a module, ``a.b.c``; the parent
    packages that Python runs first are left out (each package's own imports are its edges)."""
    modules = _modules()
    graph = {}
    for name, (path, is_package) in modules.items():
        here = name if is_package else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.split(".")[: len(here.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module
                targets.add(source)
                targets.update(f"{source}.{alias.name}" for alias in node.names)
        edges = set()
        for target in targets:
            while target and target not in modules:  # a name inside a module: the module
                target = target.rpartition(".")[0]
            if target and target != name:
                edges.add(target)
        graph[name] = edges
    return graph


def reaches(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


GROUPS = [
    ("oodcli.backbones.spec", "oodcli.backbones.registry"),
    ("oodcli.data.base", "oodcli.data.sources", "oodcli.data.digits"),
    ("oodcli.scoring", "oodcli.sweeping"),
]


@pytest.mark.parametrize("group", GROUPS, ids=lambda g: " ".join(m.rpartition(".")[2] for m in g))
def test_no_cycle_within(group):
    graph = import_graph()
    for module in group:
        assert module in graph, module
        for other in group:
            if other != module and other in reaches(graph, module):
                assert module not in reaches(graph, other), f"{module} and {other} import each other"


def test_command_modules_import_common_not_the_package():
    """The command modules of oodcli.cli form no cycle: the package imports them, they import
    ``common`` (and the library), never the package."""
    graph = import_graph()
    commands = [m for m in graph if m.startswith("oodcli.cli.")]
    assert "oodcli.cli.common" in commands and len(commands) >= 8
    for module in ["oodcli.cli", *commands]:
        assert module not in reaches(graph, module), f"{module} imports itself back"
