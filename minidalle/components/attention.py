"""Built-in attention variants: ``full``, ``axial_row``, ``axial_col``, ``conv_like``.

Each is a pattern over input positions (see :mod:`minidalle.model.attention_api`): text
positions attend causally to text; an image position attends to every text position and to
the earlier image positions its pattern allows (itself included).
"""
from __future__ import annotations

import attrs
import torch

from minidalle.config import positive
from minidalle.model.attention_api import (
    AttentionPattern,
    AttentionSpec,
    PatternAttention,
    causal_mask,
    positions,
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
    return PatternAttention(spec, AxialPattern(0))


def axial_col(config=None, *, spec: AttentionSpec):
    return PatternAttention(spec, AxialPattern(1))


def conv_like(config: ConvLikeConfig | None = None, *, spec: AttentionSpec):
    config = config or ConvLikeConfig()
    return PatternAttention(spec, ConvLikePattern(config.kernel_size, config.dilation))
