"""The DALL-E network of the mini DALL-E recipe.

Sequence layout (input positions): ``<bos>`` (id 0), ``text_seq_len`` text ids (padding
position p replaced by its own id ``text_vocab + p``), then the image codes. Training
drops the last input token, so the model sees at most ``text_seq_len + image_len``
positions. Token ids along the sequence ("sequence ids") are text-table ids for the first
``text_len = text_seq_len + 1`` positions and image codes (``0..num_image_tokens-1``)
after.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from minidalle.model.linear import Linear, linear
from minidalle.model.transformer import Transformer


class AxialPositionalEmbedding(nn.Module):
    """Image position embedding: a row vector plus a column vector per grid cell."""

    def __init__(self, dim: int, fmap_size: int):
        super().__init__()
        self.row = nn.Parameter(torch.randn(fmap_size, dim))
        self.col = nn.Parameter(torch.randn(fmap_size, dim))

    def forward(self, start: int = 0, count: int | None = None) -> torch.Tensor:
        """``[count, dim]`` for image positions ``start..start+count-1`` (raster order)."""
        f = self.row.shape[0]
        count = f * f - start if count is None else count
        if count == 1:  # a decoding step
            r, c = divmod(start, f)
            return (self.row[r] + self.col[c])[None]
        return (self.row[:, None, :] + self.col[None, :, :]).flatten(0, 1)[start : start + count]


def split_ids(ids: torch.Tensor, factors: tuple[int, ...]) -> list[torch.Tensor]:
    """Mixed-radix digits of ``ids``: ``id = ((d0 * k1) + d1) * k2 + d2 ...`` for factors k."""
    digits = []
    for k in reversed(factors[1:]):
        digits.append(ids.remainder(k))
        ids = ids.div(k, rounding_mode="floor")
    return [ids] + digits[::-1]


def join_ids(digits: list[torch.Tensor], factors: tuple[int, ...]) -> torch.Tensor:
    """The inverse of :func:`split_ids`."""
    ids = digits[0]
    for d, k in zip(digits[1:], factors[1:]):
        ids = ids * k + d
    return ids


def joint_rows(tables: list[torch.Tensor]) -> torch.Tensor:
    """Rows ``A[a] + B[b] + ...`` for every id of :func:`split_ids`, in id order."""
    rows = tables[0]
    for t in tables[1:]:
        rows = (rows.unsqueeze(1) + t.unsqueeze(0)).flatten(0, 1)
    return rows


class FactorisedEmbedding(nn.Module):
    """Embedding of factorised image codes (a codec with several codebooks, e.g. colour x
    outline): the vector of code ``(a, b)`` is ``A[a] + B[b]``, so a pair never seen in
    training still gets a meaningful input vector. ``weight`` is the full table."""

    def __init__(self, factors: tuple[int, ...], dim: int):
        super().__init__()
        self.factors = tuple(int(k) for k in factors)
        self.parts = nn.ModuleList(nn.Embedding(k, dim) for k in self.factors)

    @property
    def weight(self) -> torch.Tensor:
        return joint_rows([e.weight for e in self.parts])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return sum(e(d) for e, d in zip(self.parts, split_ids(ids, self.factors)))


class FactorisedLogits(nn.Module):
    """Output projection whose image-code logits factorise: ``logit(a, b) = la[a] + lb[b]``.

    Under a softmax that is ``p(a, b) = p(a) p(b)``: each factor (colour, outline) is
    predicted on its own, so the model can draw a colour with an outline it never drew it
    with. ``weight``/``bias`` are the full ``[text rows + joint image rows]`` matrix, so every
    consumer of an ``nn.Linear`` ``to_logits`` (per-modality logits, the lean decode step)
    works unchanged.
    """

    def __init__(self, dim: int, num_text_tokens: int, factors: tuple[int, ...]):
        super().__init__()
        self.text = nn.Linear(dim, num_text_tokens)
        self.parts = nn.ModuleList(nn.Linear(dim, int(k)) for k in factors)
        self.onednn = True  # see minidalle.model.linear

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat([self.text.weight, joint_rows([p.weight for p in self.parts])])

    @property
    def bias(self) -> torch.Tensor:
        return torch.cat([self.text.bias, joint_rows([p.bias for p in self.parts])])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, onednn=self.onednn)


class KVCache:
    """Per-layer attention state for incremental decoding; ``offset`` = positions seen."""

    def __init__(self, depth: int):
        self.offset = 0
        self.layers: list[dict] = [{} for _ in range(depth)]


class DALLE(nn.Module):
    def __init__(self, *, dim: int, transformer: Transformer, text_vocab: int, text_seq_len: int,
                 num_image_tokens: int, fmap_size: int, loss_img_weight: float = 7.0,
                 byteio: bool = False, codec: nn.Module | None = None,
                 image_token_factors: tuple[int, ...] | None = None,
                 image_factor_weights: list[float] | None = None):
        super().__init__()
        self.dim = dim
        self.text_vocab = text_vocab
        self.text_seq_len = text_seq_len
        self.num_text_tokens = text_vocab + text_seq_len  # text table rows (unique pads)
        self.num_image_tokens = num_image_tokens
        self.total_tokens = self.num_text_tokens + num_image_tokens
        self.fmap_size = fmap_size
        self.image_seq_len = fmap_size**2
        self.text_len = text_seq_len + 1  # with <bos>
        self.max_positions = self.text_len + self.image_seq_len - 1
        self.loss_img_weight = loss_img_weight
        self.byteio = byteio

        self.text_emb = nn.Embedding(self.num_text_tokens, dim)
        self.text_pos_emb = nn.Embedding(self.text_len, dim)
        # Factorised image codes (a codec with several codebooks): embeddings and logits
        # are sums over the factors; see FactorisedLogits.
        self.image_token_factors = tuple(image_token_factors) if image_token_factors else None
        self.image_factor_weights = list(image_factor_weights) if image_factor_weights else None
        if self.image_token_factors:
            if math.prod(self.image_token_factors) != num_image_tokens:
                raise ValueError(f"image_token_factors {self.image_token_factors} do not multiply "
                                 f"to num_image_tokens {num_image_tokens}")
            self.image_emb = FactorisedEmbedding(self.image_token_factors, dim)
        else:
            self.image_emb = nn.Embedding(num_image_tokens, dim)
        self.image_pos_emb = AxialPositionalEmbedding(dim, fmap_size)
        self.transformer = transformer
        self.norm_out = nn.LayerNorm(dim)
        self.to_logits = (FactorisedLogits(dim, self.num_text_tokens, self.image_token_factors)
                          if self.image_token_factors else Linear(dim, self.total_tokens))

        # Text positions (< text_seq_len) predict text ids, later ones image ids.
        seq = torch.arange(self.max_positions)[:, None]
        vocab = torch.arange(self.total_tokens)[None, :]
        is_text_pos = seq < text_seq_len
        is_text_id = vocab < self.num_text_tokens
        self.register_buffer("logits_mask", is_text_pos != is_text_id, persistent=False)
        self.set_codec(codec)

    # ------------------------------------------------------------------ codec

    @property
    def codec(self):
        return self._codec[0]

    def set_codec(self, codec: nn.Module | None) -> None:
        """Attach a frozen image codec. It is not a submodule (not in ``state_dict`` or
        ``parameters()``), but device moves of the model move it too."""
        if codec is not None:
            codec.eval()
            for p in codec.parameters():
                p.requires_grad_(False)
        self._codec = (codec,)

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        codec = self.codec
        if codec is not None:
            # Follow device moves only: the codec keeps its own dtype (fp32).
            probe = fn(torch.zeros(1))
            codec.to(probe.device)
        return out

    @property
    def supports_cache(self) -> bool:
        return all(getattr(layer.attn, "supports_cache", False) for layer in self.transformer.layers)

    # ------------------------------------------------------------------ sequence

    def prepare_text(self, text: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` tokenizer ids (0 = padding, T <= text_seq_len) -> ``[B, 1+T]``
        sequence ids: unique padding ids and ``<bos>``."""
        t = text.shape[1]
        if t > self.text_seq_len:
            raise ValueError(f"text has {t} tokens; the model takes at most {self.text_seq_len}")
        pad_ids = torch.arange(t, device=text.device) + self.text_vocab
        text = torch.where(text == 0, pad_ids, text)
        return F.pad(text, (1, 0), value=0)

    def image_codes(self, image: torch.Tensor) -> torch.Tensor:
        """Codes ``[B, image_len]`` from codes, float images in [0, 1] or uint8 images."""
        if not image.is_floating_point() and image.dim() == 2:
            return image.long()
        if self.codec is None:
            raise ValueError("the model got images but has no codec; pass image codes or set_codec()")
        if image.dtype == torch.uint8:
            image = image.float() / 255.0  # byteio: uint8 on the wire, scaled here
        with torch.no_grad():
            return self.codec.encode(image.float()).long()

    def embed(self, tokens: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """Embed sequence ids ``[B, n]`` sitting at positions ``offset..offset+n-1``."""
        n = tokens.shape[1]
        if offset + n > self.max_positions:
            raise ValueError(f"sequence of {offset + n} positions; the model takes {self.max_positions}")
        split = max(0, min(n, self.text_len - offset))  # how many of them are text
        parts = []
        if split:
            pos = torch.arange(offset, offset + split, device=tokens.device)
            parts.append(self.text_emb(tokens[:, :split]) + self.text_pos_emb(pos))
        if split < n:
            start = offset + split - self.text_len
            pos = self.image_pos_emb(start, n - split)
            parts.append(self.image_emb(tokens[:, split:]) + pos)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def hidden(self, tokens: torch.Tensor, *, cache: KVCache | None = None) -> torch.Tensor:
        """Transformer output (before the final norm) for sequence ids ``tokens``; with a
        cache they continue the cached positions and the cache advances."""
        offset = cache.offset if cache is not None else 0
        x = self.embed(tokens, offset)
        x = self.transformer(x, offset=offset, caches=None if cache is None else cache.layers)
        if cache is not None:
            cache.offset += tokens.shape[1]
        return x

    def new_cache(self) -> KVCache:
        if not self.supports_cache:
            warnings.warn("an attention layer does not support the key/value cache")
        return KVCache(len(self.transformer.layers))

    def logits(self, h: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """Masked logits over all ``total_tokens`` for hidden states at ``offset..``."""
        logits = self.to_logits(self.norm_out(h))
        mask = self.logits_mask[offset : offset + h.shape[1]]
        return logits.masked_fill(mask, torch.finfo(logits.dtype).min)

    def image_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Logits over the image codes only (what sampling an image needs)."""
        return self.image_logits_raw(self.norm_out(h))

    def text_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Logits over the text table (ids >= text_vocab are padding)."""
        return self.text_logits_raw(self.norm_out(h))

    def image_logits_raw(self, hn: torch.Tensor) -> torch.Tensor:
        """:meth:`image_logits` of already normalised hidden states."""
        return self._project(hn, *self._logits_weights()[1])

    def text_logits_raw(self, hn: torch.Tensor) -> torch.Tensor:
        """:meth:`text_logits` of already normalised hidden states."""
        return self._project(hn, *self._logits_weights()[0])

    def _logits_weights(self):
        """``((text weight, bias), (image weight, bias))`` of ``to_logits``: split, not
        sliced, because each slice's backward zero-fills a full-size gradient."""
        rows = [self.num_text_tokens, self.num_image_tokens]
        return tuple(zip(self.to_logits.weight.split(rows), self.to_logits.bias.split(rows)))

    def _project(self, hn: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return linear(hn, weight, bias, onednn=getattr(self.to_logits, "onednn", False))

    # ------------------------------------------------------------------ forward

    def forward(self, text: torch.Tensor, image: torch.Tensor | None = None, return_loss: bool = False):
        """``text`` ``[B, text_seq_len]`` ids (0 = padding); ``image`` codes ``[B, image_len]``
        or images (float in [0, 1], or uint8). Returns the loss, or the masked logits."""
        seq = self.prepare_text(text)
        codes = None
        if image is not None:
            codes = self.image_codes(image)
            seq = torch.cat([seq, codes], dim=1)
        if return_loss:
            if codes is None:
                raise ValueError("return_loss needs an image")
            if text.shape[1] != self.text_seq_len:
                raise ValueError(f"text must have {self.text_seq_len} tokens, got {text.shape[1]}")
        if seq.shape[1] > self.max_positions:
            seq = seq[:, : self.max_positions]  # the last image token is never an input
        h = self.hidden(seq)
        if not return_loss:
            return self.logits(h)
        return self.loss(h, seq, codes)

    def factor_loss(self, logits_img: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """``sum_f w_f * CE_f``: each factor's cross entropy from its marginal (a logsumexp of
        the joint log-probabilities over the other factors), weighted by
        ``image_factor_weights``. With factorised logits ``p(a, b) = p(a) p(b)``, so weights of
        1 give the joint cross entropy."""
        k = self.image_token_factors
        logp = logits_img.float().log_softmax(-1).view(*logits_img.shape[:-1], *k)
        loss = 0.0
        for f, (w, digit) in enumerate(zip(self.image_factor_weights, split_ids(codes, k))):
            others = [d - len(k) for d in range(len(k)) if d != f]
            marginal = logp.logsumexp(others) if others else logp
            loss = loss + w * F.nll_loss(marginal.flatten(0, -2), digit.flatten())
        return loss

    def loss(self, h: torch.Tensor, seq: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """The weighted text/image loss from hidden states ``h`` of the training sequence.

        The same value as cross entropy over the masked full-vocabulary logits (masked
        entries contribute exp(min) = 0 to the softmax), computed without them: text
        positions get logits over the text table only and image positions over the codes
        only, 3.4x fewer logits in the recipe (no [B, 336, 9296] tensor, mask or slices).
        A projection that sets ``full_vocabulary_only`` (the IPU's serialized ``to_logits``)
        keeps the masked full-vocabulary logits.
        """
        t = self.text_seq_len
        if not getattr(self.to_logits, "full_vocabulary_only", False):
            hn_text, hn_img = self.norm_out(h).split([t, h.shape[1] - t], dim=1)
            text, image = self._logits_weights()  # one split for both (one backward write)
            logits_text, logits_img = self._project(hn_text, *text), self._project(hn_img, *image)
            labels_img = codes
        else:
            logits = self.logits(h)
            logits_text, logits_img = logits[:, :t], logits[:, t:]
            labels_img = codes + self.num_text_tokens
        loss_text = F.cross_entropy(logits_text.flatten(0, 1).float(), seq[:, 1 : t + 1].flatten())
        if self.image_factor_weights:  # the image-code columns (last) of either layout
            loss_img = self.factor_loss(logits_img[..., -self.num_image_tokens:], codes)
        else:
            loss_img = F.cross_entropy(logits_img.flatten(0, 1).float(), labels_img.flatten())
        return (loss_text + self.loss_img_weight * loss_img) / (self.loss_img_weight + 1)
