"""The public surface for plugin authors and scripts: import from here, not from the
modules behind it (their layout may change; these names will not).

Importing this module is cheap (no torch): each name is loaded on first use.

* Plugins: :data:`hookimpl`; the config helpers for a component's attrs class
  (:class:`FieldError`, :func:`one_of`, :func:`positive`, :func:`non_negative`) and
  :func:`read_section` for a stage's or command's own section.
* The registry: :func:`get_registry` (the process-wide one), :func:`load_registry` (a fresh
  one, e.g. with ``autoload="none"`` and ``extra_plugins``).
* Configs: :func:`load_config` and :func:`config_from_dict` (default: the process-wide
  registry), :class:`Config`.
* Interfaces a component implements: :class:`Backend`, :class:`Runner`, :class:`TorchRunner`
  (backends); :class:`AttentionPattern`, :class:`AttentionModule`, :class:`AttentionSpec`
  (attention, with :func:`causal_mask`, :func:`pattern_mask`, :func:`positions`);
  :class:`StageContext` (stages).
* Helpers: :func:`atomic_write`, :func:`load_image`, :func:`pil_to_uint8`,
  :func:`item_rng`, :func:`to_fixed_length`; the user errors (:class:`MinidalleError` and subclasses).
* Inference: :func:`load_for_inference` (checkpoint -> tokenizer, codec, model).
"""
from __future__ import annotations

import importlib

from minidalle import __version__, hookimpl

_LAZY = {
    "get_registry": "minidalle.plugin.discovery",
    "load_registry": "minidalle.plugin.discovery",
    "Config": "minidalle.config",
    "FieldError": "minidalle.config",
    "one_of": "minidalle.config",
    "positive": "minidalle.config",
    "non_negative": "minidalle.config",
    "read_section": "minidalle.config",
    "MinidalleError": "minidalle.errors",
    "ConfigError": "minidalle.errors",
    "DataError": "minidalle.errors",
    "CheckpointError": "minidalle.errors",
    "UnavailableComponentError": "minidalle.errors",
    "UnknownComponentError": "minidalle.errors",
    "atomic_write": "minidalle.fileio",
    "load_image": "minidalle.data",
    "item_rng": "minidalle.data",
    "to_fixed_length": "minidalle.data",
    "pil_to_uint8": "minidalle.data",
    "Backend": "minidalle.train.backend",
    "Runner": "minidalle.train.backend",
    "TorchRunner": "minidalle.train.backend",
    "AttentionPattern": "minidalle.model.attention_api",
    "AttentionModule": "minidalle.model.attention_api",
    "AttentionSpec": "minidalle.model.attention_api",
    "causal_mask": "minidalle.model.attention_api",
    "pattern_mask": "minidalle.model.attention_api",
    "positions": "minidalle.model.attention_api",
    "StageContext": "minidalle.recipes.stages",
    "load_for_inference": "minidalle.inference.loader",
}

__all__ = ["__version__", "hookimpl", "load_config", "config_from_dict", *_LAZY]


def load_config(path, overrides=(), registry=None):
    """Read, merge (``extends``, ``--set`` overrides) and validate a TOML config against
    ``registry`` (default: :func:`get_registry`)."""
    from minidalle import config

    return config.load_config(path, overrides, registry or _default_registry())


def config_from_dict(data: dict, source: str = "<config>", origins: dict | None = None, registry=None):
    """Validate a merged table into a :class:`Config` (default registry: :func:`get_registry`)."""
    from minidalle import config

    return config.config_from_dict(data, source, origins, registry or _default_registry())


def _default_registry():
    from minidalle.plugin.discovery import get_registry

    return get_registry()


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'minidalle.api' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
