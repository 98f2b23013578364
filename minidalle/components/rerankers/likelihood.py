"""The ``likelihood`` reranker: the generating model's own score of each candidate.

The score of an image is ``log p(codes | caption)``, the sum over image positions of the
log-probability the model gives each of its codes (CogView's self-reranking). With
``pmi = true`` it is ``log p(codes | caption) - log p(codes | null caption)``, the pointwise
mutual information of image and caption, which prefers images the caption explains over
images that are merely likely (plain, uniform ones). The null-caption term needs a model
trained with ``training.null_caption_prob > 0``.

It needs no other model: ``minidalle generate`` hands it the model, the tokenizer and the
sampled codes (:meth:`bind`, ``score(..., codes=)``).
"""
from __future__ import annotations

import attrs

from minidalle.config import positive


@attrs.define
class LikelihoodConfig:
    pmi: bool = False  # subtract the score given the null caption
    batch_size: int = attrs.field(default=16, validator=positive)  # candidates in one forward


class LikelihoodReranker:
    takes_codes = True

    def __init__(self, config: LikelihoodConfig | None = None):
        self.config = config or LikelihoodConfig()
        self.model = self.tokenizer = self.codec = None

    @property
    def needs_null_captions(self) -> bool:
        return self.config.pmi

    def bind(self, *, model, tokenizer, codec=None) -> None:
        """The generating model (and its tokenizer and codec) to score with."""
        self.model, self.tokenizer, self.codec = model, tokenizer, codec

    def score(self, captions: list[str], images=None, *, codes=None):
        """``[B]`` scores (higher is better) of ``codes`` (or of ``images`` [B,3,H,W] in
        [0,1], encoded with the codec) given ``captions``."""
        import torch

        from minidalle.inference.sampling import image_log_likelihood

        if self.model is None:
            raise RuntimeError("the likelihood reranker scores with a model: call bind() first")
        if codes is None:
            if self.codec is None:
                raise RuntimeError("the likelihood reranker needs the codes or a codec")
            with torch.no_grad():
                codes = self.codec.encode(images.float())
        text = self.tokenizer.encode(list(captions), self.model.text_seq_len, truncate=True)
        device = next(self.model.parameters()).device
        text, codes = text.to(device), codes.to(device).long()
        out = []
        for i in range(0, len(text), self.config.batch_size):
            t, c = text[i : i + self.config.batch_size], codes[i : i + self.config.batch_size]
            s = image_log_likelihood(self.model, t, c)
            if self.config.pmi:
                s = s - image_log_likelihood(self.model, torch.zeros_like(t), c)
            out.append(s)
        return torch.cat(out).cpu()


def build(config: LikelihoodConfig | None = None) -> LikelihoodReranker:
    return LikelihoodReranker(config)
