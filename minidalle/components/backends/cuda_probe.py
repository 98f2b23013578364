"""Cheap "is there an NVIDIA GPU here?" check for `minidalle list`.

It imports nothing heavy (no torch): it only looks for the files the NVIDIA driver creates.
Building the ``cuda`` backend does the real ``torch.cuda.is_available()`` check.
"""
from __future__ import annotations

import os

# The NVIDIA kernel driver's files (Linux), or the WSL2 GPU paravirtual device.
DRIVER_FILES = ("/proc/driver/nvidia/version", "/dev/nvidiactl", "/dev/dxg")


def unavailable_reason() -> str | None:
    if os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
        return "CUDA_VISIBLE_DEVICES hides every GPU"
    if not any(os.path.exists(p) for p in DRIVER_FILES):
        return "no NVIDIA GPU/driver found (no /proc/driver/nvidia/version)"
    return None
