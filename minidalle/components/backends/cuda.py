"""The ``cuda`` backend: the reference model on an NVIDIA GPU.

Precision (``[backend] precision``):

- ``fp32``: fp32 everywhere; TF32 matmuls only with ``tf32 = true`` (faster on Ampere and
  later, about 1e-3 relative error, so off by default to match ``cpu``).
- ``bf16``: forward under ``torch.autocast("cuda", bfloat16)``; weights, gradients and
  optimizer state stay fp32; ``training.loss_scaling`` is a static scale as on ``cpu``.
- ``fp16``: forward under fp16 autocast with *dynamic* loss scaling by
  ``torch.amp.GradScaler`` (its first scale is ``training.loss_scaling`` when that is not
  1, else 2**16). An update whose gradients overflow is skipped and the scale halved; the
  skipped updates are counted in ``StepResult.skipped_updates`` (the trainer logs them)
  and the current scale is reported as ``loss_scale``.

Several GPUs: one process per GPU, started by torchrun (``minidalle run --nproc N`` on one
host); each process takes GPU ``LOCAL_RANK`` (unless ``device`` is set) and joins an NCCL
process group (see ``minidalle/train/distributed.py``).

Speed options (``[backend]`` keys, see README "CUDA and multiple processes"):

- ``axial_sdpa`` (default true): axial layers attend through
  ``torch.nn.functional.scaled_dot_product_attention`` with their boolean mask (one fused
  kernel) instead of the per-row/column products that suit the CPU. Full-attention layers
  always use ``is_causal=True`` (the flash kernel where it applies), conv-like layers
  their boolean mask (``minidalle/model/attention_api.py``).
- ``fused_optimizer`` (default true): Adam/AdamW with ``fused=True`` (one kernel for all
  parameters); false: the multi-tensor ``foreach`` implementation.
- ``compile`` (default false) and ``compile_mode``: the training forward through
  ``torch.compile(model, mode=compile_mode)``; the first steps compile (tens of seconds).
- ``cuda_graphs`` (default true): cached sampling steps replayed from one CUDA graph per
  batch size (``minidalle/inference/graph_decode.py``); used by ``minidalle bench --generate``.

`minidalle list` runs only ``minidalle.components.backends.cuda_probe`` (no torch import); building
the backend does the real ``torch.cuda.is_available()`` check.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Union

import attrs
import torch

from minidalle.train.backend import Backend, TorchRunner
from minidalle.components.backends.cuda_probe import unavailable_reason  # noqa: F401  (re-export)
from minidalle.config import non_negative, one_of, positive
from minidalle.train.distributed import DataParallel, DataParallelBackend, env_world, make_runner
from minidalle.errors import ConfigError, UnavailableComponentError


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def set_axial_sdpa(model: torch.nn.Module, on: bool) -> int:
    """Route every axial layer of ``model`` through the masked fused attention (or back to
    the per-line products); returns how many layers it set."""
    count = 0
    for module in model.modules():
        if hasattr(module, "masked_sdpa"):
            module.masked_sdpa = bool(on)
            count += 1
    return count


@attrs.define
class CudaConfig:
    precision: str = attrs.field(default="fp32", validator=one_of("fp32", "bf16", "fp16"))
    # GPU index; None: LOCAL_RANK under torchrun, else the current device (0).
    device: Union[int, None] = attrs.field(default=None, validator=non_negative)
    # Allow TF32 tensor-core matmuls/convolutions in fp32 (faster, less exact).
    tf32: bool = False
    # Seconds a process waits in the rendezvous or in a collective before failing.
    dist_timeout_s: float = attrs.field(default=300.0, validator=positive)
    # Axial layers through scaled_dot_product_attention with their boolean mask.
    axial_sdpa: bool = True
    # Adam/AdamW's fused CUDA kernel (false: the foreach implementation).
    fused_optimizer: bool = True
    # torch.compile the training forward, with this mode.
    compile: bool = False
    compile_mode: str = attrs.field(default="default", validator=one_of(*COMPILE_MODES))
    # Cached sampling steps replayed from a CUDA graph (minidalle bench --generate).
    cuda_graphs: bool = True


class CudaRunner(TorchRunner):
    """``TorchRunner`` on the GPU, plus a GradScaler in fp16."""

    def __init__(self, backend, model, optimizer, training) -> None:
        super().__init__(backend, model, optimizer, training)
        self.scaler = None
        # The compiled module shares the model's parameters; self.model stays the module
        # whose state_dict the trainer saves.
        config = getattr(backend, "config", None)
        self.forward_module = model
        if getattr(config, "compile", False):
            self.forward_module = torch.compile(model, mode=config.compile_mode)
        if backend.precision == "fp16":
            init = training.loss_scaling if training.loss_scaling != 1.0 else 2.0**16
            # The device type comes from the backend so that this logic also runs (and is
            # tested) on the CPU.
            self.scaler = torch.amp.GradScaler(backend.device.type, init_scale=init)

    def forward_loss(self, micro: dict[str, torch.Tensor]) -> torch.Tensor:
        with self.backend.autocast():
            return self.forward_module(micro["text"], micro["image"], return_loss=True)

    def backward(self, loss: torch.Tensor, divisor: int) -> None:
        if self.scaler is None:
            return super().backward(loss, divisor)
        self.scaler.scale(loss.float() / divisor).backward()

    def optimizer_update(self) -> tuple[int, float | None]:
        if self.scaler is None:
            return super().optimizer_update()
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        self.scaler.unscale_(self.optimizer)  # finds inf/nan; clipping sees the true gradients
        norm = None
        if self.training.max_grad_norm is not None:
            norm = float(torch.nn.utils.clip_grad_norm_(params, self.training.max_grad_norm))
        before = self.scaler.get_scale()
        self.scaler.step(self.optimizer)  # does nothing when the gradients overflowed
        self.scaler.update()
        # GradScaler lowers the scale exactly when it skipped the step.
        return int(self.scaler.get_scale() < before), norm

    def train_step(self, batch):
        result = super().train_step(batch)
        if self.scaler is not None:
            result.extra["loss_scale"] = float(self.scaler.get_scale())
        return result

    def state_dict(self) -> dict[str, Any]:
        return {"grad_scaler": self.scaler.state_dict()} if self.scaler is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and state.get("grad_scaler"):
            self.scaler.load_state_dict(dict(state["grad_scaler"]))

    def sync_to_host(self) -> None:
        if self.backend.device.type == "cuda":
            torch.cuda.synchronize(self.backend.device)


class CudaBackend(DataParallelBackend, Backend):
    name = "cuda"

    def __init__(self, config: CudaConfig | None = None) -> None:
        super().__init__(config or CudaConfig())
        config = self.config
        if torch.version.cuda is None:
            raise UnavailableComponentError(
                f"backend 'cuda' is unavailable: torch {torch.__version__} was built without CUDA")
        if not torch.cuda.is_available():
            raise UnavailableComponentError(
                f"backend 'cuda' is unavailable: torch.cuda.is_available() is False "
                f"(torch {torch.__version__}, CUDA {torch.version.cuda}; check the driver "
                f"and CUDA_VISIBLE_DEVICES)")
        index = self._device_index(config)
        if config.precision == "bf16" and not torch.cuda.is_bf16_supported():
            raise UnavailableComponentError(
                f"backend.precision: bf16 is not supported on {torch.cuda.get_device_name(index)}")
        torch.cuda.set_device(index)
        self._device = torch.device("cuda", index)
        # Exact fp32 unless asked otherwise (PyTorch's defaults differ between the two).
        torch.backends.cuda.matmul.allow_tf32 = config.tf32
        torch.backends.cudnn.allow_tf32 = config.tf32
        self.dp = DataParallel("nccl", timeout_s=config.dist_timeout_s, device=self._device)

    @staticmethod
    def _device_index(config: CudaConfig) -> int:
        count = torch.cuda.device_count()
        if config.device is not None and env_world()[1] > 1:
            raise ConfigError("backend.device: leave it out when running several processes "
                              "(each process takes the GPU numbered by its LOCAL_RANK)")
        if config.device is not None:
            index = config.device
        elif "LOCAL_RANK" in os.environ:  # one process per GPU under torchrun
            index = env_world()[2]
        else:
            index = torch.cuda.current_device()
        if index >= count:
            hint = "" if config.device is not None else \
                " (one process per GPU: --nproc / --nproc-per-node must not exceed the GPU count)"
            raise UnavailableComponentError(
                f"backend.device: GPU {index} requested but {count} visible{hint}")
        return index

    @property
    def precision(self) -> str:
        return self.config.precision

    @property
    def device(self) -> torch.device:
        return self._device

    def describe(self) -> str:
        name = torch.cuda.get_device_name(self._device)
        tf32 = " tf32" if self.config.tf32 and self.precision == "fp32" else ""
        dp = f", {self.dp.describe()}" if self.dp.active else ""
        c = self.config
        opts = []
        if c.compile:
            opts.append("compiled" if c.compile_mode == "default" else f"compiled {c.compile_mode}")
        if c.axial_sdpa:
            opts.append("axial sdpa")
        if c.fused_optimizer:
            opts.append("fused optimizer")
        return f"cuda:{self._device.index} {name} {self.precision}{tf32} ({', '.join(opts) or 'eager'}){dp}"

    def seed(self, seed: int) -> None:
        super().seed(seed)  # torch.manual_seed seeds the GPUs too
        torch.cuda.manual_seed_all(seed)

    def rng_state(self) -> dict[str, Any]:
        return {"cuda": torch.cuda.get_rng_state(self._device)}

    def set_rng_state(self, state: dict[str, Any]) -> None:
        if "cuda" in state:
            torch.cuda.set_rng_state(torch.as_tensor(state["cuda"], dtype=torch.uint8).cpu(),
                                     self._device)

    def autocast(self):
        if self.precision == "bf16":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        if self.precision == "fp16":
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    def setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        set_axial_sdpa(model, self.config.axial_sdpa)
        return super().setup_model(model)

    def build_optimizer(self, model: torch.nn.Module, training) -> torch.optim.Optimizer:
        from minidalle.train.optim import build_optimizer

        return build_optimizer(model.parameters(), training, fused=self.config.fused_optimizer)

    def prepare(self, model, optimizer, training) -> CudaRunner:
        return make_runner(CudaRunner, self, model, optimizer, training)


def build(config: CudaConfig | None = None) -> CudaBackend:
    return CudaBackend(config)
