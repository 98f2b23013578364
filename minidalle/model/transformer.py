"""Pre-norm transformer blocks with LayerScale, optional sandwich norm and GEGLU."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def layerscale_init(layer: int) -> float:
    """LayerScale start value by 1-based layer index (CaiT, as in the recipe)."""
    if layer <= 18:
        return 0.1
    if layer <= 24:
        return 1e-5
    return 1e-6


class FeedForward(nn.Module):
    """Linear dim -> 2*mult*dim, GEGLU halves it, Linear back to dim."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.proj_in = nn.Linear(dim, dim * mult * 2)
        self.dropout = nn.Dropout(dropout)
        self.proj_out = nn.Linear(dim * mult, dim)

    def forward(self, x):
        x, gates = self.proj_in(x).chunk(2, dim=-1)
        return self.proj_out(self.dropout(x * F.gelu(gates)))


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
