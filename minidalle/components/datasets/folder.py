"""``folder``: ``name.jpg|jpeg|png|webp|bmp`` with ``name.txt`` beside it, one caption a line
(the DALLE-pytorch convention), searched recursively under ``root``.

Images without a caption file, caption files without an image and caption files with no
non-empty line are reported (one warning each kind) and skipped. ``split``: ``train`` and
``val`` divide the pairs by a stable hash of their path relative to ``root``, ``val``
taking about ``val_fraction`` of them (0 by default: everything is ``train``); ``all``
takes every pair.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import attrs

from minidalle.config import FieldError, positive
from minidalle.data import (IMAGE_EXTENSIONS, CaptionedImages, read_caption_lines, report_skipped,
                            split_of)
from minidalle.errors import DataError

SPLITS = ("train", "val", "all")


@attrs.define
class FolderConfig:
    root: str
    val_fraction: float = attrs.field(default=0.0)
    max_items: Union[int, None] = attrs.field(default=None, validator=positive)

    @val_fraction.validator
    def _fraction(self, attribute, value):
        if not 0.0 <= value < 1.0:
            raise FieldError(f"val_fraction: expected a number in [0, 1), got {value!r}")


def scan(root: Path) -> tuple[list[Path], list[list[str]], dict[str, list]]:
    """Image paths and their captions, sorted by path, plus what was skipped."""
    images: dict[str, Path] = {}
    texts: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            path = Path(dirpath, name)
            stem, ext = os.path.splitext(str(path.relative_to(root)))
            if ext.lower() in IMAGE_EXTENSIONS:
                images.setdefault(stem, path)
            elif ext.lower() == ".txt":
                texts[stem] = path
    paths, captions = [], []
    skipped = {"images without a caption file": [], "caption files without an image": [],
               "empty caption files": []}
    for stem in sorted(images):
        if stem not in texts:
            skipped["images without a caption file"].append(images[stem])
            continue
        lines = read_caption_lines(texts[stem])
        if not lines:
            skipped["empty caption files"].append(texts[stem])
            continue
        paths.append(images[stem])
        captions.append(lines)
    skipped["caption files without an image"] = [texts[s] for s in sorted(texts) if s not in images]
    return paths, captions, skipped


def build(config: FolderConfig, *, image_size: int, split: str = "train", seed: int = 0):
    root = Path(config.root)
    if not root.is_dir():
        raise DataError(f"dataset.root: folder not found: {root}")
    if split not in SPLITS:
        raise DataError(f"folder: unknown split {split!r} (known: {', '.join(SPLITS)})")
    paths, captions, skipped = scan(root)
    for kind, items in skipped.items():
        report_skipped(f"folder {root}", kind, items)
    if split != "all":
        keep = [split_of(str(p.relative_to(root)), config.val_fraction) == split for p in paths]
        paths = [p for p, k in zip(paths, keep) if k]
        captions = [c for c, k in zip(captions, keep) if k]
    return CaptionedImages(paths, captions, image_size=image_size, seed=seed,
                           max_items=config.max_items, what=f"folder {root} (split {split})")
