"""Saving images: one PNG per image, and a grid PNG with a text label above each row.

All writes go to a temporary file renamed into place, so an interrupted run never leaves a
half-written PNG.
"""
from __future__ import annotations

import re
import textwrap
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] (or uint8) ``[B, 3, H, W]`` -> uint8."""
    if images.dtype == torch.uint8:
        return images
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)


def to_pil(image: torch.Tensor) -> Image.Image:
    """One image ``[3, H, W]`` (float in [0, 1] or uint8) as a PIL RGB image."""
    array = to_uint8(image[None])[0].permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array, mode="RGB")


def save_png(image, path: Path | str) -> Path:
    """Save a PIL image or an image tensor ``[3, H, W]`` atomically."""
    from minidalle.fileio import atomic_write

    pil = image if isinstance(image, Image.Image) else to_pil(image)
    return atomic_write(path, lambda f: pil.save(f, format="PNG"))


def slug(text: str, max_len: int = 40) -> str:
    """A file-name-safe short form of a prompt."""
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s[:max_len].rstrip("-") or "prompt"


def save_images(images: torch.Tensor, out_dir: Path | str, stem: str) -> list[Path]:
    """``out_dir/<stem>-<i>.png`` for each image of ``[B, 3, H, W]``."""
    out_dir = Path(out_dir)
    return [save_png(img, out_dir / f"{stem}-{i:02d}.png") for i, img in enumerate(images)]


def make_grid(rows: list[torch.Tensor], labels: list[str] | None = None, *, pad: int = 4,
              font_size: int = 12, background=(255, 255, 255)) -> Image.Image:
    """One row per tensor ``[n, 3, H, W]`` (rows may differ in n, not in H and W), each with
    its label (wrapped) above it."""
    if not rows:
        raise ValueError("make_grid: no rows")
    labels = list(labels) if labels is not None else [""] * len(rows)
    h, w = rows[0].shape[-2:]
    cols = max(r.shape[0] for r in rows)
    width = cols * w + (cols + 1) * pad
    font = _font(font_size)
    chars = max(8, int(width / (font_size * 0.6)))
    # the whole prompt (a two-clause caption needs 4-6 lines above a narrow row), at most 8 lines
    wrapped = [textwrap.wrap(label, chars, max_lines=8, placeholder=" ...") if label else []
               for label in labels]
    line_h = font_size + 3
    height = sum(pad + len(lines) * line_h + h for lines in wrapped) + pad
    canvas = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(canvas)
    y = pad
    for row, lines in zip(rows, wrapped):
        for line in lines:
            draw.text((pad, y), line, fill=(0, 0, 0), font=font)
            y += line_h
        for i, img in enumerate(row):
            canvas.paste(to_pil(img), (pad + i * (w + pad), y))
        y += h + pad
    return canvas


def save_grid(rows: list[torch.Tensor], labels: list[str] | None, path: Path | str, **kwargs) -> Path:
    return save_png(make_grid(rows, labels, **kwargs), path)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()
