"""Graphcore IPU support: a pure-Python plan (``plan``), plain-PyTorch model transforms
(``transforms``) and a thin PopTorch layer (``poptorch_layer``, imported only when built).

This module stays import-light: ``minidalle list`` calls :func:`unavailable_reason`.
"""
from __future__ import annotations

import importlib.util

UNAVAILABLE = (
    "PopTorch is not installed: it ships only with Graphcore's Poplar SDK "
    "(pip install the poptorch wheel from the SDK and `source <sdk>/enable.sh`); "
    "to run this config without IPUs use --backend cpu"
)


def poptorch_installed() -> bool:
    try:
        return importlib.util.find_spec("poptorch") is not None
    except (ImportError, ValueError):
        return False


def unavailable_reason() -> str | None:
    """The registry's cheap availability check for the ``ipu`` backend (no imports)."""
    return None if poptorch_installed() else UNAVAILABLE
