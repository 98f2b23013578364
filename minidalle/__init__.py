"""minidalle: a pluggable mini DALL-E.

Importing this package is cheap: no torch, no component code. Components are loaded
through the registry (`minidalle.plugin.discovery.get_registry()`) when they are built.
"""
import pluggy

from minidalle import hardware as _hardware

# MINIDALLE_CPU=avx2 (say) caps PyTorch's and oneDNN's kernels too, if torch is not loaded yet.
_hardware.apply_forced_level()

__version__ = "0.1.0"

#: Marker for plugin hook implementations: ``@minidalle.hookimpl``.
hookimpl = pluggy.HookimplMarker("minidalle")

__all__ = ["__version__", "hookimpl"]
