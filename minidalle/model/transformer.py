"""Pre-norm transformer blocks with LayerScale, optional sandwich norm and GEGLU."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minidalle.model.linear import Linear


def layerscale_init(layer: int) -> float:
    """LayerScale start value by 1-based layer index (CaiT, as in the recipe)."""
    if layer <= 18:
        return 0.1
    if layer <= 24:
        return 1e-5
    return 1e-6


class _GEGLU(torch.autograd.Function):
    """``x * gelu(gates)`` for ``x, gates = h.chunk(2, -1)``, with the same arithmetic as
    autograd's, but the backward writes both halves of the gradient of ``h`` into one
    buffer instead of concatenating them (one [B, n, 2*mult*dim] copy per layer less)."""

    @staticmethod
    def forward(ctx, h):
        x, gates = h.chunk(2, dim=-1)
        act = F.gelu(gates)
        ctx.save_for_backward(h, act)
        return x * act

    @staticmethod
    def backward(ctx, grad):
        h, act = ctx.saved_tensors
        x, gates = h.chunk(2, dim=-1)
        grad_h = torch.empty_like(h)
        grad_x, grad_gates = grad_h.chunk(2, dim=-1)
        torch.mul(grad, act, out=grad_x)
        torch.ops.aten.gelu_backward.grad_input(grad * x, gates, grad_input=grad_gates)
        return grad_h


def geglu(h: torch.Tensor) -> torch.Tensor:
    """GEGLU over the last dimension of ``h`` (first half: values, second half: gates).
    Under ``torch.compile`` the plain expression: the compiler fuses it, and Dynamo cannot
    trace the hand-written backward's ``out=`` products (a graph break per layer)."""
    if torch.is_grad_enabled() and h.requires_grad and not torch.compiler.is_compiling():
        return _GEGLU.apply(h)
    x, gates = h.chunk(2, dim=-1)
    return x * F.gelu(gates)


class FeedForward(nn.Module):
    """Linear dim -> 2*mult*dim, GEGLU halves it, Linear back to dim."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.proj_in = Linear(dim, dim * mult * 2)
        self.dropout = nn.Dropout(dropout)
        self.proj_out = Linear(dim * mult, dim)

    def forward(self, x):
        return self.proj_out(self.dropout(geglu(self.proj_in(x))))


class Block(nn.Module):
    """x + scale_attn * Norm(Attn(LN(x))), then x + scale_ff * Norm(FF(LN(x)))."""

    def __init__(self, dim: int, attn: nn.Module, *, layer: int, ff_mult: int = 4,
                 ff_dropout: float = 0.0, sandwich_norm: bool = False):
        super().__init__()
        init = layerscale_init(layer)
        self.norm_attn = nn.LayerNorm(dim)
        self.attn = attn
        self.post_attn_norm = nn.LayerNorm(dim) if sandwich_norm else nn.Identity()
        self.scale_attn = nn.Parameter(torch.full((dim,), init))
        self.norm_ff = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, ff_mult, ff_dropout)
        self.post_ff_norm = nn.LayerNorm(dim) if sandwich_norm else nn.Identity()
        self.scale_ff = nn.Parameter(torch.full((dim,), init))

    def forward(self, x, *, offset: int = 0, cache: dict | None = None):
        a = self.attn(self.norm_attn(x), offset=offset, cache=cache)
        x = torch.addcmul(x, self.post_attn_norm(a), self.scale_attn)
        f = self.ff(self.norm_ff(x))
        return torch.addcmul(x, self.post_ff_norm(f), self.scale_ff)


class Transformer(nn.Module):
    def __init__(self, blocks: list[Block]):
        super().__init__()
        self.layers = nn.ModuleList(blocks)

    def forward(self, x, *, offset: int = 0, caches: list | None = None):
        for i, layer in enumerate(self.layers):
            x = layer(x, offset=offset, cache=None if caches is None else caches[i])
        return x
