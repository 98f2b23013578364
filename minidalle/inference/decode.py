"""A lean decoding step for cached sampling: the transformer as plain tensor functions.

A cached step feeds one position per sequence, so every weight matrix is read once for a
matrix-vector product: the step is bound by memory bandwidth plus per-op overhead.
:class:`LeanDecoder` does the arithmetic of ``DALLE.hidden(tokens, cache=...)`` with

- weights packed once for the :mod:`minidalle.inference.gemv` kernel (fp32, bf16, or bf16 copies of
  fp32 weights multiplied in fp32 for the ``bf16-weights`` precision; 1-8 rows) or, where it
  does not apply, prepacked for oneDNN on CPU (its bf16 matrix-vector product runs ~1.7x
  faster than ``F.linear``'s; all accumulate in fp32), else ``F.linear``,
- LayerScale folded into the output projections and the residual add fused into them,
- the kernel's packed matrices end to end in step order in one buffer on 2 MB pages
  (:func:`minidalle.inference.gemv.one_buffer`),
- no ``nn.Module`` calls; where the kernel is built, the attention of boolean-mask patterns
  in one kernel call (:func:`minidalle.inference.gemv.attention_step`) and, where every
  product of every block is the kernel's and there is no sandwich norm, the whole stack of
  blocks in one call a step (:func:`minidalle.inference.gemv.new_stack`, split into one
  share a thread of torch's thread count when the weights are prepared: the output
  projections then keep one packed matrix of input columns a share; a bf16 model's
  key/value cache turns bf16, which holds its bf16 keys and values exactly), and with
  the image head, whole stretches of the sampling loop (:meth:`LeanDecoder.generate`).

It shares the model's :class:`~minidalle.model.dalle.KVCache`, so the prompt goes through
the module forward and the one-position steps through this class. Only standard blocks
qualify: ``Block`` with ``FeedForward`` and a :class:`QKVAttention` whose ``forward`` is
not overridden (every pattern attention; its ``attend`` is called as is).
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from minidalle import hardware
from minidalle.inference import gemv
from minidalle.model.attention_api import PatternAttention, QKVAttention, update_kv_cache
from minidalle.model.transformer import Block, FeedForward, geglu


def _use_onednn(weight: torch.Tensor) -> bool:
    """Prepacked oneDNN products for this weight: each op they need runs here (the probe
    tried them; on a CPU without AVX-512, oneDNN's bf16 reorder and product fail)."""
    return (weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16)
            and all(hardware.onednn_works(op, weight.dtype) for op in ("linear", "reorder", "linear_add")))


PRECISIONS = ("auto", "fp32", "bf16", "bf16-weights")
_STEP_DTYPES = (torch.float32, torch.bfloat16)  # what the kernel's attention step takes


def generation_precision(requested: str, log=None) -> str:
    """The precision sampling runs in: ``requested`` (one of :data:`PRECISIONS`) with
    ``"auto"`` made concrete, the choice and its reason printed once (stderr or ``log``).

    ``fp32``: the model in fp32. ``bf16``: the model in bf16 (the native bf16 kernel on an
    AVX512-BF16 CPU; elsewhere the cached steps read the bf16 weights with fp32 arithmetic).
    ``bf16-weights``: the model in fp32 (prompt, uncached steps, every other op), but the
    cached steps' matrices stored in bf16 (half the bytes per token; results differ from fp32
    only by the weight rounding). ``auto``: bf16 where the CPU has native bf16 and it is
    measured faster (:func:`minidalle.hardware.bf16_verdict`), else bf16-weights where the
    :mod:`minidalle.inference.gemv` kernel serves it, else fp32."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {requested!r}")
    if requested == "bf16-weights" and gemv.pack(torch.zeros(16, 16), store="bf16") is None:
        hardware.say_once("warning: precision bf16-weights without the gemv kernel "
                          f"({gemv.status()}): fp32 speed, bf16-rounded weights", log)
    if requested != "auto":
        return requested
    fast, reason = hardware.bf16_verdict()
    if fast:
        choice = "bf16"
    elif gemv.pack(torch.zeros(16, 16), store="bf16") is not None:
        choice = "bf16-weights"
        reason += f"; the {gemv.variant()} kernel reads bf16-stored weights in fp32 arithmetic"
    else:
        choice = "fp32"
        reason += f"; the bf16-storage kernel is {gemv.status()}"
    hardware.say_once(f"generate: precision auto -> {choice}: {reason}", log)
    return choice


class _Linear:
    """``x @ weight.T + bias (+ residual)`` with at most ``gemv.MAX_ROWS`` rows (x in the
    weight's dtype) through the :mod:`minidalle.inference.gemv` kernel where it builds, otherwise the
    weight prepacked for oneDNN on CPU (beside the kernel: made from its packed copy at the
    first call that needs it), else ``F.linear``.

    ``store="bf16"`` with an fp32 weight: the weight is rounded to bf16 once and multiplied
    in fp32 (the kernel reads the bf16 copy; the other paths its fp32 widening), so every
    path gives fp32 results that differ from fp32 weights' only by that rounding."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, store: str | None = None):
        self.bias = bias
        self.dtype, self.shape = weight.dtype, tuple(weight.shape)  # dtype: of x, bias, residual, y
        self.rounded = store == "bf16" and weight.dtype == torch.float32
        self.packed = gemv.pack(weight, bias, store)
        self.gemv = None if self.packed is None else gemv.function()  # ~1 us a call
        self.onednn = _use_onednn(weight)
        self.weight = None if self.packed is not None else self._prepare(weight)
        self.parts = None  # the packed weight split by input columns for the kernel's stack
        self.row_order, self.stack_bias = None, bias  # its rows as the stack lays them out

    def split(self, bounds: list) -> None:
        """Keep the packed weight as one matrix of input columns ``[a, b)`` a share of the
        kernel's stack (:func:`minidalle.inference.gemv.split_columns`), which then runs it;
        a call here multiplies by the weight unpacked from them."""
        self.parts = gemv.split_columns(self.packed, bounds)
        self.packed, self.gemv = None, None

    def reorder_rows(self, order: torch.Tensor) -> None:
        """Pack the weight's rows (and bias) in ``order`` for the kernel's stack, which then
        runs it (``stack_bias``); a call here multiplies by the weight in its own order."""
        self.packed = gemv.pack_like(gemv.unpack(self.packed)[order], self.packed)
        self.stack_bias = None if self.bias is None else self.bias[order].contiguous()
        self.row_order, self.gemv = order, None

    def _unpacked(self) -> torch.Tensor:
        if self.parts is not None:
            return torch.cat([gemv.unpack(p) for p in self.parts], dim=1)
        w = gemv.unpack(self.packed)
        return w if self.row_order is None else w[torch.argsort(self.row_order)]

    def stored(self) -> list[torch.Tensor]:
        """The kernel's packed matrices of this product (none where it does not serve it)."""
        return self.parts if self.parts is not None else [] if self.packed is None else [self.packed]

    def _prepare(self, weight):
        weight = weight.to(torch.bfloat16).to(self.dtype) if self.rounded else weight.to(self.dtype)
        return torch.ops.mkldnn._reorder_linear_weight(weight, 1) if self.onednn else weight

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if (self.gemv is not None and x.dtype == self.dtype
                and x.numel() <= gemv.MAX_ROWS * x.shape[-1]):
            return self.gemv(x, self.packed, self.bias, residual)
        if self.weight is None:
            self.weight = self._prepare(self._unpacked())
        if not self.onednn:
            y = F.linear(x, self.weight, self.bias)
            return y if residual is None else y + residual
        if residual is None:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, self.weight, self.bias, "add")

    @property
    def bytes_read(self) -> int:
        """Bytes of weight one product reads (the stored dtype's where the kernel serves)."""
        stored = self.stored()
        size = stored[0].element_size() if stored else self.dtype.itemsize
        return self.shape[0] * self.shape[1] * size


def _norm(m: nn.Module):
    """A LayerNorm as ``(weight, bias, eps)``; None for Identity."""
    return None if isinstance(m, nn.Identity) else (m.weight, m.bias, m.eps)


def _layer_norm(x, norm):
    return F.layer_norm(x, x.shape[-1:], norm[0], norm[1], norm[2])


def _scaled_linear(linear: nn.Linear, scale: torch.Tensor | None, store: str | None) -> _Linear:
    """``linear`` with a per-output ``scale`` folded in: ``s * (W a + b) = (s W) a + s b``."""
    w, b = linear.weight, linear.bias
    if scale is not None:
        s = scale.float()[:, None]
        w = (w.float() * s).to(w.dtype)
        b = None if b is None else (b.float() * s[:, 0]).to(b.dtype)
    return _Linear(w, b, store)


class _LayerWeights:
    """One block's weights, ready for decoding steps (no reference to the modules)."""

    def __init__(self, block: Block, store: str | None):
        attn, ff = block.attn, block.ff
        self.heads, self.dim_head, self.max_len = attn.spec.heads, attn.spec.dim_head, attn.spec.max_len
        self.norm_attn, self.norm_ff = _norm(block.norm_attn), _norm(block.norm_ff)
        self.post_attn, self.post_ff = _norm(block.post_attn_norm), _norm(block.post_ff_norm)
        self.scale_attn, self.scale_ff = block.scale_attn, block.scale_ff
        self.qkv = _Linear(attn.to_qkv.weight, attn.to_qkv.bias, store)
        # A sandwich norm sits between the projection and the scale: no folding then.
        self.out = _scaled_linear(attn.to_out, None if self.post_attn else block.scale_attn, store)
        self.ff_in = _Linear(ff.proj_in.weight, ff.proj_in.bias, store)
        self.ff_out = _scaled_linear(ff.proj_out, None if self.post_ff else block.scale_ff, store)
        self.linears = (self.qkv, self.out, self.ff_in, self.ff_out)
        self.attend_step = gemv.attention_step()

    def stackable(self) -> bool:
        """Whether the kernel's stack step can run this block: every product is the kernel's,
        no q/k/v bias, LayerScale folded (no sandwich norm), both norms with weight and bias."""
        norms = (self.norm_attn, self.norm_ff)
        return (all(lin.packed is not None for lin in self.linears) and self.qkv.bias is None
                and self.post_attn is None and self.post_ff is None
                and all(n is not None and n[0] is not None and n[1] is not None for n in norms))

    def add_to(self, stack, slices: list) -> None:
        stack.add(*self.norm_attn, self.qkv.packed, self.out.parts, self.out.bias, *self.norm_ff,
                  self.ff_in.packed, self.ff_in.stack_bias, self.ff_out.parts, self.ff_out.bias, slices)

    def step(self, x: torch.Tensor, attend, offset: int, cache: dict,
             step_slices: list | None = None) -> torch.Tensor:
        """``x`` ``[B, dim]`` at position ``offset`` -> the block's output. ``step_slices``:
        the flat key slices of this position for the kernel's fused attention step (None:
        ``attend``)."""
        b, h, d = x.shape[0], self.heads, self.dim_head
        keys = cache.get("k")
        fused = (step_slices is not None and keys is not None and keys.dtype == torch.float32
                 and keys.shape[0] == b and offset < keys.shape[2])
        qkv = self.qkv(_layer_norm(x, self.norm_attn))
        if fused and self.attend_step is not None and qkv.dtype in _STEP_DTYPES:
            a = self.attend_step(qkv, keys, cache["v"], offset, step_slices)
        else:
            if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16):
                qkv = qkv.float()  # as QKVAttention.forward: fp32 attention and cache on CPU
            q, k, v = qkv.view(b, 3, h, 1, d).unbind(1)
            k, v = update_kv_cache(cache, k, v, offset, self.max_len)
            a = attend(q, k, v, offset).view(b, h * d).to(x.dtype)
        return self._feed_forward(self._add(x, self.out, a, self.post_attn, self.scale_attn))

    def prompt(self, x: torch.Tensor, attend, offset: int, cache: dict, cache_dtype: torch.dtype) -> torch.Tensor:
        """``x`` ``[B, n, dim]`` at positions ``offset..`` (a prompt) -> the block's output,
        as the module's forward with the cache; the keys and values kept in ``cache_dtype``."""
        b, n, _ = x.shape
        qkv = self.qkv(_layer_norm(x, self.norm_attn)).view(b, n, 3, self.heads, self.dim_head)
        q, k, v = (t.transpose(1, 2).to(cache_dtype) for t in qkv.unbind(2))
        k, v = update_kv_cache(cache, k, v, offset, self.max_len)
        a = attend(q, k, v, offset).to(x.dtype).transpose(1, 2).reshape(b, n, -1)
        return self._feed_forward(self._add(x, self.out, a, self.post_attn, self.scale_attn))

    def _feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """x + the block's feed-forward half (GEGLU) of x."""
        return self._add(x, self.ff_out, geglu(self.ff_in(_layer_norm(x, self.norm_ff))),
                         self.post_ff, self.scale_ff)

    @staticmethod
    def _add(x, linear, a, norm, scale):
        if norm is None:  # scale folded into the weights
            return linear(a, residual=x)
        return torch.addcmul(x, _layer_norm(linear(a), norm), scale)


def _key_slices(attn) -> list | None:
    """Per position, the flat (start, stop, step) key slices of ``attn``'s pattern, where the
    kernel's attention step can take them (None: the layer's own ``attend``)."""
    if (gemv.attention_step() is not None and isinstance(attn, PatternAttention)
            and attn.steps_attend_key_slices()):
        return attn.step_slices
    return None


class _Weights:
    def __init__(self, model, store: str | None):
        self.layers = [_LayerWeights(block, store) for block in model.transformer.layers]
        self.threads = torch.get_num_threads()
        n = model.num_text_tokens
        self.norm_out = _norm(model.norm_out)
        b = model.to_logits.bias
        self.image_head = _Linear(model.to_logits.weight[n:].contiguous(),
                                  None if b is None else b[n:].contiguous(), store)
        # The kernel's whole-stack step, where it runs every block and every layer's attention
        # steps by key slices (see LeanDecoder): out and ff_out then split by the input columns
        # of each thread's share
        self.stack = None
        slices = [_key_slices(block.attn) for block in model.transformer.layers]
        if (model.text_emb.weight.device.type == "cpu" and all(s is not None for s in slices)
                and all(layer.stackable() for layer in self.layers)):
            self.stack = gemv.new_stack(self.layers[0].heads, self.layers[0].dim_head)
        if self.stack is not None:
            d, n = self.layers[0].dim_head, self.layers[0].heads * self.layers[0].dim_head
            f = self.layers[0].ff_out.shape[1]
            heads, columns = self.stack.shares(f)
            # each share's rows of q/k/v (q, k, v of its heads) and of ff_in (values, gates)
            # in one stretch
            qkv_order = torch.cat([torch.arange(s * n + h0 * d, s * n + h1 * d)
                                   for h0, h1 in heads for s in range(3)])
            ff_order = torch.cat([torch.arange(s * f + j0, s * f + j1) for j0, j1 in columns for s in range(2)])
            for layer in self.layers:
                layer.qkv.reorder_rows(qkv_order)
                layer.ff_in.reorder_rows(ff_order)
                layer.out.split([(h0 * d, h1 * d) for h0, h1 in heads])
                layer.ff_out.split(columns)
        # The kernel's packed matrices end to end in step order, on huge pages where granted
        kernel_linears = [lin for lin in self.linears() if lin.stored()]
        moved = iter(gemv.one_buffer([p for lin in kernel_linears for p in lin.stored()]))
        for lin in kernel_linears:
            if lin.parts is not None:
                lin.parts = [next(moved) for _ in lin.parts]
            else:
                lin.packed = next(moved)
        if self.stack is not None:
            for layer, layer_slices in zip(self.layers, slices):
                layer.add_to(self.stack, layer_slices)
        # ... and its image head (final norm and logits), for logits and whole generation loops
        self.stack_head = (self.stack is not None and self.image_head.packed is not None
                           and self.norm_out is not None and None not in self.norm_out[:2])
        if self.stack_head:
            self.stack.set_head(*self.norm_out[:2], self.norm_out[2], self.image_head.packed,
                                self.image_head.bias)
        self.image_tables = None  # (embedding of every image id, of every image position)

    def linears(self) -> list[_Linear]:
        """Every product of a step, in the order the step runs them."""
        return [lin for layer in self.layers for lin in layer.linears] + [self.image_head]

    def bytes_read(self) -> int:
        """Weight bytes one decoding step reads (every matrix once)."""
        return sum(lin.bytes_read for lin in self.linears())


# (model, store) -> (its parameter tensors then, their versions then, weights). Holding the tensors
# keeps their memory, so an unchanged data_ptr and version mean unchanged values; an
# optimizer step bumps the version, ``.to(dtype)`` and ``load_state_dict`` change one of them.
_built: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _weights(model, store: str | None) -> _Weights:
    params = [p.detach() for p in model.parameters()]
    versions = [p._version for p in params]
    hit = _built.get(model, {}).get(store)
    if hit is not None and hit[1] == versions and len(hit[0]) == len(params) and all(
            a.data_ptr() == b.data_ptr() and a.dtype == b.dtype for a, b in zip(hit[0], params)
    ) and hit[2].threads == torch.get_num_threads():  # a stack's shares are per thread
        return hit[2]
    _built.pop(model, None)  # free the old weights (of every store) first
    with torch.no_grad():
        weights = _Weights(model, store)
    _built[model] = {store: (params, versions, weights)}
    return weights


def _stack_cache(cache, dtype: torch.dtype) -> tuple[list, list]:
    """The per-layer key and value caches for the kernel's stack; a bf16 model's turn bf16
    first (its keys and values are bf16 products: a bf16 cache holds them exactly in half
    the bytes; a step reads ~15 MB of cache at L16 in fp32)."""
    if dtype == torch.bfloat16 and cache.layers[0]["k"].dtype == torch.float32:
        for c in cache.layers:
            c["k"], c["v"] = c["k"].bfloat16(), c["v"].bfloat16()
    return [c["k"] for c in cache.layers], [c["v"] for c in cache.layers]


class LeanDecoder:
    """One-position decoding steps of ``model`` with its current weights.

    The prepared weights are kept per model and rebuilt when a parameter changes (an
    optimizer step, ``load_state_dict``, ``.to(dtype)``). ``weight_store="bf16"`` on an fp32
    model (the ``bf16-weights`` precision): the matrices are kept as bf16 copies and multiplied
    in fp32 (everything else stays fp32); see :class:`_Linear`.
    """

    def __init__(self, model, weight_store: str | None = None):
        if not self.supports(model):
            raise ValueError("LeanDecoder: the model has non-standard blocks")
        self.model = model
        self.attends = [block.attn.attend for block in model.transformer.layers]
        # per layer, the key slices of each position for the kernel's fused attention step
        # (None: the layer's own attend); the step writes into the fp32 caches of CPU sampling
        on_cpu = model.text_emb.weight.device.type == "cpu"
        self.step_slices = [_key_slices(block.attn) if on_cpu else None for block in model.transformer.layers]
        if weight_store not in (None, "fp32", "bf16"):
            raise ValueError(f"LeanDecoder: weight_store must be 'fp32' or 'bf16', not {weight_store!r}")
        self.weights = _weights(model, weight_store)

    @staticmethod
    def supports(model) -> bool:
        return all(
            type(block) is Block and type(block.ff) is FeedForward
            and isinstance(block.attn, QKVAttention) and type(block.attn).forward is QKVAttention.forward
            for block in model.transformer.layers
        )

    def _stack_takes(self, rows: int) -> bool:
        """Whether the kernel's stack runs steps of ``rows`` rows (every layer's attention by
        key slices, at most ``gemv.MAX_ROWS`` rows)."""
        return (self.weights.stack is not None and rows <= gemv.MAX_ROWS
                and all(s is not None for s in self.step_slices))

    @torch.no_grad()
    def hidden(self, tokens: torch.Tensor, cache) -> torch.Tensor:
        """As ``model.hidden(tokens, cache=cache)`` for ``tokens`` ``[B, 1]``: ``[B, 1, dim]``."""
        offset = cache.offset
        x = self.model.embed(tokens, offset)[:, 0]
        keys = cache.layers[0].get("k")
        if (self._stack_takes(x.shape[0]) and keys is not None
                and keys.dtype in (torch.float32, torch.bfloat16)
                and keys.shape[0] == x.shape[0] and offset < keys.shape[2]):
            ks, vs = _stack_cache(cache, x.dtype)
            x = self.weights.stack.step(x.contiguous(), ks, vs, offset)
            cache.offset += 1
            return x[:, None]
        for layer, attend, layer_cache, slices in zip(self.weights.layers, self.attends, cache.layers,
                                                      self.step_slices):
            x = layer.step(x, attend, offset, layer_cache, None if slices is None else slices[offset])
        cache.offset += 1
        return x[:, None]

    def prompts(self) -> bool:
        """Whether :meth:`prompt` serves this model: bf16 products prepacked for oneDNN on
        CPU (the module's own bf16 products reorder their weights at every call: an L16 prompt
        of 81 positions took 64-74 ms that way, 48-53 ms prepacked). An fp32 model's products
        are as fast in the module (and bf16-stored weights are for the cached steps only)."""
        first = self.weights.layers[0].qkv
        return (self.model.text_emb.weight.device.type == "cpu" and first.dtype == torch.bfloat16
                and all(lin.onednn for layer in self.weights.layers for lin in layer.linears))

    @torch.no_grad()
    def prompt(self, tokens: torch.Tensor, cache) -> torch.Tensor:
        """As ``model.hidden(tokens, cache=cache)`` for the ids of a prompt ``[B, n]``, through
        the prepared products (where :meth:`prompts`). Where the kernel's stack will take the
        steps, the keys and values go into the cache in its dtype (what it would otherwise
        convert the whole cache to: 7 ms at L16); elsewhere in fp32, as the module keeps them."""
        offset = cache.offset
        x = self.model.embed(tokens, offset)
        cache_dtype = torch.bfloat16 if self._stack_takes(tokens.shape[0]) else torch.float32
        for layer, attend, layer_cache in zip(self.weights.layers, self.attends, cache.layers):
            x = layer.prompt(x, attend, offset, layer_cache, cache_dtype)
        cache.offset += tokens.shape[1]
        return x

    @torch.no_grad()
    def image_logits(self, h: torch.Tensor) -> torch.Tensor:
        """As ``model.image_logits(h)``."""
        w = self.weights
        if w.stack_head and h.dim() == 3 and h.shape[1] == 1 and h.shape[0] <= gemv.MAX_ROWS:
            # the kernel's head: the same logits as generate()'s loop
            return w.stack.logits(h[:, 0].contiguous()).to(h.dtype)[:, None]
        return w.image_head(_layer_norm(h, w.norm_out))

    @torch.no_grad()
    def generate(self, h: torch.Tensor, cache, count: int, *, k: int, temperature: float,
                 generator: torch.Generator | None = None, progress=None, chunk: int = 32,
                 cond_scale: float = 1.0, top_p: float = 1.0):
        """The next ``count`` image codes ``[B, count]`` sampled from hidden states ``h``
        ``[B, 1, dim]`` (the last fed position), each fed back but the last, by the kernel's
        stack (``Stack.generate``: logits, a top-``k`` (then ``top_p`` < 1: nucleus) draw as
        :func:`minidalle.inference.sampling.sample_logits` makes it from the same uniform
        numbers of ``generator``, the embedding, the step) ``chunk`` positions a call; None
        where that loop does not apply (then the caller's Python loop runs).
        ``progress(1)`` is called for each code. ``cond_scale`` != 1: ``h``'s second half are
        the null captions' rows; one code per pair is drawn from the guided logits
        (``[B/2, count]``), as :func:`~minidalle.inference.sampling.generate_image_codes`'
        loop draws it."""
        w, b = self.weights, h.shape[0]
        keys = cache.layers[0].get("k")
        if (not w.stack_head or not self._stack_takes(b) or gemv.sampler() is None or keys is None
                or keys.shape[0] != b or keys.dtype not in (torch.float32, torch.bfloat16)
                or h.dtype != w.layers[0].qkv.dtype or cache.offset + count - 1 > keys.shape[2]):
            return None
        guided = cond_scale != 1.0
        if guided and b % 2:
            return None
        rows = b // 2 if guided else b  # the rows drawn
        ks, vs = _stack_cache(cache, h.dtype)
        if w.image_tables is None:
            m = self.model
            w.image_tables = (m.image_emb(torch.arange(m.num_image_tokens)).to(h.dtype).contiguous(),
                              m.image_pos_emb(0, m.image_seq_len).to(h.dtype).contiguous())
        emb, pos = w.image_tables
        first = cache.offset - self.model.text_len  # the image position of the first code
        state, out, done = h[:, -1].contiguous(), [], 0
        while done < count:
            n = min(chunk, count - done)
            u = torch.rand(n, rows, generator=generator)  # the uniforms sample_logits would draw
            feed_last = done + n < count
            ids, state = w.stack.generate(state, ks, vs, cache.offset, emb,
                                          pos[first + done : first + done + n], k, float(temperature),
                                          u, feed_last, float(cond_scale), float(top_p))
            cache.offset += n if feed_last else n - 1
            out.append(ids)
            done += n
            for _ in range(n if progress is not None else 0):
                progress(1)
        return torch.cat(out, dim=1)
