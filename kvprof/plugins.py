"""Finding the installed plugins and collecting what they register: `load_plugins()`.

Plugins are found through the entry-point group `kvprof` (the built-ins register exactly so);
`KVPROF_PLUGINS=a,b` loads only those, an empty value none. One broken plugin never stops the
others: a plugin that fails to import, implements a hook with a wrong signature, or raises in a
registration hook is left out and recorded as a `PluginFailure` (`kvprof plugins` lists them).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import partial
from importlib import metadata
from typing import Any, Callable, Mapping

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


@dataclass
class AnalysisEntry:
    name: str
    function: Callable[..., Any]
    description: str = ""


@dataclass
class Registry:
    """What the plugins registered, with the plugin each strategy came from."""

    strategies: dict[str, type[Strategy]] = field(default_factory=dict)
    strategy_plugins: dict[str, str] = field(default_factory=dict)
    models: dict[str, ModelAlias] = field(default_factory=dict)
    analyses: dict[str, AnalysisEntry] = field(default_factory=dict)

    def _add_strategy(self, strategy: type[Strategy], plugin: str) -> None:
        name = strategy.name
        if name in self.strategies:
            raise UsageError(
                f"strategy {name!r} is registered by both {self.strategy_plugins[name]} and {plugin}"
            )
        self.strategies[name] = strategy
        self.strategy_plugins[name] = plugin

    def _add_model(self, alias: str, config: dict[str, Any], hf_id: str | None = None, description: str = "") -> None:
        self.models[alias] = ModelAlias(alias, config, hf_id, description)

    def _add_analysis(self, name: str, function: Callable[..., Any], description: str = "") -> None:
        self.analyses[name] = AnalysisEntry(name, function, description)

    def strategy(self, name: str) -> type[Strategy]:
        if name not in self.strategies:
            installed = ", ".join(sorted(self.strategies)) or "none"
            raise UsageError(f"unknown plugin {name!r}; installed: {installed}")
        return self.strategies[name]


@dataclass
class LoadedPlugins:
    """What `load_plugins()` found: the pluggy manager (hooks, sinks), what the plugins registered,
    the plugins left out and why, and each loaded plugin's distribution and version."""

    manager: pluggy.PluginManager
    registry: Registry
    failures: list[PluginFailure]
    versions: dict[str, tuple[str, str]]   # plugin name -> (distribution, version)

    def strategy(self, name: str) -> type[Strategy]:
        """The strategy class `--plugin NAME` selects, or a UsageError listing what is installed."""
        return self.registry.strategy(name)

    def version_of(self, plugin: str) -> str:
        """`distribution/version` of a loaded plugin, `plugin/?` when it was not installed."""
        return "/".join(self.versions.get(plugin, (plugin, "?")))


def load_plugins(extra: Mapping[str, object] | None = None, entry_points: bool = True) -> LoadedPlugins:
    """Load the installed plugins (and `extra`, name -> plugin object, as if installed) and
    collect what they register. `entry_points=False` loads none: a bare manager for sinks."""
    manager = pluggy.PluginManager("kvprof")
    manager.add_hookspecs(hookspecs)
    loaded = LoadedPlugins(manager, Registry(), [], {})
    if entry_points:
        _load_entry_points(loaded)
    for name, plugin in (extra or {}).items():
        manager.register(plugin, name=name)
    _collect(loaded)
    return loaded


def _load_entry_points(loaded: LoadedPlugins) -> None:
    pm, failures = loaded.manager, loaded.failures
    # Unset: load every plugin; "a,b": only those; "": none (as DATASETTE_LOAD_PLUGINS).
    wanted = os.environ.get(PLUGINS_ENV)
    allowed = {name.strip() for name in wanted.split(",") if name.strip()} if wanted is not None else None
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if allowed is not None and ep.name not in allowed:
            continue
        dist = getattr(ep, "dist", None)
        if pm.get_plugin(ep.name) is not None:
            failures.append(PluginFailure(
                ep.name, f"another installed plugin is already named {ep.name!r}; this one is not loaded",
                dist and dist.name))
            continue
        try:
            plugin = ep.load()
            pm.register(plugin, name=ep.name)
            pm.check_pending()
        except Exception as exc:  # a broken plugin is reported, not fatal
            if pm.get_plugin(ep.name) is not None:
                pm.unregister(name=ep.name)
            failures.append(PluginFailure(ep.name, f"{type(exc).__name__}: {exc}", dist and dist.name))
            continue
        if dist:
            loaded.versions[ep.name] = (dist.name, dist.version)
    found = {name for name, _ in pm.list_name_plugin()} | {failure.name for failure in failures}
    for name in sorted((allowed or set()) - found):
        failures.append(PluginFailure(name, f"{PLUGINS_ENV} names it, but no installed plugin has it"))


def _collect(loaded: LoadedPlugins) -> None:
    """Call every plugin's registration hooks. A plugin whose hook raises is unregistered and
    recorded as a failure, as one that fails to load; a name registered twice is the user's to
    resolve (UsageError)."""
    pm, registry = loaded.manager, loaded.registry
    hooks = (
        (pm.hook.kvprof_register_strategies, registry._add_strategy),
        (pm.hook.kvprof_register_models, registry._add_model),
        (pm.hook.kvprof_register_analyses, registry._add_analysis),
    )
    for hook, add in hooks:
        for impl in reversed(hook.get_hookimpls()):  # pluggy's call order
            plugin_name = pm.get_name(impl.plugin) or "?"
            register = partial(add, plugin=plugin_name) if add == registry._add_strategy else add
            try:
                impl.function(register=register)
            except UsageError:
                raise
            except Exception as exc:  # one broken plugin must not stop the others
                pm.unregister(impl.plugin)
                distribution = loaded.versions.get(plugin_name, (None,))[0]
                error = f"{hook.name} raised {type(exc).__name__}: {exc}"
                loaded.failures.append(PluginFailure(plugin_name, error, distribution))
