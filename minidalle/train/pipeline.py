"""From a Config to the pieces training and inference need: tokenizer, codec, datasets,
model and the collate function.

Each builder is separate so that a command builds only what it uses (``bench`` needs only
the model; ``generate`` needs tokenizer, codec and model).
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from minidalle.errors import ConfigError, DataError

# Recipe defaults, used when neither a codec nor the dataset says otherwise.
DEFAULT_IMAGE_SIZE = 256


def _registry(cfg, registry=None):
    """``registry`` when given, else the one ``cfg`` was validated against."""
    registry = registry or getattr(cfg, "registry", None)
    if registry is None:
        raise ValueError("no registry: pass registry=, or a config from load_config")
    return registry


def build_tokenizer(cfg, registry=None):
    if cfg.tokenizer is None:
        raise ConfigError(f"{cfg.source}: tokenizer: missing section (e.g. [tokenizer] name = \"yttm\")")
    return _registry(cfg, registry).build("tokenizer", cfg.tokenizer.name, cfg.tokenizer.params)


def build_codec(cfg, registry=None):
    """The frozen image codec, or None when the config has no ``[codec]``."""
    if cfg.codec is None:
        return None
    codec = _registry(cfg, registry).build("codec", cfg.codec.name, cfg.codec.params)
    codec.eval()
    for p in codec.parameters():
        p.requires_grad_(False)
    return codec


def build_dataset(cfg, *, split: str = "train", image_size: int | None = None, registry=None):
    if cfg.dataset is None:
        raise ConfigError(f"{cfg.source}: dataset: missing section (e.g. [dataset] name = \"shapes\")")
    try:
        return _registry(cfg, registry).build("dataset", cfg.dataset.name, cfg.dataset.params,
                                              image_size=image_size or DEFAULT_IMAGE_SIZE,
                                              split=split, seed=cfg.run.seed)
    except DataError as exc:
        if str(exc).startswith("dataset."):  # "dataset.root: ...": name the config file too
            raise DataError(f"{cfg.source}: {exc}") from None
        raise


def image_geometry(codec=None, dataset=None) -> tuple[int, int]:
    """(num_image_tokens, fmap_size) from the codec, else from a codes dataset's attributes."""
    for source in (codec, dataset):
        if source is not None and hasattr(source, "num_tokens") and hasattr(source, "fmap_size"):
            return int(source.num_tokens), int(source.fmap_size)
    raise ConfigError("cannot tell the image vocabulary: the config needs a [codec] section "
                      "(or a dataset of codes that records num_tokens and fmap_size)")


def token_factors(codec=None, dataset=None):
    """The codebook sizes of factorised image codes (``codec.token_factors``), else None."""
    for source in (codec, dataset):
        if source is not None and getattr(source, "token_factors", None):
            return tuple(source.token_factors)
    return None


def build_model(cfg, *, text_vocab: int, num_image_tokens: int, fmap_size: int, codec=None,
                registry=None, image_token_factors=None):
    """The DALL-E module; ``codec`` (frozen) is attached when the data are images."""
    from minidalle.model import build_model as _build

    return _build(cfg, text_vocab=text_vocab, num_image_tokens=num_image_tokens,
                  fmap_size=fmap_size, registry=_registry(cfg, registry), codec=codec,
                  image_token_factors=image_token_factors or token_factors(codec))


def make_collate(tokenizer, text_seq_len: int, truncate: bool,
                 source: str | None = None) -> Callable[[list[dict]], dict]:
    """Samples -> ``{"text": int64 [B, text_seq_len], "image": stacked images or codes}``
    (``source``: the config file, named in errors); a sample marked ``null_caption`` (see
    :class:`minidalle.data.NullCaptions`) gets an all-padding text row."""
    where = f"{source}: " if source else ""

    def collate(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        captions = [s["caption"] for s in samples]
        key = "codes" if "codes" in samples[0] else "image"
        try:
            text = tokenizer.encode(captions, text_seq_len, truncate=truncate)
        except DataError as exc:
            raise DataError(f"{where}{exc}") from None
        except (ValueError, RuntimeError) as exc:
            raise DataError(f"{where}tokenizing captions: {exc} (set training.truncate_captions = true "
                            f"to cut captions at model.text_seq_len = {text_seq_len})") from None
        null = [i for i, s in enumerate(samples) if s.get("null_caption")]
        if null:  # the null caption of classifier-free guidance: all padding
            text[null] = 0
        return {"text": text, "image": torch.stack([s[key] for s in samples])}

    return collate


class Pipeline:
    """Everything training needs, built once from a Config."""

    def __init__(self, cfg, registry=None, *, with_model: bool = True) -> None:
        self.cfg = cfg
        self.registry = _registry(cfg, registry)
        self.tokenizer = build_tokenizer(cfg, self.registry)
        self.codec = build_codec(cfg, self.registry)
        image_size = getattr(self.codec, "image_size", None)
        self.dataset = build_dataset(cfg, split="train", image_size=image_size, registry=self.registry)
        self.text_vocab = cfg.model.text_vocab or self.tokenizer.vocab_size
        if self.text_vocab < self.tokenizer.vocab_size:  # ids past the table would wrap into pads
            from minidalle.errors import ConfigError

            raise ConfigError(f"{cfg.source}: model.text_vocab: {self.text_vocab} is smaller than the "
                              f"tokenizer's vocabulary ({self.tokenizer.vocab_size} ids)")
        self.num_image_tokens, self.fmap_size = image_geometry(self.codec, self.dataset)
        self.collate = make_collate(self.tokenizer, cfg.model.text_seq_len,
                                    cfg.training.truncate_captions, source=cfg.source)
        self.model = None
        if with_model:
            # The codec is only needed inside the model when the data are images.
            first = self.dataset[0] if len(self.dataset) else {}
            needs_codec = "image" in first and "codes" not in first
            if needs_codec and self.codec is None:
                raise ConfigError(f"{cfg.source}: codec: the dataset yields images, so the "
                                  "config needs a [codec] to turn them into codes")
            self.model = build_model(cfg, text_vocab=self.text_vocab,
                                     num_image_tokens=self.num_image_tokens,
                                     fmap_size=self.fmap_size,
                                     codec=self.codec if needs_codec else None,
                                     registry=self.registry,
                                     image_token_factors=token_factors(self.codec, self.dataset))
