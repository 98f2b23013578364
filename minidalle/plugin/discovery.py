"""Plugin discovery: built-ins first, then every entry point in the ``minidalle`` group.

``MINIDALLE_PLUGINS`` controls autoloading of third-party entry points:
unset or ``all`` loads every one; ``none`` (or ``0``) loads none; a comma-separated list
loads only the entry points or distributions named there. Built-ins always load.
"""
from __future__ import annotations

import importlib.metadata
import os
import traceback

import pluggy

from minidalle.plugin import hookspecs
from minidalle.plugin.registry import (
    BUILTIN_PROVIDER,
    PluginFailure,
    Registry,
    make_command_register,
    make_register,
    make_stage_register,
)

ENTRY_POINT_GROUP = "minidalle"
ENV_VAR = "MINIDALLE_PLUGINS"

_registry: Registry | None = None


def _selected(ep: importlib.metadata.EntryPoint, setting: str | None) -> bool:
    if setting is None or setting.strip().lower() in ("", "all", "1"):
        return True
    if setting.strip().lower() in ("none", "0", "off"):
        return False
    wanted = {s.strip() for s in setting.split(",") if s.strip()}
    dist = ep.dist.name if ep.dist else ""
    return ep.name in wanted or dist in wanted


def _error_line(exc: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(exc), exc)).strip().splitlines()[-1]


def load_registry(autoload: str | None = None, extra_plugins: tuple = ()) -> Registry:
    """Build a fresh registry. ``autoload`` overrides the environment variable."""
    from minidalle.plugin import builtins

    setting = autoload if autoload is not None else os.environ.get(ENV_VAR)
    pm = pluggy.PluginManager("minidalle")
    pm.add_hookspecs(hookspecs)
    registry = Registry()
    # (plugin object, provider, version, label)
    plugins = [(builtins, BUILTIN_PROVIDER, "", "minidalle.plugin.builtins")]
    pm.register(builtins, name="minidalle.plugin.builtins")
    for plugin in extra_plugins:
        pm.register(plugin)
        plugins.append((plugin, getattr(plugin, "__name__", repr(plugin)), "", repr(plugin)))

    for ep in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        if not _selected(ep, setting):
            continue
        dist, version = (ep.dist.name, ep.dist.version) if ep.dist else (ep.name, "")
        try:
            plugin = ep.load()
            pm.register(plugin, name=f"{dist}:{ep.name}")
        except Exception as exc:  # a broken plugin must not stop the others
            registry.failures.append(PluginFailure(ep.name, dist, f"import failed: {_error_line(exc)}"))
            continue
        plugins.append((plugin, dist, version, ep.name))

    hooks = [(hook_name, lambda p, v, kind=kind: make_register(registry, kind, p, v))
             for kind, hook_name in hookspecs.HOOKS.items()]
    hooks.append((hookspecs.STAGE_HOOK, lambda p, v: make_stage_register(registry, p, v)))
    hooks.append((hookspecs.COMMAND_HOOK, lambda p, v: make_command_register(registry, p, v)))
    for hook_name, make in hooks:
        caller = getattr(pm.hook, hook_name)
        # get_hookimpls() is in registration order (built-ins first; pluggy *calls* them
        # in reverse), so a conflict names the built-in first.
        for impl in caller.get_hookimpls():
            entry = next((p for p in plugins if p[0] is impl.plugin), None)
            provider, version, label = (entry[1], entry[2], entry[3]) if entry else ("?", "", "?")
            try:
                impl.function(register=make(provider, version))
            except Exception as exc:
                from minidalle.errors import DuplicateComponentError

                if isinstance(exc, DuplicateComponentError):
                    raise
                registry.failures.append(
                    PluginFailure(label, provider, f"{hook_name} raised: {_error_line(exc)}")
                )
    return registry


def get_registry() -> Registry:
    """The process-wide registry, loaded on first use."""
    global _registry
    if _registry is None:
        _registry = load_registry()
    return _registry


def reset_registry() -> None:
    global _registry
    _registry = None
