"""bf16 weights with fp32 master weights (``precision = "bf16-master"``).

Autocast keeps fp32 weights and casts every weight and most activations to bf16 at each
op, forward and backward; those casts and the fp32 element-wise work around them ate most
of bf16's matmul speed-up on CPU. This runner instead trains a bf16 copy of the model
(weights, activations and gradients all bf16; the loss's log-softmax in fp32) and keeps
the fp32 model the trainer owns as the *master* copy:

- after each micro-batch's backward the bf16 gradients are added into fp32 ``.grad`` of
  the masters (so gradient accumulation sums in fp32, not bf16) and dropped;
- the optimizer (its state, loss unscaling and clipping) works on the fp32 masters, as in
  fp32 training;
- after each update the masters are copied (rounded) into the bf16 copy.

The runner's ``model`` stays the fp32 master module: checkpoints hold fp32 weights and
resume, generation and evaluation are unchanged. The bf16 copy is always the rounding of
the masters, so resuming from a checkpoint continues exactly as an uninterrupted run.
"""
from __future__ import annotations

import copy

import torch

from minidalle.train.backend import TorchRunner


def bf16_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A bf16 copy of ``model`` sharing its frozen codec (which stays fp32)."""
    codec = getattr(model, "codec", None)
    memo = {} if codec is None else {id(codec): codec}
    return copy.deepcopy(model, memo).to(torch.bfloat16)


class MasterWeightsRunner(TorchRunner):
    """A :class:`TorchRunner` that runs forward and backward on a bf16 copy of the model."""

    def __init__(self, backend, model, optimizer, training) -> None:
        super().__init__(backend, model, optimizer, training)
        self.work = bf16_copy(model)
        pairs = [(m, w) for m, w in zip(model.parameters(), self.work.parameters()) if m.requires_grad]
        self.masters = [m for m, _ in pairs]
        self.work_params = [w for _, w in pairs]
        # fp32 gradient buffers, reused every update: a fresh 4-bytes-per-weight allocation
        # per update costs page faults on every first touch.
        self.grad_buffers = [torch.empty_like(m) for m in self.masters]

    def forward_loss(self, micro: dict[str, torch.Tensor]) -> torch.Tensor:
        self.work.train(self.model.training)  # train_step / eval_loss set the master's mode
        return self.work(micro["text"], micro["image"], return_loss=True)

    def backward(self, loss: torch.Tensor, divisor: int) -> None:
        super().backward(loss, divisor)
        fresh, fresh_grads, acc, acc_grads = [], [], [], []
        for m, w, buf in zip(self.masters, self.work_params, self.grad_buffers):
            if w.grad is None:
                continue
            if m.grad is None:  # first micro-batch of this update
                m.grad = buf
                fresh.append(buf)
                fresh_grads.append(w.grad)
            else:
                acc.append(m.grad)
                acc_grads.append(w.grad)
            w.grad = None
        if fresh:
            torch._foreach_copy_(fresh, fresh_grads)  # bf16 -> fp32
        if acc:
            torch._foreach_add_(acc, acc_grads)  # fp32 += bf16

    def optimizer_update(self) -> tuple[int, float | None]:
        result = super().optimizer_update()  # unscale, clip and step on the fp32 masters
        with torch.no_grad():
            torch._foreach_copy_(self.work_params, self.masters)  # round into the bf16 copy
        return result
