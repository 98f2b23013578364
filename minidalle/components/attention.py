"""Built-in attention variants: ``full``, ``axial_row``, ``axial_col``, ``conv_like``.

Each is a pattern over input positions (see :mod:`minidalle.model.attention_api`): text
positions attend causally to text; an image position attends to every text position and to
the earlier image positions its pattern allows (itself included).
"""
from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F

from minidalle.config import positive
from minidalle.model.attention_api import (
    AttentionPattern,
    AttentionSpec,
    PatternAttention,
    causal_mask,
    positions,
    sdpa,
)


class FullPattern(AttentionPattern):
    def mask(self, text_len, fmap_size):
        return causal_mask(text_len, fmap_size)


class AxialPattern(AttentionPattern):
    """Same image row (axis 0) or same image column (axis 1)."""

    def __init__(self, axis: int):
        self.axis = axis

    def mask(self, text_len, fmap_size):
        idx, is_image, row, col = positions(text_len, fmap_size)
        line = row if self.axis == 0 else col
        same = line[:, None] == line[None, :]
        return causal_mask(text_len, fmap_size) & (~is_image[:, None] | ~is_image[None, :] | same)


class ConvLikePattern(AttentionPattern):
    """A ``kernel_size`` x ``kernel_size`` window (with ``dilation``) centred on the query,
    restricted to earlier positions (DALLE-pytorch's SparseConvCausalAttention)."""

    def __init__(self, kernel_size: int = 5, dilation: int = 1):
        self.kernel_size = kernel_size
        self.dilation = dilation

    def mask(self, text_len, fmap_size):
        idx, is_image, row, col = positions(text_len, fmap_size)
        reach = (self.kernel_size // 2) * self.dilation
        dr = row[:, None] - row[None, :]
        dc = col[:, None] - col[None, :]
        window = (dr.abs() <= reach) & (dc.abs() <= reach)
        window &= (dr % self.dilation == 0) & (dc % self.dilation == 0)
        return causal_mask(text_len, fmap_size) & (~is_image[:, None] | ~is_image[None, :] | window)


class AxialAttention(PatternAttention):
    """Axial attention computed per image row (or column) in training and uncached passes.

    Masked dense attention would compute all (query, key) pairs and throw most away; here
    the image queries score against the text keys (one matmul) and against their own row or
    column (a batched 16 x 16 matmul), so the work is what the pattern allows. Decoding
    steps (one position at a time) use the generic masked path of PatternAttention.
    """

    def __init__(self, spec: AttentionSpec, axis: int):
        super().__init__(spec, AxialPattern(axis))
        self.axis = axis
        f = spec.fmap_size
        self.register_buffer("line_mask", ~torch.ones(f, f, dtype=torch.bool).tril(), persistent=False)

    def attend(self, q, k, v, offset):
        t, f = self.spec.text_len, self.spec.fmap_size
        b, h, n, d = q.shape
        if offset != 0 or n != k.shape[-2]:
            return super().attend(q, k, v, offset)
        if n <= t:
            return sdpa(q, k, v, is_causal=True, dropout_p=self.dropout_p)
        pad = f * f - (n - t)  # the last image positions are absent in training: pad them
        # One split per tensor (not slices): its backward is one cat, where each slice's
        # backward zero-fills a full-size gradient that is then added up.
        qt, qi = F.pad(q, (0, 0, 0, pad)).split([t, f * f], dim=2)
        kt, ki = F.pad(k, (0, 0, 0, pad)).split([t, f * f], dim=2)
        vt, vi = F.pad(v, (0, 0, 0, pad)).split([t, f * f], dim=2)
        out_text = sdpa(qt, kt, vt, is_causal=True, dropout_p=self.dropout_p)
        scores_text = qi @ kt.transpose(-1, -2)  # [B, H, f*f, t]
        qi, ki, vi = qi.view(b, h, f, f, d), ki.view(b, h, f, f, d), vi.view(b, h, f, f, d)  # raster order
        if self.axis == 1:  # columns: make each column a "row"
            qi, ki, vi = qi.transpose(2, 3), ki.transpose(2, 3), vi.transpose(2, 3)
        scores_line = (qi @ ki.transpose(-1, -2)).masked_fill(self.line_mask, float("-inf"))
        if self.axis == 1:
            scores_line = scores_line.transpose(2, 3)  # back to raster order of the queries
        scores = torch.cat([scores_text.view(b, h, f, f, t), scores_line], dim=-1)
        probs = (scores * d**-0.5).softmax(dim=-1)
        if self.dropout_p:
            probs = F.dropout(probs, self.dropout_p)
        p_text, p_line = probs.split([t, f], dim=-1)
        if self.axis == 1:
            p_line = p_line.transpose(2, 3)
        out_line = p_line @ vi
        if self.axis == 1:
            out_line = out_line.transpose(2, 3)
        # out_line + p_text @ vt in one call (no separate sum)
        out_image = torch.baddbmm(out_line.reshape(b * h, f * f, d), p_text.reshape(b * h, f * f, t),
                                  vt.reshape(b * h, t, d)).view(b, h, f * f, d)
        return torch.cat([out_text, out_image], dim=2)[:, :, :n]


def _odd(instance, attribute, value):
    from minidalle.config import FieldError

    if value % 2 != 1:
        raise FieldError(f"{attribute.name}: expected an odd number, got {value!r}")


@attrs.define
class ConvLikeConfig:
    kernel_size: int = attrs.field(default=5, validator=[positive, _odd])
    dilation: int = attrs.field(default=1, validator=positive)


# Config classes looked up by builtins.py (None: the variant takes no parameters).
config_for_full = None
config_for_axial_row = None
config_for_axial_col = None
config_for_conv_like = ConvLikeConfig


def full(config=None, *, spec: AttentionSpec):
    return PatternAttention(spec, FullPattern(), is_full=True)


def axial_row(config=None, *, spec: AttentionSpec):
    return AxialAttention(spec, axis=0)


def axial_col(config=None, *, spec: AttentionSpec):
    return AxialAttention(spec, axis=1)


def conv_like(config: ConvLikeConfig | None = None, *, spec: AttentionSpec):
    config = config or ConvLikeConfig()
    return PatternAttention(spec, ConvLikePattern(config.kernel_size, config.dilation))
