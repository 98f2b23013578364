"""The DALL-E network: ``build_model(cfg, ...)`` -> :class:`DALLE`.

Module structure (other code relies on these names): ``model.text_emb``,
``model.text_pos_emb``, ``model.image_emb`` (``nn.Embedding``), ``model.image_pos_emb``,
``model.transformer.layers[i]`` (a :class:`Block` with ``.attn``, ``.ff``), ``model.norm_out``
(``nn.LayerNorm``) and ``model.to_logits`` (``nn.Linear``).

``attention_api`` is the attention interface components implement; ``linear`` the linear
layers (oneDNN bf16 products where they are faster). Imports nothing of minidalle outside
``model/`` but the root helpers (``errors``; a CPU capability probe at the package root):
the registry that builds the attention is passed in (or is the config's).
"""
from __future__ import annotations

from minidalle.model.attention_api import (
    AttentionModule,
    AttentionPattern,
    AttentionSpec,
    PatternAttention,
    QKVAttention,
    as_attention_module,
)
from minidalle.model.dalle import DALLE, KVCache
from minidalle.model.transformer import Block, FeedForward, Transformer
from minidalle.errors import ConfigError

__all__ = [
    "DALLE", "KVCache", "Block", "FeedForward", "Transformer", "AttentionModule",
    "AttentionPattern", "AttentionSpec", "PatternAttention", "QKVAttention", "build_model",
    "build_attention",
]


def build_attention(name: str, params, spec: AttentionSpec, registry):
    """Build one layer's attention module from ``registry``."""
    obj = registry.get("attention", name).build(params, spec=spec)
    return as_attention_module(obj, spec, name)


def build_model(cfg, *, text_vocab: int | None = None, num_image_tokens: int, fmap_size: int,
                registry=None, codec=None, image_token_factors=None) -> DALLE:
    """The model of ``cfg.model``; attention names cycle over the depth.

    ``text_vocab`` is the tokenizer's vocabulary size (defaults to ``cfg.model.text_vocab``).
    ``codec`` (optional) is attached frozen so the model can take raw images.
    ``image_token_factors``: the codebook sizes of a codec whose codes are tuples (its
    ``token_factors``): the model then predicts each part separately (FactorisedLogits).
    ``registry`` (default: the one ``cfg`` was validated against) builds the attention.
    """
    registry = registry or getattr(cfg, "registry", None)
    if registry is None:
        raise ValueError("build_model: no registry (pass registry=, or a config from load_config)")
    m = cfg.model
    text_vocab = text_vocab if text_vocab is not None else m.text_vocab
    if text_vocab is None:
        raise ValueError("build_model: text_vocab is unknown (no tokenizer and no model.text_vocab)")
    weights = m.image_factor_weights
    if weights is not None:
        factors = tuple(image_token_factors or ())
        if len(weights) != len(factors) or any(not w >= 0 for w in weights):
            raise ConfigError(f"{cfg.source}: model.image_factor_weights: expected one weight >= 0 "
                              f"per codec factor ({len(factors)}: {list(factors)}), got {list(weights)}")
    blocks = []
    for i in range(m.depth):
        name = m.attn_types[i % len(m.attn_types)]
        spec = AttentionSpec(dim=m.dim, heads=m.heads, dim_head=m.dim_head, dropout=m.attn_dropout,
                             text_len=m.text_seq_len + 1, fmap_size=fmap_size, layer_index=i)
        attn = build_attention(name, cfg.attention.get(name), spec, registry)
        blocks.append(Block(m.dim, attn, layer=i + 1, ff_mult=m.ff_mult, ff_dropout=m.ff_dropout,
                            sandwich_norm=m.sandwich_norm))
    return DALLE(dim=m.dim, transformer=Transformer(blocks), text_vocab=text_vocab,
                 text_seq_len=m.text_seq_len, num_image_tokens=num_image_tokens, fmap_size=fmap_size,
                 loss_img_weight=m.loss_img_weight, byteio=m.byteio, codec=codec,
                 image_token_factors=image_token_factors,
                 image_factor_weights=None if weights is None else [float(w) for w in weights])
