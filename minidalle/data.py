"""Helpers shared by the built-in datasets and tokenizers.

* :func:`load_image` reads a file with PIL and returns ``uint8 [3, S, S]`` (shorter side
  resized to ``S``, then centre-cropped); it returns ``None`` for unreadable or truncated
  files so that a dataset can skip them (:class:`ImageSkipper` warns and counts).
* :func:`item_rng` is the seeded random source for per-item choices (which caption of an
  image an item uses): it depends only on ``(seed, epoch, index)``, so results do not
  depend on worker processes or on the order items are read.
* :func:`to_fixed_length` turns lists of token ids into the ``[B, L]`` padded tensor every
  tokenizer returns.
"""
from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import torch

from minidalle.errors import DataError

log = logging.getLogger("minidalle.data")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def item_rng(seed: int, epoch: int, index: int) -> random.Random:
    # A string seed goes through SHA-512 in `random`, so it is stable across processes
    # (unlike hash()) and neighbouring indices get unrelated streams.
    return random.Random(f"{seed}:{epoch}:{index}")


class NullCaptions(torch.utils.data.Dataset):
    """``dataset`` whose items get the null caption (all padding) with probability ``prob``,
    for classifier-free guidance (``training.null_caption_prob``).

    The draw for item ``i`` in epoch ``e`` comes from :func:`item_rng` seeded by the run's
    seed, so it is the same on every backend, for any number of worker processes or data
    parallel processes, and after a resume. A nulled item has ``caption = ""`` and
    ``null_caption = True``; the collate writes an all-padding text row for it.
    """

    SALT = 1_000_033  # keeps these draws apart from the datasets' own item_rng choices

    def __init__(self, dataset, prob: float, seed: int) -> None:
        self.dataset, self.prob, self.seed, self.epoch = dataset, float(prob), int(seed), 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name):  # num_tokens, fmap_size, captions(), ... of the dataset
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def is_null(self, index: int) -> bool:
        return item_rng(self.seed + self.SALT, self.epoch, int(index)).random() < self.prob

    def __getitem__(self, index: int) -> dict:
        item = self.dataset[index]
        if self.is_null(index):
            item = {**item, "caption": "", "null_caption": True}
        return item


def pil_to_uint8(img, image_size: int) -> torch.Tensor:
    """A PIL image -> ``uint8 [3, S, S]``: RGB, shorter side resized to S, centre crop."""
    from PIL import Image

    if img.mode.startswith("I;16") or img.mode == "I":
        # 16-bit grey (PNG): convert("RGB") would clip every value above 255 to white.
        grey = np.asarray(img, dtype=np.float64)
        if img.mode != "I" or grey.max(initial=0) > 255:
            grey = grey / 257.0
        img = Image.fromarray(np.clip(grey.round(), 0, 255).astype(np.uint8), mode="L")
    img = img.convert("RGB")
    w, h = img.size
    scale = image_size / min(w, h)
    if (w, h) != (image_size, image_size):
        nw, nh = max(image_size, round(w * scale)), max(image_size, round(h * scale))
        img = img.resize((nw, nh), Image.BICUBIC, reducing_gap=3.0)
        left, top = (nw - image_size) // 2, (nh - image_size) // 2
        img = img.crop((left, top, left + image_size, top + image_size))
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def load_image(path, image_size: int) -> torch.Tensor | None:
    """``uint8 [3, S, S]`` from an image file, or ``None`` when it cannot be decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()  # decode now: truncated files raise here, not later
            return pil_to_uint8(img, image_size)
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError,
            Image.DecompressionBombError) as exc:
        log.debug("cannot read %s: %s", path, exc)
        return None


class ImageSkipper:
    """Loads item images, skipping unreadable ones: warn once per file and count them.

    ``load(index, path_of, n)`` tries ``index`` and then the following items (wrapping
    around) until one decodes, so a bad file never stops a run; a dataset with no readable
    image at all raises a :class:`DataError`. ``bad`` holds the files skipped in this
    process (each data-loader worker has its own copy).
    """

    def __init__(self) -> None:
        self.bad: set[str] = set()

    def load(self, index: int, path_of, n: int, image_size: int) -> tuple[int, torch.Tensor]:
        for step in range(n):
            i = (index + step) % n
            path = str(path_of(i))
            if path in self.bad:
                continue
            image = load_image(path, image_size)
            if image is not None:
                return i, image
            self.bad.add(path)
            log.warning("skipping unreadable image %s (%d skipped so far)", path, len(self.bad))
        raise DataError(f"no readable image among {n} items (last tried: {path})")


def read_caption_lines(path: Path) -> list[str]:
    """Non-empty lines of a caption text file, whitespace-collapsed. UTF-8 (a byte-order mark
    is dropped); a file that is not UTF-8 is read with U+FFFD for the bad bytes and a warning."""
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        log.warning("%s: caption file is not UTF-8 (byte %d): undecodable bytes read as U+FFFD; "
                    "re-save it as UTF-8", path, exc.start)
        text = raw.decode("utf-8-sig", errors="replace")
    return [c for c in (" ".join(line.split()) for line in text.splitlines()) if c]


def to_fixed_length(ids: list[list[int]], texts: list[str], context_length: int,
                    truncate: bool) -> torch.Tensor:
    """Pad (with 0) or truncate token id lists to ``[B, context_length]`` int64.

    With ``truncate=False`` a caption longer than the context is a :class:`DataError`
    naming it.
    """
    out = torch.zeros(len(ids), context_length, dtype=torch.long)
    for row, (seq, text) in enumerate(zip(ids, texts)):
        if len(seq) > context_length:
            if not truncate:
                shown = text if len(text) <= 120 else text[:117] + "..."
                raise DataError(
                    f"caption too long: {len(seq)} tokens > context length {context_length} "
                    f"(set training.truncate_captions = true to cut it): {shown!r}"
                )
            seq = seq[:context_length]
        if seq:
            out[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return out


class CaptionedImages(torch.utils.data.Dataset):
    """Image files with one or more captions each (the base of ``folder`` and ``coco``).

    Item ``i`` is ``{"caption", "image"}``: one of the image's captions, chosen by
    :func:`item_rng` from ``(seed, epoch, i)`` (call :meth:`set_epoch` to draw other
    captions in a later epoch), and the image as ``uint8 [3, S, S]``. An unreadable image
    is skipped (warned about and counted in ``skipper.bad``) and the next item is used.
    Only paths and captions are held, so the dataset pickles cheaply to worker processes.
    """

    def __init__(self, paths: list[Path], captions: list[list[str]], *, image_size: int,
                 seed: int = 0, max_items: int | None = None, what: str = "dataset") -> None:
        if max_items is not None:
            paths, captions = paths[:max_items], captions[:max_items]
        if not paths:
            raise DataError(f"{what}: no images with captions")
        self.paths = [str(p) for p in paths]
        self.caption_lists = captions
        self.image_size = image_size
        self.seed = seed
        self.epoch = 0
        self.skipper = ImageSkipper()

    def __len__(self) -> int:
        return len(self.paths)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def pick_caption(self, index: int) -> str:
        options = self.caption_lists[index]
        return options[item_rng(self.seed, self.epoch, index).randrange(len(options))]

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self.paths):
            raise IndexError(index)
        i, image = self.skipper.load(index, self.paths.__getitem__, len(self.paths), self.image_size)
        return {"caption": self.pick_caption(i), "image": image}

    def item_captions(self, index: int) -> list[str]:
        return list(self.caption_lists[index])

    def captions(self):
        for options in self.caption_lists:
            yield from options


def report_skipped(what: str, kind: str, items: list, limit: int = 3) -> None:
    """Warn once about skipped inputs, naming a few of them."""
    if items:
        shown = ", ".join(str(x) for x in items[:limit]) + (", ..." if len(items) > limit else "")
        log.warning("%s: skipped %d %s: %s", what, len(items), kind, shown)


def split_of(key: str, val_fraction: float) -> str:
    """``"val"`` for a stable ``val_fraction`` share of keys (by CRC32 of the key), else
    ``"train"``; adding files never moves existing ones between splits."""
    import zlib

    return "val" if zlib.crc32(key.encode("utf-8")) % 100_000 < val_fraction * 100_000 else "train"
