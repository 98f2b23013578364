"""The one way from a checkpoint to what drawing images needs: its config, tokenizer,
codec and model (weights loaded, eval mode). ``minidalle generate``, ``minidalle evaluate``
and the quickstart's ``samples`` stage all load through :func:`load_for_inference`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minidalle.errors import CheckpointError, ConfigError


@dataclass
class Loaded:
    cfg: Any  # minidalle.config.Config, as the checkpoint recorded it
    tokenizer: Any
    codec: Any
    model: Any  # minidalle.model.DALLE, eval mode
    checkpoint: Path  # the step directory loaded
    step: int


def load_for_inference(checkpoint, registry=None) -> Loaded:
    """Load a run directory, its ``checkpoints/`` folder or one step directory.

    The weights must fit the model of the checkpoint's config exactly (no missing, no
    unexpected keys); a config without ``[codec]`` cannot draw images."""
    from minidalle.model import build_model
    from minidalle.train.checkpoint import load_checkpoint
    from minidalle.train.pipeline import build_codec, build_tokenizer, token_factors

    ck = load_checkpoint(checkpoint, registry=registry)
    cfg = ck.config
    if cfg.codec is None:
        raise ConfigError(f"{ck.path}: the checkpoint's config has no [codec]: cannot turn image "
                          "codes into pictures")
    tokenizer = build_tokenizer(cfg, registry)
    codec = build_codec(cfg, registry)
    model = build_model(cfg, text_vocab=cfg.model.text_vocab or tokenizer.vocab_size,
                        num_image_tokens=codec.num_tokens, fmap_size=codec.fmap_size,
                        registry=registry, image_token_factors=token_factors(codec))
    missing, unexpected = model.load_state_dict(ck.state_dict, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{ck.path}: weights do not fit the model of its config "
                              f"(missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})")
    return Loaded(cfg, tokenizer, codec, model.eval(), ck.path, ck.step)
