"""minidalle plugin: the ``window`` attention type.

This module is what the entry point loads, so it imports nothing heavy (no torch); the
pattern lives in :mod:`minidalle_window_attention.attention`, imported when a model is built.
"""
from minidalle import hookimpl

__version__ = "0.1.0"


@hookimpl
def minidalle_attention(register):
    register(
        "window",
        "minidalle_window_attention.attention:build",
        config="minidalle_window_attention.attention:WindowConfig",
        summary="image tokens see all text and the last `size` image tokens (sliding 1-D window)",
    )
