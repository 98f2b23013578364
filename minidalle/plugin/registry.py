"""The registry: kind -> name -> Component, plus the stages of ``minidalle run``, the
subcommands of ``minidalle`` and the config sections that stages and commands own.

Everything here arrives through a hook (:mod:`minidalle.plugin.hookspecs`); the built-ins
register through the same hooks as third-party plugins."""
from __future__ import annotations

import difflib
import importlib
import importlib.util
from typing import Any, Callable

import attrs

from minidalle.errors import (
    DuplicateComponentError,
    UnavailableComponentError,
    UnknownComponentError,
)
from minidalle.plugin.hookspecs import KINDS

BUILTIN_PROVIDER = "minidalle"


def resolve(ref: Any) -> Any:
    """Turn a lazy ``"module:attr"`` reference into the object; pass objects through."""
    if not isinstance(ref, str):
        return ref
    module_name, _, attr = ref.partition(":")
    obj = importlib.import_module(module_name)
    for part in attr.split(".") if attr else ():
        obj = getattr(obj, part)
    return obj


def module_missing(name: str) -> bool:
    """True when the top-level module ``name`` cannot be found (without importing it)."""
    try:
        return importlib.util.find_spec(name) is None
    except (ImportError, ValueError):
        return True


@attrs.frozen
class Component:
    kind: str
    name: str
    factory: Any  # callable or "module:attr"
    config: Any = None  # attrs class, "module:attr" or None (no parameters)
    summary: str = ""
    requires: tuple[str, ...] = ()
    provider: str = BUILTIN_PROVIDER
    version: str = ""
    # Optional callable returning a reason string when the component cannot run here
    # (e.g. no GPU) even though its packages are installed; None when it can. It must be
    # cheap and import nothing heavy: `minidalle list` runs it.
    check: Any = None

    def missing_requirements(self) -> list[str]:
        return [r for r in self.requires if module_missing(r)]

    def unavailable_reason(self, deep: bool = False) -> str | None:
        """Why the component cannot be used here, or None.

        The package check never imports anything; ``deep`` also runs the component's own
        ``check`` (which may import heavy modules, e.g. torch to look for a GPU).
        """
        missing = self.missing_requirements()
        if missing:
            return "missing Python package(s): " + ", ".join(missing)
        if deep and self.check is not None:
            return resolve(self.check)()
        return None

    def _resolve(self, ref):
        try:
            return resolve(ref)
        except (ImportError, AttributeError) as exc:  # a broken plugin, not a user error
            raise UnavailableComponentError(
                f"{self.kind} {self.name!r} ({self.provider_label}): cannot load {ref!r}: {exc}"
            ) from exc

    @property
    def config_class(self):
        return self._resolve(self.config) if self.config is not None else None

    def make_config(self, params: dict | None = None, *, where: str = ""):
        """Validate ``params`` against this component's config class."""
        from minidalle.config import structure_section

        cls = self.config_class
        params = dict(params or {})
        if cls is None:
            if params:
                key = next(iter(params))
                raise UnknownComponentError(
                    f"{where}{'.' if where else ''}{key}: unknown key "
                    f"({self.kind} {self.name!r} takes no parameters)"
                )
            return None
        return structure_section(params, cls, where)

    def build(self, config=None, **kwargs):
        """Build the component; ``config`` is an instance of its config class or a dict."""
        reason = self.unavailable_reason(deep=True)
        if reason:
            raise UnavailableComponentError(
                f"{self.kind} {self.name!r} is unavailable: {reason}"
            )
        if config is None or isinstance(config, dict):
            config = self.make_config(config)
        factory = self._resolve(self.factory)
        return factory(config, **kwargs) if self.config is not None else factory(**kwargs)

    @property
    def provider_label(self) -> str:
        return f"{self.provider} {self.version}".strip()


@attrs.frozen
class PluginFailure:
    plugin: str  # entry point or module name
    provider: str  # distribution name
    error: str


@attrs.frozen
class Stage:
    """A stage of ``minidalle run``: ``run(ctx)``, ``is_complete(ctx)`` and optionally
    ``clean(ctx)``, which removes its outputs before a forced rerun. Given ``outputs(ctx) ->
    [Path]`` instead, the stage is complete when they all exist and cleaning removes them.
    Each callable may be a lazy ``"module:attr"`` string, resolved on first call."""

    name: str
    run_ref: Any
    is_complete_ref: Any = None
    clean_ref: Any = None
    outputs_ref: Any = None
    summary: str = ""
    parallel: bool = False  # runs in every process of a multi-process job
    requires: tuple[str, ...] = ()
    provider: str = BUILTIN_PROVIDER
    version: str = ""

    def _call(self, ref, ctx):
        missing = [r for r in self.requires if module_missing(r)]
        if missing:
            raise UnavailableComponentError(
                f"stage {self.name!r} is unavailable: missing Python package(s): {', '.join(missing)}")
        return resolve(ref)(ctx)

    def run(self, ctx) -> Any:
        return self._call(self.run_ref, ctx)

    def is_complete(self, ctx) -> bool:
        if self.is_complete_ref is not None:
            return bool(self._call(self.is_complete_ref, ctx))
        return all(p.exists() for p in self._call(self.outputs_ref, ctx))

    @property
    def clean(self) -> Callable | None:
        """``clean(ctx)``, or None when the stage has nothing to clean."""
        if self.clean_ref is not None:
            return lambda ctx: self._call(self.clean_ref, ctx)
        if self.outputs_ref is not None:
            return lambda ctx: [p.unlink(missing_ok=True) for p in self._call(self.outputs_ref, ctx)]
        return None


@attrs.frozen
class Section:
    """A config section owned by a stage or command, validated by ``config`` (attrs class
    or lazy string) when its owner reads it."""

    name: str
    config: Any
    owner: str  # "stage codec", "command bench"

    @property
    def config_class(self):
        return resolve(self.config)


@attrs.frozen
class Command:
    """A ``minidalle`` subcommand: ``module`` has ``add_parser(subparsers)``."""

    name: str
    module: Any  # module or dotted name
    provider: str = BUILTIN_PROVIDER

    def add_parser(self, subparsers) -> None:
        module = importlib.import_module(self.module) if isinstance(self.module, str) else self.module
        module.add_parser(subparsers)


class Registry:
    def __init__(self) -> None:
        self._components: dict[str, dict[str, Component]] = {k: {} for k in KINDS}
        self.stages: dict[str, Stage] = {}
        self.commands: dict[str, Command] = {}  # in registration order (`--help` order)
        self.sections: dict[str, Section] = {}
        self.failures: list[PluginFailure] = []

    def add(self, component: Component) -> None:
        if component.kind not in self._components:
            raise ValueError(f"unknown component kind {component.kind!r}; kinds: {', '.join(KINDS)}")
        existing = self._components[component.kind].get(component.name)
        if existing is not None:
            raise DuplicateComponentError(
                f"{component.kind} {component.name!r} is registered by two providers: "
                f"{existing.provider_label} and {component.provider_label}"
            )
        self._components[component.kind][component.name] = component

    def get(self, kind: str, name: str) -> Component:
        if kind not in self._components:
            raise UnknownComponentError(f"unknown component kind {kind!r}; kinds: {', '.join(KINDS)}")
        try:
            return self._components[kind][name]
        except KeyError:
            names = sorted(self._components[kind])
            close = difflib.get_close_matches(str(name), names, n=3, cutoff=0.5)
            hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
            raise UnknownComponentError(
                f"unknown {kind} {name!r}: {hint}known: {', '.join(names) or 'none'} "
                f"(see `minidalle list {kind}`)"
            ) from None

    def names(self, kind: str) -> list[str]:
        return sorted(self._components[kind])

    def components(self, kind: str | None = None) -> list[Component]:
        kinds = [kind] if kind else list(KINDS)
        return [self._components[k][n] for k in kinds for n in sorted(self._components[k])]

    def build(self, kind: str, name: str, config=None, **kwargs):
        return self.get(kind, name).build(config, **kwargs)

    def stage(self, name: str) -> Stage:
        try:
            return self.stages[name]
        except KeyError:
            raise UnknownComponentError(f"unknown stage {name!r} (known: {', '.join(self.stages)})") from None

    def add_stage(self, stage: Stage, sections=None) -> None:
        if stage.name in self.stages:
            raise DuplicateComponentError(f"stage {stage.name!r} is registered twice "
                                          f"({self.stages[stage.name].provider} and {stage.provider})")
        self._add_sections(sections, f"stage {stage.name}")
        self.stages[stage.name] = stage

    def add_command(self, command: Command, sections=None) -> None:
        if command.name in self.commands:
            raise DuplicateComponentError(f"command {command.name!r} is registered twice "
                                          f"({self.commands[command.name].provider} and {command.provider})")
        self._add_sections(sections, f"command {command.name}")
        self.commands[command.name] = command

    def _add_sections(self, sections, owner: str) -> None:
        for name, config in (sections or {}).items():
            if name in self.sections:
                raise DuplicateComponentError(f"config section [{name}] is claimed by "
                                              f"{self.sections[name].owner} and {owner}")
            self.sections[name] = Section(name, config, owner)

    def section_class(self, name: str):
        """The attrs class that validates config section ``[name]``."""
        return self.sections[name].config_class


def make_register(registry: Registry, kind: str, provider: str, version: str) -> Callable:
    """The ``register`` callable handed to a plugin's hook for one kind."""

    def register(name, factory, *, config=None, summary="", requires=(), check=None):
        if not isinstance(name, str) or not name:
            raise ValueError(f"{kind} name must be a non-empty string, got {name!r}")
        if isinstance(requires, str):
            requires = (requires,)
        registry.add(
            Component(
                kind=kind,
                name=name,
                factory=factory,
                config=config,
                summary=summary,
                requires=tuple(requires),
                provider=provider,
                version=version,
                check=check,
            )
        )

    return register


def make_stage_register(registry: Registry, provider: str, version: str) -> Callable:
    """The ``register`` callable handed to a plugin's ``minidalle_stages`` hook."""

    def register(name, run, *, is_complete=None, outputs=None, clean=None, summary="",
                 parallel=False, requires=(), sections=None):
        if not isinstance(name, str) or not name:
            raise ValueError(f"stage name must be a non-empty string, got {name!r}")
        if is_complete is None and outputs is None:
            raise ValueError(f"stage {name!r} needs is_complete or outputs")
        if isinstance(requires, str):
            requires = (requires,)
        registry.add_stage(Stage(name, run, is_complete, clean, outputs, summary, bool(parallel),
                                 tuple(requires), provider, version), sections)

    return register


def make_command_register(registry: Registry, provider: str, version: str) -> Callable:
    """The ``register`` callable handed to a plugin's ``minidalle_commands`` hook."""

    def register(name, module, *, sections=None):
        registry.add_command(Command(name, module, provider), sections)

    return register
