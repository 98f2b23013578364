"""The backend interface every device backend (cpu, cuda, ipu, ...) implements.

A *backend* knows a device; it turns (model, optimizer, training config) into a *runner*
whose ``train_step(batch)`` performs one training **step**: it consumes
``samples_per_step(training)`` samples in one call, where

    samples_per_step = batch_size x gradient_accumulation x replication_factor x device_iterations

(the recipe's formula; one host call of ``poptorch.trainingModel`` consumes exactly this).
The trainer (``minidalle/train/trainer.py``) owns everything else: epochs, data order, LR
schedules, checkpoints, logging and resume. It never touches the device itself.

How the trainer uses a backend, in order::

    backend = registry.build("backend", name, params)        # factory(config) -> Backend
    backend.seed(cfg.run.seed)                                # host + device RNGs
    model = backend.setup_model(model)                        # move / cast, before the optimizer
    optimizer = backend.build_optimizer(model, cfg.training)  # default: minidalle.train.optim
    ...trainer loads checkpoint state into model and optimizer when resuming...
    runner = backend.prepare(model, optimizer, cfg.training)  # wrap / compile
    runner.load_state_dict(extra)                             # when resuming (e.g. a GradScaler)
    secs = runner.compile(first_batch)                        # IPU: "Compiled model in X secs"
    for batch in batches:                                     # dicts of CPU tensors, see below
        result = runner.train_step(batch)                     # -> StepResult(loss, ...)
        scheduler.step(); runner.lr_changed()                 # LR schedule lives in the trainer
    runner.sync_to_host()                                     # before reading model weights
    runner.close()

**Batches** are dicts of CPU tensors with leading dimension N = ``samples_per_step`` (per
process): ``"text"`` int64 [N, text_seq_len] and ``"image"``: int64 codes [N, fmap**2], or
float/uint8 images [N, 3, H, W] when the model carries a codec. The runner moves them to
its device and splits them into micro-batches of ``training.batch_size`` however it likes
(the IPU runner hands the whole batch to PopTorch, which splits it by device iterations,
replicas and accumulation itself).

Runners with ``micro_batch_input = True`` (``TorchRunner``: cpu, cuda) may instead get an
*iterator* over the step's micro-batches (dicts of ``batch_size`` samples each), so that a
step of 24,576 samples (the L16 recipe) never sits in host memory at once. Such a runner
must consume exactly ``samples_per_step / batch_size`` of them per ``train_step``.

**Step semantics** (so that every backend computes the same thing as ``cpu``): one step
runs ``device_iterations`` optimizer updates, each over ``batch_size x
gradient_accumulation x replication_factor`` samples whose gradients are *averaged*
(reduction Mean: every micro-batch loss is divided by ``gradient_accumulation x
replication_factor`` before backward). With static loss scaling the loss is multiplied by
``training.loss_scaling`` before backward and the gradients divided by it before clipping
(``training.max_grad_norm``) and the update. ``StepResult.loss`` is the mean unscaled loss
over the step's micro-batches (a backend that can only fetch the last one says so in its
docs).

**Data parallel** (torch.distributed, not implemented yet): a backend running in several
processes reports ``rank``/``world_size``; each process consumes ``samples_per_step``
samples per step (so the global step is ``world_size`` times that), only the process with
``is_main`` true writes checkpoints, logs and metrics, ``sampler()`` gives the per-rank
index order (the trainer's own deterministic shuffling is used when it returns None),
``reduce_mean()`` averages logged numbers over processes and ``barrier()`` waits for all.
The defaults below are the single-process ones.
"""
from __future__ import annotations

import math

import contextlib
import random
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import torch


def samples_per_step(training) -> int:
    """The recipe's formula: samples one ``train_step`` call consumes (per process)."""
    return (training.batch_size * training.gradient_accumulation
            * training.replication_factor * training.device_iterations)


@dataclass
class StepResult:
    """What one ``train_step`` reports to the trainer."""

    loss: float  # mean unscaled loss over the step's micro-batches
    # Optimizer updates skipped in this step (e.g. fp16 overflow with a GradScaler).
    skipped_updates: int = 0
    # Gradient norm before clipping (of the last update), when the backend measured it.
    grad_norm: float | None = None
    extra: dict[str, float] = field(default_factory=dict)  # more numbers to log


class Runner:
    """Runs training steps on a device for one (model, optimizer) pair.

    Subclasses implement ``train_step``; the rest has working defaults.
    """

    #: True when ``train_step`` also accepts an iterator of micro-batches (see the module doc).
    micro_batch_input: bool = False

    def __init__(self, backend: "Backend", model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, training) -> None:
        self.backend = backend
        self.model = model  # the host-side module whose state_dict the trainer saves
        self.optimizer = optimizer
        self.training = training

    def train_step(self, batch) -> StepResult:
        """One step over ``samples_per_step(training)`` samples (see the module docstring):
        a dict of tensors, or an iterator of micro-batch dicts when ``micro_batch_input``."""
        raise NotImplementedError

    @torch.no_grad()
    def eval_loss(self, batch: dict[str, torch.Tensor]) -> float:
        """Mean loss of ``batch`` (any size) without updating anything (validation)."""
        raise NotImplementedError

    def compile(self, batch: dict[str, torch.Tensor]) -> float | None:
        """Compile ahead of the first step (IPU); return the seconds it took, or None
        when there is nothing to compile. The trainer then logs ``Compiled model in X secs``.
        ``batch`` is the first step's batch (its first micro-batch when ``micro_batch_input``)."""
        return None

    def lr_changed(self) -> None:
        """The trainer changed ``optimizer.param_groups[*]['lr']`` (IPU: setOptimizer)."""

    def sync_to_host(self) -> None:
        """Make ``self.model``'s host weights current (IPU: copyWeightsToHost)."""

    def state_dict(self) -> dict[str, Any]:
        """Runner state to checkpoint besides model and optimizer (e.g. a GradScaler).

        Values must be tensors, numbers, strings, lists or dicts of those (saved without
        pickle)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        """Release the device (IPU: detachFromDevice)."""


class Backend:
    """A device backend. ``factory(config) -> Backend`` is what a plugin registers.

    Optional: a method ``make_loader(dataset, indices, *, collate_fn)`` returning an iterable
    of whole-step batches in ``indices`` order (ipu: ``poptorch.DataLoader``); when a backend
    has one, the trainer loads training batches through it.
    """

    name: str = "backend"

    def __init__(self, config=None) -> None:
        self.config = config

    # ---------------------------------------------------------------- description
    @property
    def device(self) -> torch.device:
        """Where the model's tensors live on the host side of this backend."""
        return torch.device("cpu")

    def describe(self) -> str:
        """One line for logs, e.g. ``cpu fp32, 2 threads``."""
        return self.name

    # ---------------------------------------------------------------- processes
    @property
    def rank(self) -> int:
        return 0

    @property
    def world_size(self) -> int:
        return 1

    @property
    def is_main(self) -> bool:
        """Only the main process writes checkpoints, logs and metrics."""
        return self.rank == 0

    def sampler(self, dataset_len: int, *, shuffle: bool, seed: int, epoch: int) -> Sequence[int] | None:
        """This process's index order for one epoch, or None for the trainer's default."""
        return None

    def reduce_mean(self, value: float) -> float:
        """Average a number over processes (for logging)."""
        return value

    def barrier(self) -> None:
        pass

    # ---------------------------------------------------------------- setup
    def samples_per_step(self, training) -> int:
        return samples_per_step(training)

    def seed(self, seed: int) -> None:
        """Seed every RNG the run uses (host and device)."""
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    def rng_state(self) -> dict[str, Any]:
        """Device RNG states to checkpoint (the trainer saves the host ones)."""
        return {}

    def set_rng_state(self, state: dict[str, Any]) -> None:
        pass

    def setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Move/cast the model for this device; called before the optimizer is built."""
        return model.to(self.device)

    def build_optimizer(self, model: torch.nn.Module, training) -> torch.optim.Optimizer:
        """The optimizer for ``training`` (IPU overrides this with poptorch.optim)."""
        from minidalle.train.optim import build_optimizer

        return build_optimizer(model.parameters(), training)

    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, training) -> Runner:
        raise NotImplementedError

    def autocast(self) -> contextlib.AbstractContextManager:
        """The precision context for forward passes (also used by inference code)."""
        return contextlib.nullcontext()


# --------------------------------------------------------------------------- plain PyTorch


def split_batch(batch: dict[str, torch.Tensor], size: int) -> Iterable[dict[str, torch.Tensor]]:
    n = next(iter(batch.values())).shape[0]
    for start in range(0, n, size):
        yield {k: v[start:start + size] for k, v in batch.items()}


def grad_norm_if_nonfinite(params) -> float | None:
    """The total gradient norm of ``params`` when it is inf or NaN, else None."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return None
    norm = float(torch.linalg.vector_norm(torch.stack(
        [n.float() for n in torch._foreach_norm(grads)])))
    return None if math.isfinite(norm) else norm


class TorchRunner(Runner):
    """Plain eager PyTorch: micro-batches, accumulation, static loss scaling, clipping.

    The ``cpu`` backend uses it as is; a CUDA backend can override ``backward`` and
    ``optimizer_update`` to add a GradScaler (and count skipped updates).
    """

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        dev = self.backend.device
        return {k: v.to(dev, non_blocking=True) for k, v in batch.items()}

    def forward_loss(self, micro: dict[str, torch.Tensor]) -> torch.Tensor:
        with self.backend.autocast():
            return self.model(micro["text"], micro["image"], return_loss=True)

    def backward(self, loss: torch.Tensor, divisor: int) -> None:
        """Backward of one micro-batch loss (mean reduction over ``divisor`` micro-batches)."""
        scale = self.training.loss_scaling
        (loss.float() * (scale / divisor)).backward()

    def optimizer_update(self) -> tuple[int, float | None]:
        """Unscale, clip and step. Returns (skipped updates, grad norm or None)."""
        scale = self.training.loss_scaling
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        if scale != 1.0 and params:
            torch._foreach_div_([p.grad for p in params], scale)  # one call, not one per tensor
        norm = None
        if self.training.max_grad_norm is not None:
            norm = float(torch.nn.utils.clip_grad_norm_(params, self.training.max_grad_norm))
        bad = grad_norm_if_nonfinite(params) if norm is None else None
        if bad is not None or (norm is not None and not math.isfinite(norm)):
            # A non-finite gradient would poison the weights: leave them as they are; the
            # trainer counts the step as bad (training.max_bad_steps).
            return 0, norm if norm is not None else bad
        self.optimizer.step()
        return 0, norm

    micro_batch_input = True

    def train_step(self, batch) -> StepResult:
        t = self.training
        micros = iter(split_batch(batch, t.batch_size) if isinstance(batch, dict) else batch)
        divisor = t.gradient_accumulation * t.replication_factor  # micro-batches per update
        self.model.train()
        losses, skipped, norm = [], 0, None
        for _ in range(t.device_iterations):
            self.optimizer.zero_grad(set_to_none=True)
            for _ in range(divisor):
                micro = next(micros, None)
                if micro is None:
                    raise ValueError(f"train_step got fewer than samples_per_step = "
                                     f"{samples_per_step(t)} samples")
                loss = self.forward_loss(self.to_device(micro))
                self.backward(loss, divisor)
                losses.append(loss.detach())
            s, norm = self.optimizer_update()
            skipped += s
        mean = float(torch.stack(losses).float().mean())
        return StepResult(loss=mean, skipped_updates=skipped, grad_norm=norm)

    @torch.no_grad()
    def eval_loss(self, batch: dict[str, torch.Tensor]) -> float:
        self.model.eval()
        total, count = 0.0, 0
        for micro in split_batch(batch, self.training.batch_size):
            n = next(iter(micro.values())).shape[0]
            total += float(self.forward_loss(self.to_device(micro)).float()) * n
            count += n
        self.model.train()
        return total / max(count, 1)
