"""Training a ``yttm`` tokenizer on the captions of a config's dataset: the one trainer
behind both ``minidalle tokenizer train`` and the quickstart's ``tokenizer`` stage.

Both read the ``[tokenizer_training]`` section, validated by :class:`TokenizerTrainingConfig`
(registered by the tokenizer stage, which owns the section).
"""
from __future__ import annotations

from typing import Union

import attrs

from minidalle.config import positive, read_section
from minidalle.errors import ConfigError

SECTION = "tokenizer_training"
STAGE_VOCAB_SIZE = 256  # the tokenizer stage's vocabulary when the section names none


@attrs.define
class TokenizerTrainingConfig:
    # None: `minidalle tokenizer train` needs --vocab-size; the stage uses STAGE_VOCAB_SIZE
    vocab_size: Union[int, None] = attrs.field(default=None, validator=positive)
    split: str = "train"
    out: Union[str, None] = None  # where to write; default: [tokenizer] path (name = "yttm")


def read_settings(cfg) -> TokenizerTrainingConfig:
    return read_section(cfg, SECTION, TokenizerTrainingConfig)


def default_output(cfg):
    """``[tokenizer] path`` when the config's tokenizer is ``yttm``, else None."""
    if cfg.tokenizer is not None and cfg.tokenizer.name == "yttm":
        return cfg.tokenizer.params.path
    return None


def train_tokenizer(cfg, *, vocab_size: int, out, registry, split: str = "train",
                    image_size: int | None = None):
    """Train a yttm model on ``cfg``'s dataset captions; returns (tokenizer, caption count).

    ``image_size`` only builds the dataset (captions do not depend on it); default: the
    codec's, else 256."""
    from minidalle.components.tokenizers.yttm import train

    if cfg.dataset is None:
        raise ConfigError(f"{cfg.source or 'config'}: dataset: tokenizer training needs a [dataset] section")
    if image_size is None:
        image_size = (getattr(cfg.codec.params, "image_size", None) if cfg.codec else None) or 256
    dataset = registry.get("dataset", cfg.dataset.name).build(
        cfg.dataset.params, image_size=image_size, split=split, seed=cfg.run.seed)
    count = 0

    def counted():
        nonlocal count
        for caption in dataset.captions():
            count += 1
            yield caption

    tok = train(counted(), vocab_size, out)
    return tok, count
