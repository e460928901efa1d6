"""Plugins: other packages add backbones, scorers and data sources through the ``oodcli.plugins``
entry-point group.

An entry point names a callable (called with no arguments) or a module (imported); either registers
through the functions the built-ins use: ``oodcli.backbones.spec.register`` (a ``BackboneSpec``),
``oodcli.scorers.base.register`` (a ``Scorer`` class) and ``oodcli.data.base.register_source``.

Plugins are loaded once per process and only when asked: a lookup that misses among the built-ins
(an unknown model name, method or source kind) and the listings call ``load_plugins``, so a command
that needs none of them imports none. What each plugin registered is found by comparing the
registries before and after it ran, so the registering functions need no plugin awareness; each
package hands its registry over (``track``) once its built-ins are declared, so this module imports
none of them and forms no import cycle with them. A plugin that fails (an import error, a callable
that raises, a name already taken) is named in one line on stderr, keeps nothing it registered, and
leaves every other command working; the unknown-name errors repeat its reason (``failure_note``),
since what was asked for may be what it would have provided.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

GROUP = "oodcli.plugins"
BUILT_IN = "built-in"


@dataclass(frozen=True)
class Plugin:
    """One entry point of the group: its name and the distribution that declares it."""

    entry_point: str
    dist: str

    def origin(self) -> str:
        return f"plugin {self.dist}:{self.entry_point}"


_loaded = False
_origins: dict[tuple[str, str], Plugin] = {}  # (kind, registered name) -> the plugin that registered it
_failures: list[tuple[Plugin, str]] = []  # (plugin, "ExceptionType: message")
#: kind ("backbone", "scorer", "data source") -> its registry, handed over by the package that
#: declares the built-ins of that kind, after declaring them
_registries: dict[str, dict] = {}
#: while a plugin runs: each registry's contents before it ran
_before: dict[str, dict] | None = None


def track(kind: str, registry: dict) -> None:
    """Called by ``oodcli.backbones``, ``oodcli.scorers`` and ``oodcli.data`` once their built-ins are
    registered. A package first imported by a running plugin is tracked from that point, so its
    built-ins are never taken for the plugin's."""
    _registries[kind] = registry
    if _before is not None:
        _before[kind] = dict(registry)


def load_plugins() -> None:
    """Run every entry point of the group, once per process."""
    global _loaded, _before
    if _loaded:
        return
    _loaded = True
    from importlib.metadata import entry_points

    found = sorted(entry_points(group=GROUP), key=lambda ep: (ep.dist.name if ep.dist else "", ep.name))
    for ep in found:
        plugin = Plugin(ep.name, ep.dist.name if ep.dist else "unknown distribution")
        _before = before = {kind: dict(registry) for kind, registry in _registries.items()}
        try:
            target = ep.load()
            if callable(target):
                target()
        except Exception as exc:  # any failure of foreign code is this plugin's, not the command's
            for kind, registry in _registries.items():  # it keeps nothing it registered
                registry.clear()
                registry.update(before[kind])
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            reason = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
            _failures.append((plugin, reason))
            print(f"note: plugin {ep.name} (dist {plugin.dist}) could not be loaded: {reason}; "
                  "the commands that do not use it are unaffected", file=sys.stderr)
            continue
        finally:
            _before = None
        for kind, registry in _registries.items():
            for name in registry.keys() - before[kind].keys():
                _origins[(kind, name)] = plugin


def origin(kind: str, name: str) -> str:
    """Where a registered name comes from: ``built-in`` or ``plugin DIST:ENTRY_POINT``.
    ``kind`` is one of ``backbone``, ``scorer``, ``data source``."""
    plugin = _origins.get((kind, name))
    return BUILT_IN if plugin is None else plugin.origin()


def failure_note() -> str:
    """``; plugin X (dist Y) could not be loaded: ...`` for each plugin that failed, to end an
    unknown-name error with; empty when none did."""
    return "".join(f"; plugin {p.entry_point} (dist {p.dist}) could not be loaded: {reason}" for p, reason in _failures)
