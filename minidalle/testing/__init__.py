"""Conformance checks that plugin authors run on their components (one module per kind).

* :mod:`minidalle.testing.tokenizer`: ``check_tokenizer(tok, texts=..., context_length=...)``
* :mod:`minidalle.testing.dataset`: ``check_dataset(make, image_size=...)``
* :mod:`minidalle.testing.codec`: ``check_codec(codec)``
* :mod:`minidalle.testing.backend`: ``check_backend(make_backend)`` (against ``cpu``)
* :mod:`minidalle.testing.attention`: ``check_attention(name_or_factory, config, reference=...)``

CONTRIBUTING.md shows each in a plugin's test; ``minidalle new-plugin`` writes such a test.

The check functions are also importable from here (``from minidalle.testing import
check_tokenizer``); their modules load on first use, so importing this package is cheap.
The kits may import anything below ``commands``.
"""
import importlib

_LAZY = {
    "check_tokenizer": "tokenizer",
    "check_dataset": "dataset",
    "check_item": "dataset",
    "check_codec": "codec",
    "check_backend": "backend",
    "check_attention": "attention",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
