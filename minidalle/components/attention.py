"""Built-in attention variants: ``full``, ``axial_row``, ``axial_col``, ``conv_like``.

Each is a pattern over input positions (see :mod:`minidalle.model.attention_api`): text
positions attend causally to text; an image position attends to every text position and to
the earlier image positions its pattern allows (itself included).
"""
from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from minidalle.config import one_of, positive
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
    """A ``kernel_size`` x ``kernel_size`` window (with ``dilation``), restricted to earlier
    positions. ``anchor="centre"``: the window is centred on the query (DALLE-pytorch before
    1.5.0 and Graphcore's example); ``"corner"``: the query is the window's bottom-right
    corner, so the window reaches ``(kernel_size - 1) * dilation`` rows up and columns left
    (DALLE-pytorch 1.5.0 and later, whose SparseConvCausalAttention pads causally)."""

    def __init__(self, kernel_size: int = 5, dilation: int = 1, anchor: str = "centre"):
        self.kernel_size = kernel_size
        self.dilation = dilation
        self.anchor = anchor

    def mask(self, text_len, fmap_size):
        idx, is_image, row, col = positions(text_len, fmap_size)
        dr = row[:, None] - row[None, :]
        dc = col[:, None] - col[None, :]
        if self.anchor == "corner":
            reach = (self.kernel_size - 1) * self.dilation
            window = (dr >= 0) & (dr <= reach) & (dc >= 0) & (dc <= reach)
        else:
            reach = (self.kernel_size // 2) * self.dilation
            window = (dr.abs() <= reach) & (dc.abs() <= reach)
        window &= (dr % self.dilation == 0) & (dc % self.dilation == 0)
        return causal_mask(text_len, fmap_size) & (~is_image[:, None] | ~is_image[None, :] | window)


class AxialAttention(PatternAttention):
    """Axial attention computed per image row (or column) in training and uncached passes.

    Masked dense attention would compute all (query, key) pairs and throw most away; here
    the image queries score against the text keys (one matmul) and against their own row or
    column (a batched 16 x 16 matmul), so the work is what the pattern allows. Decoding
    steps (one position at a time) use the generic masked path of PatternAttention.
    ``masked_sdpa = True`` (the cuda backend's ``axial_sdpa``) sends whole sequences there
    too: one fused ``scaled_dot_product_attention`` with the boolean mask, which on a GPU
    beats the many small products of the per-line path.
    """

    masked_sdpa = False
    steps_like_pattern = True  # attend() sends one-position steps to PatternAttention's

    def __init__(self, spec: AttentionSpec, axis: int):
        super().__init__(spec, AxialPattern(axis))
        self.axis = axis
        f = spec.fmap_size
        self.register_buffer("line_mask", ~torch.ones(f, f, dtype=torch.bool).tril(), persistent=False)

    def attend_projection(self, qkv):
        # fp32 without dropout: the hand-written path (_AxialCore); else attend() below
        if (self.spec.text_len < qkv.shape[1] and not self.dropout_p and qkv.dtype == torch.float32
                and not self.masked_sdpa):
            return _AxialCore.apply(qkv, self.axis, self.spec.text_len, self.spec.fmap_size)
        return None

    def attend(self, q, k, v, offset):
        t, f = self.spec.text_len, self.spec.fmap_size
        b, h, n, d = q.shape
        if offset != 0 or n != k.shape[-2] or self.masked_sdpa:
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


class _AxialCore(torch.autograd.Function):
    """Axial attention from the q/k/v projection ``[B, n, 3, H, d]`` to the heads' output
    ``[B, n, H*d]``, with a hand-written backward (fp32 training and uncached passes).

    The same arithmetic as :meth:`AxialAttention.attend` under autograd, without its
    bookkeeping: q/k/v are laid out once into a padded ``[3, B, H, T+f*f, d]`` buffer (not
    padded, split and stacked back per tensor), the text and image outputs are written
    into the output layout directly (no concatenation), and the backward gathers the
    gradients of q, k and v in one buffer. Softmax backward: ``dS = P * (dP - rowsum(dO * O))``.
    About 2% off an L16 fp32 step (``benchmarks/RESULTS.md``, "Session 5").
    """

    @staticmethod
    def forward(ctx, qkv, axis: int, t: int, f: int):
        b, n, _, h, d = qkv.shape
        qkv_p = qkv.new_empty(3, b, h, t + f * f, d)
        qkv_p[:, :, :, :n] = qkv.permute(2, 0, 3, 1, 4)
        qkv_p[:, :, :, n:] = 0  # the absent last image positions
        scale = d**-0.5
        (qt, qi), (kt, ki), (vt, vi) = (z.split([t, f * f], dim=2) for z in qkv_p.unbind(0))
        # text queries: causal over the text
        p_tt = torch.matmul(qt, kt.transpose(-1, -2)).mul_(scale)
        p_tt = p_tt.masked_fill_(_above_diagonal(t, qkv.device), float("-inf")).softmax(-1)
        out_t = torch.matmul(p_tt, vt)
        # image queries: every text key, then the earlier keys of their own row / column
        s_t = torch.matmul(qi, kt.transpose(-1, -2)).view(b, h, f, f, t)  # raster order
        s_l = torch.matmul(_lines(qi, axis, f), _lines(ki, axis, f).transpose(-1, -2))  # line order
        s_l = s_l.masked_fill_(_above_diagonal(f, qkv.device), float("-inf"))
        p = torch.cat([s_t, _to_raster_order(s_l, axis)], dim=-1).mul_(scale).softmax(-1)
        p_t, p_l = p.split([t, f], dim=-1)
        p_t = p_t.reshape(b * h, f * f, t)
        p_l = _to_line_order(p_l, axis)
        out_l = _raster(torch.matmul(p_l, _lines(vi, axis, f)), axis, f)
        out_i = torch.baddbmm(out_l.reshape(b * h, f * f, d), p_t, vt.reshape(b * h, t, d)).view(b, h, f * f, d)
        ctx.save_for_backward(qkv_p, p_tt, p_t, p_l, out_t, out_i)
        ctx.axis, ctx.n = axis, n
        out = qkv.new_empty(b, n, h, d)
        out[:, :t] = out_t.transpose(1, 2)
        out[:, t:] = out_i[:, :, : n - t].transpose(1, 2)
        return out.view(b, n, h * d)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        qkv_p, p_tt, p_t, p_l, out_t, out_i = ctx.saved_tensors
        axis, n = ctx.axis, ctx.n
        _, b, h, big, d = qkv_p.shape
        t = out_t.shape[2]
        f = round((big - t) ** 0.5)
        scale = d**-0.5
        (qt, qi), (kt, ki), (vt, vi) = (z.split([t, f * f], dim=2) for z in qkv_p.unbind(0))
        grad = grad.view(b, n, h, d)
        do_t = grad[:, :t].transpose(1, 2).contiguous()
        do_i = grad.new_zeros(b, h, f * f, d)
        do_i[:, :, : n - t] = grad[:, t:].transpose(1, 2)
        # text queries
        corr_t = (do_t * out_t).sum(-1, keepdim=True)  # rowsum(dO * O)
        ds_tt = torch.matmul(do_t, vt.transpose(-1, -2)).sub_(corr_t).mul_(p_tt).mul_(scale)
        dq_t = torch.matmul(ds_tt, kt)
        # image queries: text keys (raster order) and line keys (line order)
        corr_i = (do_i * out_i).sum(-1, keepdim=True)
        ds_t = torch.matmul(do_i, vt.transpose(-1, -2)).sub_(corr_i).view(b * h, f * f, t).mul_(p_t).mul_(scale)
        do_l = _lines(do_i, axis, f)
        ds_l = torch.matmul(do_l, _lines(vi, axis, f).transpose(-1, -2))
        ds_l = ds_l.sub_(_lines(corr_i, axis, f)).mul_(p_l).mul_(scale)
        q_l, k_l = _lines(qi, axis, f), _lines(ki, axis, f)
        dq_i = torch.baddbmm(_raster(torch.matmul(ds_l, k_l), axis, f).reshape(b * h, f * f, d),
                             ds_t, kt.reshape(b * h, t, d))
        dk_i = _raster(torch.matmul(ds_l.transpose(-1, -2), q_l), axis, f)
        dv_i = _raster(torch.matmul(p_l.transpose(-1, -2), do_l), axis, f)
        dk_t = torch.baddbmm(torch.matmul(ds_tt.transpose(-1, -2), qt).view(b * h, t, d),
                             ds_t.transpose(1, 2), qi.reshape(b * h, f * f, d))
        dv_t = torch.baddbmm(torch.matmul(p_tt.transpose(-1, -2), do_t).view(b * h, t, d),
                             p_t.transpose(1, 2), do_i.view(b * h, f * f, d))
        d_qkv = grad.new_empty(3, b, h, n, d)  # contiguous rows; one permuting copy after
        for i, (text, image) in enumerate(((dq_t, dq_i), (dk_t, dk_i), (dv_t, dv_i))):
            d_qkv[i, :, :, :t] = text.view(b, h, t, d)
            d_qkv[i, :, :, t:] = image.view(b, h, f * f, d)[:, :, : n - t]
        return d_qkv.permute(1, 3, 0, 2, 4), None, None, None


def _above_diagonal(size: int, device) -> torch.Tensor:
    return torch.ones(size, size, dtype=torch.bool, device=device).triu_(1)


def _to_raster_order(scores, axis: int):
    """Per-line scores ``[B, H, line, query, key]`` -> ``[B, H, row, col, key]``."""
    return scores.transpose(2, 3) if axis == 1 else scores


_to_line_order = _to_raster_order  # the same swap back


def _lines(x, axis: int, f: int):
    """``[..., f*f, d]`` image positions (raster order) as ``[..., f, f, d]`` lines: rows
    (axis 0) or columns (axis 1, a transposed view)."""
    lines = x.reshape(*x.shape[:-2], f, f, x.shape[-1])
    return lines.transpose(-3, -2) if axis == 1 else lines


def _raster(lines, axis: int, f: int):
    """Inverse of :func:`_lines`: ``[..., f, f, d]`` -> ``[..., f*f, d]`` (a view for rows)."""
    if axis == 1:
        lines = lines.transpose(-3, -2)
    return lines.reshape(*lines.shape[:-3], f * f, lines.shape[-1])


def _odd(instance, attribute, value):
    from minidalle.config import FieldError

    if value % 2 != 1:
        raise FieldError(f"{attribute.name}: expected an odd number, got {value!r}")


@attrs.define
class ConvLikeConfig:
    kernel_size: int = attrs.field(default=5, validator=[positive, _odd])
    dilation: int = attrs.field(default=1, validator=positive)
    # "centre": window centred on the query; "corner": the query at its bottom-right corner
    # (DALLE-pytorch >= 1.5.0). See ConvLikePattern.
    anchor: str = attrs.field(default="centre", validator=one_of("centre", "corner"))


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
    return PatternAttention(spec, ConvLikePattern(config.kernel_size, config.dilation, config.anchor))
