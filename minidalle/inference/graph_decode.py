"""Cached image-decoding steps of fixed shape, replayed from a CUDA graph on a GPU.

A cached step feeds one position per sequence; on a GPU its few hundred small kernels
take longer to launch than to run. :class:`StaticStep` writes the step so that every
tensor has the same shape at every position, which is what ``torch.cuda.CUDAGraph``
needs: the token and the position are inputs in fixed buffers (the position a 0-dim
device tensor), each layer writes its key/value at the position with ``index_copy_``
into its preallocated cache and attends over all ``max_len`` cache slots with the row of
its pattern's boolean mask at that position (slots not yet written are masked out: the
mask is causal). One capture per (model, batch size) then serves every image position;
a replay launches the whole step at once.

On the CPU (``graph=False``) the same fixed-shape step runs eagerly: the tests compare it
with the ordinary cached decoding there, and ``tests/equivalence/test_cuda.py`` compares
the replayed graph with it on a GPU. Only models of standard blocks qualify (as for
:class:`~minidalle.inference.decode.LeanDecoder`) whose attention layers are boolean-mask patterns
(every built-in one).
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from minidalle.model.attention_api import PatternAttention, QKVAttention
from minidalle.model.transformer import Block, FeedForward

# model -> {(batch, graph): StaticStep}; dropped with the model.
_steps: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def supports(model) -> bool:
    """Standard blocks with boolean-mask pattern attention and no autocast around."""
    if any(torch.is_autocast_enabled(t) for t in ("cuda", "cpu")):
        return False  # the buffers have the weights' dtype; autocast would mix them
    return all(
        type(block) is Block and type(block.ff) is FeedForward
        and isinstance(block.attn, PatternAttention)
        and type(block.attn).forward is QKVAttention.forward
        for block in model.transformer.layers
    )


class StaticStep:
    """The fixed-shape decoding step of ``model`` for ``batch`` sequences.

    Use: :meth:`attach` its key/value buffers to a fresh ``KVCache`` before the prompt
    goes through the model (the prompt pass then writes into them), then :meth:`hidden`
    for every one-position image step.
    """

    def __init__(self, model, batch: int, *, graph: bool):
        # A weak reference: the step is a value of a WeakKeyDictionary keyed by the model.
        self._model = weakref.ref(model)
        self.graph_wanted = graph
        self.graph: torch.cuda.CUDAGraph | None = None
        p = model.text_emb.weight
        self.params = [q.data_ptr() for q in model.parameters()]
        self.text_len, self.fmap = model.text_len, model.fmap_size
        layers = model.transformer.layers
        self.masks = [layer.attn.mask for layer in layers]
        self.keys, self.values = [], []
        for layer in layers:
            s = layer.attn.spec
            # zeros, not empty: masked-out slots must hold finite numbers (NaN * 0 is NaN)
            self.keys.append(torch.zeros(batch, s.heads, s.max_len, s.dim_head, dtype=p.dtype, device=p.device))
            self.values.append(torch.zeros_like(self.keys[-1]))
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=p.device)
        self.pos = torch.zeros((), dtype=torch.long, device=p.device)
        self.out_hidden = self.out_logits = None

    @property
    def model(self):
        return self._model()

    @classmethod
    def get(cls, model, batch: int, *, graph: bool) -> "StaticStep":
        """The step for (model, batch), built once; rebuilt when a parameter tensor was
        replaced (``.to()``, a new model). In-place updates (an optimizer step) are seen
        by a replay, which reads the parameters' memory."""
        steps = _steps.setdefault(model, {})
        step = steps.get((batch, graph))
        if step is None or step.params != [q.data_ptr() for q in model.parameters()]:
            step = steps[(batch, graph)] = cls(model, batch, graph=graph)
        return step

    def attach(self, cache) -> None:
        for layer_cache, k, v in zip(cache.layers, self.keys, self.values):
            layer_cache["k"], layer_cache["v"] = k, v

    def _run(self) -> None:
        """One step from ``self.tokens`` at ``self.pos`` into ``out_hidden``/``out_logits``."""
        model, pos = self.model, self.pos.view(1)
        image_pos = pos - self.text_len
        emb = model.image_pos_emb
        x = model.image_emb(self.tokens) + (emb.row.index_select(0, image_pos // self.fmap)
                                            + emb.col.index_select(0, image_pos % self.fmap))
        b = x.shape[0]
        for layer, keys, values, mask in zip(model.transformer.layers, self.keys, self.values, self.masks):
            attn = layer.attn
            h, d = attn.spec.heads, attn.spec.dim_head
            q, k, v = (t.transpose(1, 2) for t in attn.to_qkv(layer.norm_attn(x)).view(b, 1, 3, h, d).unbind(2))
            keys.index_copy_(2, pos, k.to(keys.dtype))
            values.index_copy_(2, pos, v.to(values.dtype))
            out = F.scaled_dot_product_attention(q.to(keys.dtype), keys, values,
                                                 attn_mask=mask.index_select(0, pos))
            a = attn.to_out(out.to(x.dtype).transpose(1, 2).reshape(b, 1, h * d))
            x = torch.addcmul(x, layer.post_attn_norm(a), layer.scale_attn)
            x = torch.addcmul(x, layer.post_ff_norm(layer.ff(layer.norm_ff(x))), layer.scale_ff)
        self.out_hidden = x
        self.out_logits = model.image_logits(x)

    def _capture(self) -> None:
        # Warm-up on a side stream first (as the CUDA graphs documentation asks): it runs
        # the step for real, writing the same key/value at the same position as the
        # replay that follows, so it changes nothing.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._run()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._run()

    @torch.no_grad()
    def hidden(self, tokens: torch.Tensor, cache) -> torch.Tensor:
        """As ``model.hidden(tokens, cache=cache)`` for ``tokens`` ``[B, 1]`` at an image
        position; returns ``[B, 1, dim]`` (a buffer the next step overwrites)."""
        offset = cache.offset
        if offset < self.text_len:
            raise ValueError("StaticStep decodes image positions only")
        self.tokens.copy_(tokens)
        self.pos.fill_(offset)
        if not self.graph_wanted:
            self._run()
        elif self.graph is None:
            self._capture()
            self.graph.replay()
        else:
            self.graph.replay()
        cache.offset += 1
        return self.out_hidden

    def image_logits(self, h: torch.Tensor) -> torch.Tensor:
        """``model.image_logits(h)``; for the step's own output, the logits it computed."""
        if h is self.out_hidden:
            return self.out_logits
        return self.model.image_logits(h)
