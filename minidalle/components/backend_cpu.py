"""The ``cpu`` backend: the reference every other backend is compared with.

fp32 is deterministic: same config, seed and data give bit-identical weights (PyTorch's CPU
kernels are deterministic for a fixed thread count; ``threads`` pins it). ``precision =
"bf16"`` runs the forward pass under ``torch.autocast("cpu", bfloat16)``; weights, gradients
and optimizer state stay fp32.
"""
from __future__ import annotations

import contextlib
from typing import Union

import attrs
import torch

from minidalle.backend import Backend, TorchRunner
from minidalle.config import one_of, positive


@attrs.define
class CpuConfig:
    precision: str = attrs.field(default="fp32", validator=one_of("fp32", "bf16"))
    # torch intra-op threads; None keeps PyTorch's default (one per core).
    threads: Union[int, None] = attrs.field(default=None, validator=positive)


class CpuBackend(Backend):
    name = "cpu"

    def __init__(self, config: CpuConfig | None = None) -> None:
        super().__init__(config or CpuConfig())
        if self.config.threads is not None:
            torch.set_num_threads(self.config.threads)
        # Deterministic algorithms where PyTorch has a choice (warn rather than fail on ops
        # that have no deterministic variant).
        torch.use_deterministic_algorithms(True, warn_only=True)

    @property
    def precision(self) -> str:
        return self.config.precision

    def describe(self) -> str:
        return f"cpu {self.config.precision}, {torch.get_num_threads()} threads"

    def autocast(self):
        if self.config.precision == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def prepare(self, model, optimizer, training) -> TorchRunner:
        return TorchRunner(self, model, optimizer, training)


def build(config: CpuConfig | None = None) -> CpuBackend:
    return CpuBackend(config)
