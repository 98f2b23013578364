"""Local causal attention over a sliding 1-D window of image positions, plus all text.

Image tokens are generated in raster order; in a ``window`` layer image token ``k`` attends
to every text position and to image tokens ``k - size + 1 .. k`` (itself and the
``size - 1`` tokens generated just before it, which wrap around into the previous rows).
Text positions attend causally to text, as in every minidalle attention type.

It is a *pattern*: minidalle's ``PatternAttention`` supplies the projections, the fused
attention kernel, training and the key/value cache for sampling.
"""
from __future__ import annotations

import attrs
import torch

from minidalle.api import AttentionPattern, AttentionSpec, causal_mask, positions, positive


@attrs.define
class WindowConfig:
    # Image positions each image token sees, itself included (fmap_size works well: about
    # one image row of context). A size >= fmap_size**2 is plain causal attention.
    size: int = attrs.field(default=16, validator=positive)


class WindowPattern(AttentionPattern):
    def __init__(self, size: int):
        self.size = size

    def mask(self, text_len: int, fmap_size: int) -> torch.Tensor:
        idx, is_image, _, _ = positions(text_len, fmap_size)
        near = (idx[:, None] - idx[None, :]) < self.size
        # text queries and text keys follow the causal mask; image-image pairs must be near
        return causal_mask(text_len, fmap_size) & (~is_image[:, None] | ~is_image[None, :] | near)

    def __repr__(self) -> str:
        return f"WindowPattern(size={self.size})"


def build(config: WindowConfig | None = None, *, spec: AttentionSpec) -> WindowPattern:
    config = config or WindowConfig()
    return WindowPattern(config.size)
