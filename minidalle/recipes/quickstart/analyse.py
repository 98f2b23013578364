"""The pixel analyser of the ``shapes`` dataset: :func:`analyse` recovers shape, colour,
position and size from a rendered or generated image of one shape. ``minidalle evaluate``
(:mod:`minidalle.recipes.quickstart.evaluation`) measures prompt fidelity with it.
"""
from __future__ import annotations

import numpy as np
import torch

from minidalle.components.datasets.shapes import PALETTE, POSITIONS, SHAPES, SIZES


def analyse(image, *, colours=None, shapes=None, background=(0, 0, 0)) -> dict | None:
    """Recover ``{"shape", "colour", "position", "size"}`` from an image of one shape.

    ``image``: ``uint8`` or float-in-[0, 1] ``[3, H, W]`` tensor/array, or a PIL image.
    Every pixel is classified to the nearest of ``colours`` (default: all palette colours)
    or the ``background``; ``shapes`` limits the candidate shapes (default: all); the most frequent colour is the shape's, its pixels give the
    position (centroid on the 3x3 grid), the size (extent relative to a cell) and the shape
    (the template that best overlaps it in its bounding box), all measured on the largest
    4-connected blob of that colour, so stray pixels do not count. Returns None
    when no shape is found.
    """
    arr = _as_hwc_float(image)
    h, w, _ = arr.shape
    names = list(colours or PALETTE)
    refs = np.array([background] + [PALETTE[n] for n in names], dtype=np.float32)
    dist = ((arr[:, :, None, :] - refs[None, None]) ** 2).sum(-1)
    label = dist.argmin(-1)
    counts = np.bincount(label.ravel(), minlength=len(refs))[1:]
    if counts.max() < max(2, h * w // 2000):
        return None
    colour_idx = int(counts.argmax())
    mask = _largest_component(label == colour_idx + 1)  # stray pixels elsewhere are ignored
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean(), xs.mean()
    row, col = min(int(cy / h * 3), 2), min(int(cx / w * 3), 2)
    position = next(n for n, ((r, c), _) in POSITIONS.items() if (r, c) == (row, col))
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
    extent = max(y1 - y0 + 1, x1 - x0 + 1) / (min(h, w) / 3)
    size = "small" if extent < (SIZES["small"] + SIZES["large"]) / 2 else "large"
    box = mask[y0:y1 + 1, x0:x1 + 1]
    # the shape whose template, drawn in the same bounding box, overlaps the mask best
    shape = max(shapes or SHAPES, key=lambda name: _iou(box, _template(name, *box.shape)))
    return {"shape": shape, "colour": names[colour_idx], "position": position, "size": size}


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean mask (breadth-first search)."""
    from collections import deque

    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    best: list = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        region, queue = [], deque([(int(y0), int(x0))])
        while queue:
            y, x = queue.popleft()
            region.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        if len(region) > len(best):
            best = region
    out = np.zeros_like(mask, dtype=bool)
    if best:
        ys, xs = zip(*best)
        out[list(ys), list(xs)] = True
    return out


def _template(shape: str, h: int, w: int) -> np.ndarray:
    from PIL import Image, ImageDraw

    img = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(img)
    cx, cy = (w - 1) / 2, (h - 1) / 2
    if shape == "circle":
        draw.ellipse([0, 0, w - 1, h - 1], fill=1)
    elif shape == "square":
        draw.rectangle([0, 0, w - 1, h - 1], fill=1)
    elif shape == "triangle":
        draw.polygon([(cx, 0), (w - 1, h - 1), (0, h - 1)], fill=1)
    else:
        draw.polygon([(cx, 0), (w - 1, cy), (cx, h - 1), (0, cy)], fill=1)
    return np.asarray(img, dtype=bool)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def _as_hwc_float(image) -> np.ndarray:
    if hasattr(image, "convert"):  # PIL
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        image = image.float() * 255.0 if image.is_floating_point() else image.float()
        return image.permute(1, 2, 0).numpy()
    arr = np.asarray(image)
    if arr.dtype.kind == "f":
        arr = arr * 255.0
    if arr.shape[0] == 3 and arr.shape[-1] != 3:
        arr = arr.transpose(1, 2, 0)
    return arr.astype(np.float32)
