"""The attention interface: how a plugin adds an attention variant.

An attention component is registered through the ``minidalle_attention`` hook::

    @minidalle.hookimpl
    def minidalle_attention(register):
        register("sliding", "my_pkg.attn:build", config="my_pkg.attn:SlidingConfig",
                 summary="image tokens see the last W image tokens and all text")

The factory is called once per layer that uses the name, as
``factory(config, spec=AttentionSpec(...))`` (``factory(spec=...)`` when the component has
no config class), and returns ONE of two things:

1. **A pattern** (the easy way): an :class:`AttentionPattern` (or any object with a
   ``mask(text_len, fmap_size)`` method, or a plain function ``(text_len, fmap_size) ->
   mask``). The mask is a boolean tensor ``[N, N]``, ``N = text_len + fmap_size**2``, over
   *input positions*: position ``i`` may attend to position ``j`` iff ``mask[i, j]``.
   ``text_len`` counts ``<bos>`` plus the text (81 in the recipe); image input ``k`` sits
   at position ``text_len + k``, i.e. image row ``k // fmap_size``, column
   ``k % fmap_size``. The mask must be causal (``j <= i``) and allow the diagonal. The model
   wraps the pattern in :class:`PatternAttention`, which supplies the q/k/v projections,
   PyTorch's fused ``scaled_dot_product_attention``, training AND the key/value cache for
   sampling: nothing else to write.

2. **A module** (full control): an :class:`AttentionModule` subclass. It receives the
   layer input after the pre-norm and returns a tensor of the same shape::

       forward(x: [B, n, dim], *, offset: int = 0, cache: dict | None = None) -> [B, n, dim]

   Without a cache, ``x`` holds positions ``0..n-1`` (training and uncached sampling).
   With a cache, ``x`` holds positions ``offset..offset+n-1`` and ``cache`` is a dict the
   module owns for this layer (empty on the first call; the same dict on later calls, which
   have seen every earlier position). Set the class attribute ``supports_cache = True`` only
   when this works; when it is False, sampling recomputes the whole prefix at every step
   (and warns). Subclassing :class:`QKVAttention` gives the projections and the cache;
   override :meth:`QKVAttention.attend`.

Check a new variant with :func:`minidalle.testing.attention.check_attention`.
"""
from __future__ import annotations

from typing import Callable

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from minidalle.model.linear import Linear


@attrs.frozen
class AttentionSpec:
    """What one layer's attention is built for."""

    dim: int  # model width (input and output size)
    heads: int
    dim_head: int
    dropout: float  # attention-probability dropout while training
    text_len: int  # <bos> + text positions (text_seq_len + 1)
    fmap_size: int  # image token grid side; image_len = fmap_size ** 2
    layer_index: int = 0  # 0-based index of the layer in the transformer

    @property
    def image_len(self) -> int:
        return self.fmap_size**2

    @property
    def max_len(self) -> int:
        """Number of positions a mask covers (the model uses at most max_len - 1)."""
        return self.text_len + self.image_len


class AttentionPattern:
    """Subclass and implement :meth:`mask` to define an attention pattern."""

    def mask(self, text_len: int, fmap_size: int) -> torch.Tensor:
        """Boolean ``[N, N]`` mask, ``N = text_len + fmap_size**2``; True = may attend."""
        raise NotImplementedError


class AttentionModule(nn.Module):
    """Base class of attention variants that are whole modules (see the module docstring)."""

    #: True when ``forward(x, offset=..., cache=...)`` supports incremental decoding.
    supports_cache: bool = False

    def __init__(self, spec: AttentionSpec):
        super().__init__()
        self.spec = spec

    def forward(self, x: torch.Tensor, *, offset: int = 0, cache: dict | None = None) -> torch.Tensor:
        raise NotImplementedError


# --------------------------------------------------------------------------- helpers


def positions(text_len: int, fmap_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(index, is_image, row, col) of every input position; row/col are -1 for text."""
    n = text_len + fmap_size**2
    idx = torch.arange(n)
    img = idx - text_len
    is_image = img >= 0
    row = torch.where(is_image, img // fmap_size, -1)
    col = torch.where(is_image, img % fmap_size, -1)
    return idx, is_image, row, col


def causal_mask(text_len: int, fmap_size: int) -> torch.Tensor:
    idx = torch.arange(text_len + fmap_size**2)
    return idx[:, None] >= idx[None, :]


def pattern_mask(pattern, text_len: int, fmap_size: int) -> torch.Tensor:
    """The boolean mask of ``pattern`` (a pattern object or function), validated."""
    fn = pattern.mask if hasattr(pattern, "mask") else pattern
    mask = torch.as_tensor(fn(text_len, fmap_size))
    n = text_len + fmap_size**2
    if mask.dtype != torch.bool or tuple(mask.shape) != (n, n):
        raise ValueError(
            f"attention pattern {type(pattern).__name__}: mask must be a bool tensor of shape "
            f"({n}, {n}), got {mask.dtype} {tuple(mask.shape)}"
        )
    if not bool(mask.diagonal().all()):
        raise ValueError(f"attention pattern {type(pattern).__name__}: every position must see itself")
    if bool((mask & ~causal_mask(text_len, fmap_size)).any()):
        raise ValueError(f"attention pattern {type(pattern).__name__}: mask is not causal")
    return mask


class QKVAttention(AttentionModule):
    """Multi-head attention with q/k/v projections (no bias), output projection (bias) and
    a key/value cache. Subclasses implement :meth:`attend`."""

    supports_cache = True

    def __init__(self, spec: AttentionSpec):
        super().__init__(spec)
        inner = spec.heads * spec.dim_head
        self.to_qkv = Linear(spec.dim, inner * 3, bias=False)
        self.to_out = Linear(inner, spec.dim)

    def attend(self, q, k, v, offset: int) -> torch.Tensor:
        """q: ``[B, H, n, d]`` for positions ``offset..offset+n-1``; k, v: ``[B, H, L, d]``
        for positions ``0..L-1`` (``L = offset + n``). Returns ``[B, H, n, d]``."""
        raise NotImplementedError

    def attend_projection(self, qkv: torch.Tensor) -> torch.Tensor | None:
        """Optional whole-sequence path (training, uncached passes): ``qkv`` is to_qkv's
        output ``[B, n, 3, H, d]`` for positions ``0..n-1``; return the heads' output
        ``[B, n, H*d]``, or None to go through :meth:`attend`."""
        return None

    def forward(self, x, *, offset: int = 0, cache: dict | None = None):
        b, n, _ = x.shape
        h, d = self.spec.heads, self.spec.dim_head
        qkv = self.to_qkv(x).view(b, n, 3, h, d)
        if cache is None and offset == 0:
            out = self.attend_projection(qkv)
            if out is not None:
                return self.to_out(out)
        # Unbinding dim 2 gives the same [B, H, n, d] views as permute(2, 0, 3, 1, 4).unbind(0),
        # but backward stacks the gradients straight into to_qkv's layout (one copy, not two).
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
        if cache is not None:
            if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
                # Sampling with half-precision weights: CPU attention kernels are several
                # times slower in bf16 than in fp32, and an fp32 cache is also more exact.
                q, k, v = q.float(), k.float(), v.float()
            k, v = update_kv_cache(cache, k, v, offset, self.spec.max_len)
        elif offset:
            raise ValueError("offset without a cache")
        out = self.attend(q, k, v, offset).to(x.dtype)
        return self.to_out(out.transpose(1, 2).reshape(b, n, h * d))

    @property
    def dropout_p(self) -> float:
        return self.spec.dropout if self.training else 0.0


def sdpa(q, k, v, **kwargs) -> torch.Tensor:
    """``F.scaled_dot_product_attention``, computed in fp32 on CPU for bf16/fp16 inputs and
    returned in their dtype: PyTorch's fused CPU kernels are no faster in bf16 and, forward
    plus backward, 2x slower for the 81 text positions of an axial layer (and fp32 is
    more exact)."""
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", enabled=False):
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kwargs)
        return out.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, **kwargs)


def update_kv_cache(cache: dict, k, v, offset: int, max_len: int):
    """Write k, v ``[B, H, n, d]`` at ``offset`` into preallocated buffers; return the views
    of positions ``0..offset+n-1``."""
    b, h, n, d = k.shape
    if "k" not in cache:
        cache["k"] = k.new_empty(b, h, max_len, d)
        cache["v"] = v.new_empty(b, h, max_len, d)
    if offset + n > cache["k"].shape[2]:
        raise ValueError(f"sequence longer than the model's {max_len} positions")
    cache["k"][:, :, offset : offset + n] = k
    cache["v"][:, :, offset : offset + n] = v
    return cache["k"][:, :, : offset + n], cache["v"][:, :, : offset + n]


class PatternAttention(QKVAttention):
    """Attention whose pattern is a boolean mask: what a pattern-only plugin gets."""

    def __init__(self, spec: AttentionSpec, pattern, *, is_full: bool = False):
        super().__init__(spec)
        self.pattern = pattern
        # Not a state-dict entry: the mask follows from the pattern.
        mask = pattern_mask(pattern, spec.text_len, spec.fmap_size)
        self.register_buffer("mask", mask, persistent=False)
        self.is_full = is_full  # plain causal: lets SDPA use is_causal / no mask
        # For one-position decoding steps: the keys each position may see, as a few
        # (start, stop, step) slices (text, then the row / column / window of an image
        # token), so a step reads only those keys; an index table when there are many.
        counts = mask.sum(1)
        index = torch.zeros(len(mask), int(counts.max()), dtype=torch.long)
        self.key_slices: list = []
        for i, row in enumerate(mask):
            keys = row.nonzero().flatten()
            index[i, : len(keys)] = keys
            slices = _progressions(keys.tolist())
            self.key_slices.append(slices if len(slices) <= 8 else None)
        # The same flattened, (start, stop, step, start, ...): what the CPU decoders' fused
        # attention step (minidalle.inference.gemv.attention_step) takes
        self.step_slices = [None if sl is None else [v for triple in sl for v in triple]
                            for sl in self.key_slices]
        self.register_buffer("key_index", index, persistent=False)
        self.key_count = counts.tolist()

    def attend(self, q, k, v, offset):
        n, length = q.shape[-2], k.shape[-2]
        if n == 1:  # a decoding step
            count = self.key_count[offset]
            if count < length:  # gather the keys this position sees (sparse patterns)
                slices = self.key_slices[offset]
                if slices is None:
                    idx = self.key_index[offset, :count]
                    k, v = k.index_select(2, idx), v.index_select(2, idx)
                elif len(slices) == 1:
                    k, v = k[:, :, slice(*slices[0])], v[:, :, slice(*slices[0])]
                else:  # slicing + cat is several times faster than index_select here
                    k = torch.cat([k[:, :, slice(*sl)] for sl in slices], dim=2)
                    v = torch.cat([v[:, :, slice(*sl)] for sl in slices], dim=2)
            return F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout_p)
        if self.is_full and offset == 0:
            return sdpa(q, k, v, is_causal=True, dropout_p=self.dropout_p)
        mask = self.mask[offset : offset + n, :length]
        return sdpa(q, k, v, attn_mask=mask, dropout_p=self.dropout_p)

    def extra_repr(self) -> str:
        return f"pattern={type(self.pattern).__name__}"

    def steps_attend_key_slices(self) -> bool:
        """Whether a one-position step of :meth:`attend` is exactly softmax attention over
        the keys of ``key_slices`` (so a decoder may compute it its own way): true where
        ``attend`` is this class's, or that of a subclass that says so with the class
        attribute ``steps_like_pattern = True`` (it overrides only whole-sequence passes)."""
        owner = next(c for c in type(self).__mro__ if "attend" in c.__dict__)
        return self.dropout_p == 0 and (owner is PatternAttention
                                        or owner.__dict__.get("steps_like_pattern", False))


def _progressions(keys: list[int]) -> list[tuple[int, int, int]]:
    """Split sorted indices into arithmetic progressions, as (start, stop, step) slices."""
    out = []
    i = 0
    while i < len(keys):
        start = keys[i]
        if i + 1 == len(keys):
            out.append((start, start + 1, 1))
            break
        step = keys[i + 1] - start
        j = i + 1
        while j + 1 < len(keys) and keys[j + 1] - keys[j] == step:
            j += 1
        out.append((start, keys[j] + 1, step))
        i = j + 1
    return out


class FunctionPattern(AttentionPattern):
    """Wraps a plain ``(text_len, fmap_size) -> mask`` function."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def mask(self, text_len, fmap_size):
        return self.fn(text_len, fmap_size)


def as_attention_module(obj, spec: AttentionSpec, name: str = "?") -> AttentionModule:
    """Turn what an attention factory returned into a module."""
    if isinstance(obj, AttentionModule):
        return obj
    if isinstance(obj, nn.Module):
        raise TypeError(f"attention {name!r}: a module must subclass minidalle.model.attention_api.AttentionModule")
    if hasattr(obj, "mask"):
        return PatternAttention(spec, obj)
    if callable(obj):
        return PatternAttention(spec, FunctionPattern(obj))
    raise TypeError(
        f"attention {name!r}: factory returned {type(obj).__name__}; expected an AttentionPattern, "
        "a mask function or an AttentionModule"
    )
