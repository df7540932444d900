"""Finding the installed plugins and collecting what they register: `load_plugins()`.

Plugins are found through the entry-point group `kvprof` (the built-ins register exactly so);
`KVPROF_PLUGINS=a,b` loads only those, an empty value none. One broken plugin never stops the
others: a plugin that fails to import, implements a hook with a wrong signature, or raises in a
registration hook is left out and recorded as a `PluginFailure` (`kvprof plugins` lists them).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from importlib import metadata
from typing import Any

import pluggy

from kvprof import hookspecs
from kvprof.errors import UsageError
from kvprof.models import ModelAlias
from kvprof.strategy import Strategy

ENTRY_POINT_GROUP = "kvprof"
PLUGINS_ENV = "KVPROF_PLUGINS"  # comma-separated plugin names to load; unset = all


@dataclass
class PluginFailure:
    """A plugin that was skipped, and why (`kvprof plugins` lists these)."""

    name: str
    error: str
    distribution: str | None = None   # the installed package that provides it, when known
    strategies: tuple[str, ...] = ()  # what it registered before it failed (for `--plugin NAME`)


@dataclass
class AnalysisEntry:
    name: str
    function: Callable[..., Any]
    description: str = ""


class NameTaken(Exception):
    """A plugin registered one name twice."""


@dataclass
class Registry:
    """What the plugins registered, with the plugin each strategy came from. Each name has one
    owner: the plugin loaded first (`load_plugins` loads kvprof's own plugins first)."""

    strategies: dict[str, type[Strategy]] = field(default_factory=dict)
    strategy_plugins: dict[str, str] = field(default_factory=dict)
    models: dict[str, ModelAlias] = field(default_factory=dict)
    analyses: dict[str, AnalysisEntry] = field(default_factory=dict)
    owners: dict[str, str] = field(default_factory=dict, repr=False)  # "strategy 'full'" -> plugin

    def _own(self, what: str, plugin: str) -> None:
        if what in self.owners:
            raise NameTaken(f"{what} is registered twice")
        self.owners[what] = plugin

    def _add_strategy(self, strategy: type[Strategy], plugin: str) -> None:
        self._own(f"strategy {strategy.name!r}", plugin)
        self.strategies[strategy.name] = strategy
        self.strategy_plugins[strategy.name] = plugin

    def _add_model(self, alias: str, config: dict[str, Any], hf_id: str | None = None, description: str = "",
                   *, plugin: str) -> None:
        self._own(f"model alias {alias!r}", plugin)
        self.models[alias] = ModelAlias(alias, config, hf_id, description)

    def _add_analysis(self, name: str, function: Callable[..., Any], description: str = "", *, plugin: str) -> None:
        self._own(f"analysis {name!r}", plugin)
        self.analyses[name] = AnalysisEntry(name, function, description)

    def strategy(self, name: str) -> type[Strategy]:
        if name not in self.strategies:
            installed = ", ".join(sorted(self.strategies)) or "none"
            raise UsageError(f"unknown plugin {name!r}; installed: {installed}")
        return self.strategies[name]

    def taken(self, other: Registry) -> str | None:
        """Which of `other`'s names this registry holds already, in words (None: none)."""
        for what in other.owners:
            if what in self.owners:
                return f"{what} is already registered by plugin {self.owners[what]!r}"
        return None

    def merge(self, other: Registry) -> None:
        self.strategies.update(other.strategies)
        self.strategy_plugins.update(other.strategy_plugins)
        self.models.update(other.models)
        self.analyses.update(other.analyses)
        self.owners.update(other.owners)


@dataclass
class LoadedPlugins:
    """What `load_plugins()` found: the pluggy manager (hooks, sinks), what the plugins registered,
    the plugins left out and why, and each loaded plugin's distribution and version."""

    manager: pluggy.PluginManager
    registry: Registry
    failures: list[PluginFailure]
    versions: dict[str, tuple[str, str]]   # plugin name -> (distribution, version)

    def strategy(self, name: str) -> type[Strategy]:
        """The strategy class `--plugin NAME` selects, or a UsageError: why the plugin that
        would provide it failed to load, or what is installed."""
        if name not in self.registry.strategies:
            for failure in self.failures:
                if name in failure.strategies:
                    raise UsageError(f"strategy {name!r} comes from plugin {failure.name!r}, which failed to load: "
                                     f"{failure.error}")
                if name == failure.name:
                    raise UsageError(f"plugin {name!r} failed to load: {failure.error}")
        return self.registry.strategy(name)

    def version_of(self, plugin: str) -> str:
        """`distribution/version` of a loaded plugin, `plugin/?` when it was not installed."""
        return "/".join(self.versions.get(plugin, (plugin, "?")))

    def fail(self, name: str, error: str, distribution: str | None = None, strategies: tuple[str, ...] = ()) -> None:
        """Leave plugin `name` out (if it was registered) and record why."""
        if self.manager.get_plugin(name) is not None:
            self.manager.unregister(name=name)
        distribution = distribution or self.versions.pop(name, (None,))[0]
        self.failures.append(PluginFailure(name, error, distribution, strategies))


def load_plugins(extra: Mapping[str, object] | None = None, entry_points: bool = True) -> LoadedPlugins:
    """Load the installed plugins (and `extra`, name -> plugin object, as if installed after
    them) and collect what they register. `entry_points=False` loads none: a bare manager for sinks.

    Anything a plugin raises while it loads or registers, SystemExit included, leaves that
    plugin out as a `PluginFailure` and the others loaded; only KeyboardInterrupt goes through.
    """
    manager = pluggy.PluginManager("kvprof")
    manager.add_hookspecs(hookspecs)
    loaded = LoadedPlugins(manager, Registry(), [], {})
    if entry_points:
        _load_entry_points(loaded)
    for name, plugin in (extra or {}).items():
        manager.register(plugin, name=name)
    for name, _ in list(manager.list_name_plugin()):  # in load order: the first owns a name
        _collect(loaded, name)
    return loaded


def _entry_points() -> list[metadata.EntryPoint]:
    """The `kvprof` entry points, kvprof's own first, then the others as installed."""
    found = metadata.entry_points(group=ENTRY_POINT_GROUP)
    return sorted(found, key=lambda ep: _distribution_name(ep) != "kvprof")


def _distribution_name(ep: metadata.EntryPoint) -> str | None:
    dist = getattr(ep, "dist", None)
    return dist.name if dist is not None else None


def _load_entry_points(loaded: LoadedPlugins) -> None:
    pm = loaded.manager
    # Unset: load every plugin; "a,b": only those; "": none (as DATASETTE_LOAD_PLUGINS).
    wanted = os.environ.get(PLUGINS_ENV)
    allowed = {name.strip() for name in wanted.split(",") if name.strip()} if wanted is not None else None
    for ep in _entry_points():
        if allowed is not None and ep.name not in allowed:
            continue
        distribution = _distribution_name(ep)
        if pm.get_plugin(ep.name) is not None:
            loaded.failures.append(PluginFailure(
                ep.name, f"another installed plugin is already named {ep.name!r}; this one is not loaded",
                distribution))
            continue
        try:
            pm.register(ep.load(), name=ep.name)
            pm.check_pending()
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # SystemExit too: a broken plugin is reported, not fatal
            loaded.fail(ep.name, describe(exc), distribution)
            continue
        dist = getattr(ep, "dist", None)
        if dist is not None:
            loaded.versions[ep.name] = (dist.name, dist.version)
    found = {name for name, _ in pm.list_name_plugin()} | {failure.name for failure in loaded.failures}
    for name in sorted((allowed or set()) - found):
        loaded.failures.append(PluginFailure(name, f"{PLUGINS_ENV} names it, but no installed plugin has it"))


def _collect(loaded: LoadedPlugins, name: str) -> None:
    """Call plugin `name`'s registration hooks into a registry of its own, then add that to the
    shared one. A hook that raises, or a name another plugin holds already, leaves the whole
    plugin out (a failure): nothing it registered is used."""
    pm = loaded.manager
    plugin = pm.get_plugin(name)
    own = Registry()
    hooks = (
        (pm.hook.kvprof_register_strategies, partial(own._add_strategy, plugin=name)),
        (pm.hook.kvprof_register_models, partial(own._add_model, plugin=name)),
        (pm.hook.kvprof_register_analyses, partial(own._add_analysis, plugin=name)),
    )
    for hook, register in hooks:
        for impl in hook.get_hookimpls():
            if impl.plugin is not plugin:
                continue
            try:
                impl.function(register=register)
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # one broken plugin must not stop the others
                loaded.fail(name, f"{hook.name} raised {describe(exc)}", strategies=tuple(own.strategies))
                return
    taken = loaded.registry.taken(own)
    if taken:
        loaded.fail(name, f"{taken}; this plugin is not loaded", strategies=tuple(own.strategies))
        return
    loaded.registry.merge(own)


def describe(exc: BaseException) -> str:
    """`Type: message`; SystemExit says it is one, whatever its code."""
    if isinstance(exc, SystemExit):
        return f"SystemExit({exc.code!r}) (the plugin called sys.exit)"
    return f"{type(exc).__name__}: {exc}"
