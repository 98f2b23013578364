"""Linear layers whose fp32 CPU products run on oneDNN instead of MKL.

PyTorch sends an fp32 ``F.linear`` on the CPU to MKL's sgemm. On this project's CPU (AMD
EPYC, Zen 4) oneDNN's AVX-512 kernels run the L16 shapes at 200-220 GFLOP/s where MKL
runs them at 155-195, and an L16 training step is 5-12% faster (interleaved A/B; see
``benchmarks/RESULTS.md``, "Session 5"). Both are fp32 throughout: oneDNN sums in another
order, so results differ from ``F.linear``'s by fp32 rounding only, and they are
deterministic for a fixed thread count.

:func:`linear` uses oneDNN (``torch.ops.mkldnn._linear_pointwise``, the op PyTorch's own
compiler emits for CPU linears) for the forward product, the input gradient and the weight
gradient of narrow layers (out <= in features). The weight gradient of wide layers stays
on MKL: oneDNN computes it no faster once its transposed result is copied into the
weight's layout. Everything else falls back to ``F.linear``: other devices and dtypes,
autocast (which must see ``F.linear`` to cast it), a PyTorch or CPU where the capability probe
(:mod:`minidalle.hardware`) finds oneDNN's fp32 linear not working, ``MINIDALLE_ONEDNN_LINEAR=0``, and modules marked with :func:`use_plain_linear` (the IPU
backend, whose tracer knows only standard ops).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from minidalle import hardware


def onednn_available(dtype: torch.dtype = torch.float32) -> bool:
    """oneDNN's linear op (what :func:`onednn_product` calls) runs here for ``dtype``: the
    capability probe tried it (``is_available()`` alone is no evidence)."""
    return hardware.onednn_works("linear", dtype)


def _available() -> bool:
    return os.environ.get("MINIDALLE_ONEDNN_LINEAR", "1") != "0" and onednn_available()


ENABLED = _available()


def onednn_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` on oneDNN (no autograd); x is ``[..., in]``."""
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), weight, bias, "none", [], "")
    return y.view(*x.shape[:-1], weight.shape[0])


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return onednn_product(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad2 = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = onednn_product(grad, weight.t(), None)  # grad @ weight
        if ctx.needs_input_grad[1]:
            x2 = x.reshape(-1, x.shape[-1])
            if weight.shape[0] <= weight.shape[1]:
                grad_w = onednn_product(grad2.t(), x2.t(), None)
            else:
                grad_w = torch.mm(grad2.t(), x2)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad2.sum(0)
        return grad_x, grad_w, grad_b


def use_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`linear` takes the oneDNN path for these tensors."""
    return (ENABLED and x.device.type == "cpu" and x.dtype == torch.float32
            and weight.dtype == torch.float32 and x.dim() >= 2 and x.shape[-1] > 0
            and not torch.is_autocast_enabled("cpu"))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           onednn: bool = True) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, on oneDNN for fp32 CPU tensors (see the module docstring)."""
    if not (onednn and use_onednn(x, weight)):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return _OneDNNLinear.apply(x, weight, bias)
    return onednn_product(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state-dict names) computed by :func:`linear`."""

    onednn = True  # use_plain_linear() sets it False on an instance

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, onednn=self.onednn)


def use_plain_linear(model: nn.Module) -> nn.Module:
    """Make every layer of ``model`` that would use oneDNN call ``F.linear`` instead."""
    for module in model.modules():
        if hasattr(module, "onednn"):
            module.onednn = False
    return model
