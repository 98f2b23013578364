"""Pictures during training: ``training.sample_every = N`` draws ``training.sample_prompts``
(default: a few validation captions) every N steps into ``samples/step-NNNNNNNN.png``.

One cached sampling pass per preview (the key/value cache, ``generate`` settings, the same
seed every time so that previews of different steps are comparable), written atomically;
rank 0 only under data parallel. The trainer reports each preview's cost in its log line
and prints the last preview's path when training ends.
"""
from __future__ import annotations

import itertools
import time
from pathlib import Path

import torch

SAMPLES_DIR = "samples"
DEFAULT_PROMPTS = 4  # validation captions drawn when training.sample_prompts is empty
IMAGES_PER_PROMPT = 2


def default_prompts(cfg, dataset, val_indices, registry=None, n: int = DEFAULT_PROMPTS) -> list[str]:
    """``n`` distinct captions: of the dataset's ``val`` split when it has one, else of the
    trainer's validation items (``training.val_fraction``), else of the training items."""
    from minidalle.errors import MinidalleError
    from minidalle.train.pipeline import build_dataset

    sources = []
    try:
        val = build_dataset(cfg, split="val", image_size=8, registry=registry)
        sources.append((val, range(len(val))))
    except (MinidalleError, OSError, ValueError):
        pass  # no val split: the trainer's own validation items, else training items
    sources += [(dataset, list(val_indices)), (dataset, range(len(dataset)))]
    for ds, indices in sources:
        out: list[str] = []
        for i in itertools.islice(indices, 50 * n):
            caption = ds[i]["caption"]
            if caption not in out:
                out.append(caption)
            if len(out) >= n:
                break
        if out:
            return out
    return []


class Previewer:
    """Draws the preview grid from the model being trained."""

    def __init__(self, *, model, codec, tokenizer, prompts: list[str], out_dir, cfg) -> None:
        self.model, self.codec, self.tokenizer = model, codec, tokenizer
        self.prompts = list(prompts)
        self.dir = Path(out_dir) / SAMPLES_DIR
        self.cfg = cfg
        self.last: Path | None = None

    def path(self, step: int) -> Path:
        return self.dir / f"step-{step:08d}.png"

    @torch.no_grad()
    def draw(self, model, step: int):
        """Write the grid for ``step``; returns (path, the grid as uint8 [3, H, W], seconds)."""
        from minidalle.images import make_grid, save_png
        from minidalle.inference.sampling import generate_image_codes

        start = time.perf_counter()
        g = self.cfg.generate
        device = next(model.parameters()).device
        was_training = model.training
        text = self.tokenizer.encode([p for p in self.prompts for _ in range(IMAGES_PER_PROMPT)],
                                     self.cfg.model.text_seq_len, truncate=True).to(device)
        gen = torch.Generator(device=device).manual_seed(int(self.cfg.run.seed))
        try:
            codes = generate_image_codes(model, text, filter_thres=g.filter_thres, top_p=g.top_p,
                                         temperature=g.temperature, generator=gen,
                                         use_cache=g.use_cache)
        finally:
            model.train(was_training)
        codec_device = next(iter(self.codec.parameters()), torch.empty(0)).device
        images = self.codec.decode(codes.to(codec_device)).float().clamp(0, 1).cpu()
        images = (images * 255).round().to(torch.uint8)
        factor = max(1, 64 // images.shape[-1])  # small images stay visible
        if factor > 1:
            images = images.repeat_interleave(factor, -1).repeat_interleave(factor, -2)
        rows = [images[i * IMAGES_PER_PROMPT:(i + 1) * IMAGES_PER_PROMPT]
                for i in range(len(self.prompts))]
        grid = make_grid(rows, [f"step {step}: {p}" for p in self.prompts])
        self.last = save_png(grid, self.path(step))
        import numpy as np

        array = torch.from_numpy(np.asarray(grid.convert("RGB")).copy()).permute(2, 0, 1)
        return self.last, array, time.perf_counter() - start


def build_previewer(cfg, pipe, dataset, val_indices, registry=None) -> Previewer | None:
    """The previewer for ``training.sample_every``, or None when it is off."""
    from minidalle.errors import ConfigError

    if not cfg.training.sample_every:
        return None
    if pipe.codec is None:
        raise ConfigError(f"{cfg.source}: training.sample_every: previews need a [codec] to turn "
                          "image codes into pictures")
    prompts = cfg.training.sample_prompts or default_prompts(cfg, dataset, val_indices, registry)
    return Previewer(model=pipe.model, codec=pipe.codec, tokenizer=pipe.tokenizer,
                     prompts=prompts, out_dir=cfg.run.out_dir, cfg=cfg)
