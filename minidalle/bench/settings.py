"""The ``[bench]`` section: the model geometry ``minidalle bench`` (and ``--generate``)
uses when the config has no tokenizer or codec to ask. The bench command registers
:class:`BenchConfig` for it."""
from __future__ import annotations

from typing import Union

import attrs

from minidalle.config import FieldError, read_section

SECTION = "bench"


def positive_int(instance, attribute, value):
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
        raise FieldError(f"{attribute.name}: expected a positive integer, got {value!r}")


@attrs.define
class BenchConfig:
    # Recipe defaults; text_vocab None: model.text_vocab, else 8192.
    text_vocab: Union[int, None] = attrs.field(default=None, validator=positive_int)
    num_image_tokens: int = attrs.field(default=1024, validator=positive_int)
    fmap_size: int = attrs.field(default=16, validator=positive_int)


def bench_geometry(cfg) -> dict:
    """``{"text_vocab", "num_image_tokens", "fmap_size"}`` for the bench's model."""
    b = read_section(cfg, SECTION, BenchConfig)
    return {"text_vocab": b.text_vocab or cfg.model.text_vocab or 8192,
            "num_image_tokens": b.num_image_tokens, "fmap_size": b.fmap_size}
