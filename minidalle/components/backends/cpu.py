"""The ``cpu`` backend: the reference every other backend is compared with.

``precision = "auto"`` (the default) is ``bf16`` where the capability probe
(``minidalle/hardware.py``) measures native bf16 products faster than fp32, else ``fp32``;
the choice and its reason are printed once. fp32 is deterministic: same config, seed and data give bit-identical weights (PyTorch's CPU
kernels are deterministic for a fixed thread count; ``threads`` pins it). ``precision =
"bf16"`` runs the forward pass under ``torch.autocast("cpu", bfloat16)``; weights, gradients
and optimizer state stay fp32. ``precision = "bf16-master"`` trains a bf16 copy of the model
(weights, activations, gradients) with fp32 master weights in the optimizer
(``minidalle/train/master_weights.py``): faster than autocast, and deterministic too.

Under torchrun (``minidalle run --nproc N``) each process joins a gloo process group and
gradients are averaged over processes (``minidalle/train/distributed.py``).
"""
from __future__ import annotations

import contextlib
from typing import Union

import attrs
import torch

from minidalle import hardware
from minidalle.train.backend import Backend, TorchRunner
from minidalle.config import one_of, positive
from minidalle.train.distributed import DataParallel, DataParallelBackend, make_runner
from minidalle.train.master_weights import MasterWeightsRunner


@attrs.define
class CpuConfig:
    precision: str = attrs.field(default="auto", validator=one_of("auto", "fp32", "bf16", "bf16-master"))
    # torch intra-op threads; None keeps PyTorch's default (one per core).
    threads: Union[int, None] = attrs.field(default=None, validator=positive)
    # Seconds a process waits in the rendezvous or in a collective before failing
    # (several processes only).
    dist_timeout_s: float = attrs.field(default=300.0, validator=positive)


class CpuBackend(DataParallelBackend, Backend):
    name = "cpu"

    def __init__(self, config: CpuConfig | None = None) -> None:
        super().__init__(config or CpuConfig())
        self._precision = hardware.resolve_precision(self.config.precision, what="backend.precision")
        if self.config.threads is not None:
            torch.set_num_threads(self.config.threads)
        # No torch.use_deterministic_algorithms(): PyTorch's CPU kernels are already
        # deterministic for a fixed thread count, and the flag makes every torch.empty fill
        # its memory (fill_uninitialized_memory), which cost ~20% of a training step.
        self.dp = DataParallel("gloo", timeout_s=self.config.dist_timeout_s)

    @property
    def precision(self) -> str:
        """The precision in use (``"auto"`` resolved for this CPU)."""
        return self._precision

    def describe(self) -> str:
        dp = f", {self.dp.describe()}" if self.dp.active else ""
        return f"cpu {self.precision}, {torch.get_num_threads()} threads{dp}"

    def autocast(self):
        # bf16-master trains without autocast (see MasterWeightsRunner); for inference on
        # the fp32 master weights, autocast is its closest equivalent.
        if self.precision in ("bf16", "bf16-master"):
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def prepare(self, model, optimizer, training) -> TorchRunner:
        cls = MasterWeightsRunner if self.precision == "bf16-master" else TorchRunner
        return make_runner(cls, self, model, optimizer, training)


def build(config: CpuConfig | None = None) -> CpuBackend:
    return CpuBackend(config)
