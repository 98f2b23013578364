"""Optimizers (Adam, AdamW) and the learning-rate schedule (warm-up + multi_step,
reduce_on_plateau or cosine).

The schedule is a small class of our own rather than a stack of torch schedulers so that
its whole state is a handful of numbers (saved as JSON in checkpoints) and the LR of any
step can be computed directly (``lr_at``), which makes warm-up compose with every schedule.
Steps are optimizer steps as the trainer counts them (one ``train_step`` call).
"""
from __future__ import annotations

import math
from typing import Iterable

import torch

from minidalle.errors import ConfigError


def build_optimizer(params: Iterable, training, *, fused: bool | None = None) -> torch.optim.Optimizer:
    """Adam or AdamW for ``training``. ``fused``: None picks the fused kernel wherever it
    applies (float tensors on CPU or CUDA); False takes the multi-tensor ``foreach`` one."""
    if len(training.betas) != 2:
        raise ConfigError(f"training.betas: expected two numbers, got {training.betas!r}")
    params = list(params)
    tensors = [p for p in params if isinstance(p, torch.Tensor)] or [
        t for g in params if isinstance(g, dict) for t in g["params"]]
    # The fused kernel is deterministic too and 2-3x faster than the per-parameter loop
    # (the update is ~10% of an L16 step at batch 3 without it); it needs float tensors
    # on CPU or CUDA.
    can_fuse = bool(tensors) and all(t.is_floating_point() and t.device.type in ("cpu", "cuda")
                                     for t in tensors)
    kwargs = dict(lr=training.lr, betas=tuple(training.betas), eps=training.eps,
                  weight_decay=training.weight_decay)
    if fused is False:
        kwargs.update(foreach=True)
    else:
        kwargs.update(fused=True) if can_fuse else kwargs.update(foreach=False)
    if training.optimizer == "adam":  # weight decay as L2 added to the gradient
        return torch.optim.Adam(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)  # decoupled weight decay


class LrSchedule:
    """``lr(step) = base * warmup(step) * schedule(step) * plateau_scale``.

    warmup: linear from ``base / warmup_steps`` to ``base`` over the first ``warmup_steps``
    steps (step s uses ``(s + 1) / warmup_steps``). Then:

    - ``none``: constant.
    - ``multi_step``: multiplied by ``lr_gamma`` at every step in ``lr_milestones``.
    - ``cosine``: from ``base`` down to ``min_lr`` at ``total_steps`` (half a cosine).
    - ``reduce_on_plateau``: multiplied by ``lr_gamma`` (not below ``min_lr``) when the
      metric passed to ``step(metric)`` has not improved by a relative 1e-4 for more than
      ``lr_patience`` steps (as torch's ReduceLROnPlateau in "min" mode, cooldown 0).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, training, total_steps: int) -> None:
        self.optimizer = optimizer
        self.kind = training.lr_scheduler
        self.base = training.lr
        self.warmup = training.warmup_steps
        self.milestones = sorted(training.lr_milestones)
        self.gamma = training.lr_gamma
        self.patience = training.lr_patience
        self.min_lr = training.min_lr
        self.total_steps = max(int(total_steps), 1)
        # state
        self.step_count = 0  # optimizer steps done
        self.plateau_scale = 1.0
        self.best = math.inf
        self.bad_steps = 0
        self.apply()

    def lr_at(self, step: int) -> float:
        lr = self.base
        if self.kind == "multi_step":
            lr *= self.gamma ** sum(1 for m in self.milestones if step >= m)
        elif self.kind == "cosine":
            span = max(self.total_steps - self.warmup, 1)
            t = min(max(step - self.warmup, 0) / span, 1.0)
            lr = self.min_lr + (self.base - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))
        elif self.kind == "reduce_on_plateau":
            lr = max(self.base * self.plateau_scale, self.min_lr)
        if step < self.warmup:
            lr *= (step + 1) / self.warmup
        return lr

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def apply(self) -> bool:
        """Set the LR for the next step on the optimizer; True if it changed."""
        lr = self.lr_at(self.step_count)
        changed = False
        for group in self.optimizer.param_groups:
            changed |= group["lr"] != lr
            group["lr"] = lr
        return changed

    def step(self, metric: float | None = None) -> bool:
        """Called after each optimizer step; returns True when the LR changed."""
        self.step_count += 1
        if self.kind == "reduce_on_plateau" and metric is not None and math.isfinite(metric):
            if metric < self.best * (1.0 - 1e-4) if self.best > 0 else metric < self.best:
                self.best, self.bad_steps = metric, 0
            else:
                self.bad_steps += 1
                if self.bad_steps > self.patience:
                    self.plateau_scale *= self.gamma
                    self.bad_steps = 0
        return self.apply()

    def state_dict(self) -> dict:
        return {"kind": self.kind, "step_count": self.step_count,
                "plateau_scale": self.plateau_scale,
                "best": self.best if math.isfinite(self.best) else None,
                "bad_steps": self.bad_steps}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        self.plateau_scale = float(state["plateau_scale"])
        self.best = math.inf if state.get("best") is None else float(state["best"])
        self.bad_steps = int(state["bad_steps"])
        self.apply()
