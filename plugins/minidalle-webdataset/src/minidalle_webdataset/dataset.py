"""WebDataset shards as a map-style minidalle dataset.

A WebDataset shard is a plain tar file whose members are grouped into samples by *key*:
``000123.jpg`` and ``000123.txt`` are the image and the caption of sample ``000123`` (the
key is the member path up to the first dot of its file name, the rest is the extension).

Opening the dataset reads the tar headers and the small caption members of every shard once
(sequentially, images are skipped over, not decoded), and keeps for each complete sample its
captions and the byte range of its image. ``ds[i]`` then seeks straight to that range, so
the dataset has a length, random access and exact ``captions()`` without decoding any image,
which is what the trainer (shuffling, epochs, validation split) and tokenizer training need.
Shards must be local files (download remote shards first).

Samples without an image or a caption, captions that are empty or not valid JSON, and
truncated shards are skipped at indexing time with one warning per shard; images that fail
to decode are skipped when read (the next readable sample is returned instead) with one
warning per sample.
"""
from __future__ import annotations

import glob
import io
import json
import logging
import os
import re
import tarfile
from pathlib import Path
from typing import Iterator, Union

import attrs
import torch

from minidalle.api import DataError, positive

log = logging.getLogger("minidalle.webdataset")

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTENSIONS = ("txt", "json")
# WebDataset's own key/extension split: the extension starts at the first dot of the name.
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


@attrs.define
class WebDatasetConfig:
    # Shards of the training split: a path pattern with {a,b} / {000..099} braces and/or
    # glob wildcards; several patterns may be separated by whitespace.
    shards: str
    # Shards of the validation split ("" = this dataset has no validation split).
    val_shards: str = ""
    # The field of a .json member that holds the caption (a string or a list of strings).
    caption_key: str = "caption"
    # Use at most this many samples (None = all), e.g. for a quick run on a big shard set.
    max_items: Union[int, None] = attrs.field(default=None, validator=positive)


def expand_shards(pattern: str, field: str = "dataset.shards") -> list[Path]:
    """Local shard paths for a brace/glob pattern; a missing or empty pattern is a DataError."""
    from braceexpand import braceexpand

    if "://" in pattern or pattern.startswith("pipe:"):
        raise DataError(f"{field}: {pattern!r}: only local shard files are supported "
                        "(download the shards first)")
    paths: list[Path] = []
    for part in pattern.split():
        for expanded in braceexpand(part):
            expanded = os.path.expanduser(expanded)
            if glob.has_magic(expanded):
                matches = sorted(glob.glob(expanded))
                if not matches:
                    raise DataError(f"{field}: no file matches {expanded!r}")
                paths.extend(Path(m) for m in matches)
            elif not os.path.isfile(expanded):
                raise DataError(f"{field}: shard not found: {expanded}")
            else:
                paths.append(Path(expanded))
    if not paths:
        raise DataError(f"{field}: the pattern {pattern!r} names no shard")
    return paths


@attrs.frozen
class Sample:
    shard: int  # index into WebDataset.shards
    key: str
    offset: int  # byte range of the image member inside the shard
    size: int
    captions: tuple[str, ...]


def _captions(data: bytes, ext: str, caption_key: str) -> tuple[str, ...]:
    text = data.decode("utf-8", errors="replace")
    if ext == "txt":
        values = text.splitlines()
    else:
        value = json.loads(text)  # ValueError when malformed
        value = value.get(caption_key) if isinstance(value, dict) else None
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise ValueError(f"no string or list of strings in field {caption_key!r}")
    return tuple(c for c in (" ".join(v.split()) for v in values) if c)


def index_shard(path: Path, shard: int, caption_key: str) -> list[Sample]:
    """One sequential pass over a shard's headers and caption members."""
    images: dict[str, tuple[int, int]] = {}
    captions: dict[str, tuple[str, ...]] = {}
    problems: list[str] = []
    file_size = path.stat().st_size
    order: list[str] = []
    try:
        with tarfile.open(path, "r:") as tar:
            while True:
                try:
                    member = tar.next()
                except (tarfile.TarError, EOFError, OSError) as exc:
                    problems.append(f"truncated or corrupt after {len(order)} samples ({exc})")
                    break
                if member is None:
                    break
                if not member.isfile():
                    continue
                m = _KEY_EXT.match(member.name)
                if not m or os.path.basename(member.name).startswith(("_", ".")):
                    continue
                key, ext = m.group(1), m.group(2).lower()
                if key not in images and key not in captions:
                    order.append(key)
                if member.offset_data + member.size > file_size:
                    problems.append(f"{member.name}: truncated")
                    continue
                if ext in IMAGE_EXTENSIONS and key not in images:
                    images[key] = (member.offset_data, member.size)
                elif ext in CAPTION_EXTENSIONS and (key not in captions or ext == "txt"):
                    data = tar.extractfile(member).read()
                    try:
                        found = _captions(data, ext, caption_key)
                    except ValueError as exc:
                        problems.append(f"{member.name}: bad caption ({exc})")
                        continue
                    if found:
                        captions[key] = found
    except (tarfile.TarError, EOFError) as exc:
        raise DataError(f"{path}: not a tar shard ({exc})") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read shard ({exc.strerror or exc})") from None
    samples = []
    incomplete = 0
    for key in order:
        if key in images and key in captions:
            offset, size = images[key]
            samples.append(Sample(shard, key, offset, size, captions[key]))
        else:
            incomplete += 1
    if incomplete:
        problems.append(f"{incomplete} sample(s) without both an image and a caption")
    if problems:
        shown = "; ".join(problems[:3]) + (f"; ... ({len(problems)} problems)" if len(problems) > 3 else "")
        log.warning("%s: skipped members: %s", path, shown)
    return samples


class WebDataset(torch.utils.data.Dataset):
    """Items are ``{"caption": str, "image": uint8 [3, S, S], "key": "shard.tar/key"}``."""

    def __init__(self, shards: list[Path], *, image_size: int, caption_key: str = "caption",
                 max_items: int | None = None, seed: int = 0) -> None:
        self.shards = list(shards)
        self.image_size = image_size
        self.seed = seed
        self.epoch = 0
        samples: list[Sample] = []
        for i, path in enumerate(self.shards):
            samples.extend(index_shard(path, i, caption_key))
            if max_items is not None and len(samples) >= max_items:
                samples = samples[:max_items]
                break
        if not samples:
            raise DataError(f"{self.shards[0]}{' ...' if len(self.shards) > 1 else ''}: "
                            "no complete (image, caption) sample in the shards")
        self.samples = samples
        self.bad: set[int] = set()  # samples whose image failed to decode (this process)
        self._files: dict[int, io.BufferedReader] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        """Which caption of a multi-caption sample an item uses depends on the epoch."""
        self.epoch = epoch

    def captions(self) -> Iterator[str]:
        for sample in self.samples:
            yield from sample.captions

    def _read(self, sample: Sample) -> bytes:
        f = self._files.get(sample.shard)
        if f is None:
            f = self._files[sample.shard] = open(self.shards[sample.shard], "rb")
        f.seek(sample.offset)
        return f.read(sample.size)

    def _image(self, sample: Sample) -> torch.Tensor | None:
        from PIL import Image

        from minidalle.api import pil_to_uint8

        try:
            with Image.open(io.BytesIO(self._read(sample))) as img:
                img.load()  # decode now, so a truncated image fails here
                return pil_to_uint8(img, self.image_size)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            return None

    def __getitem__(self, index: int) -> dict:
        n = len(self.samples)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples")
        index %= n
        for step in range(n):  # skip unreadable images: take the next readable sample
            i = (index + step) % n
            if i in self.bad:
                continue
            sample = self.samples[i]
            image = self._image(sample)
            if image is None:
                self.bad.add(i)
                log.warning("%s: skipping %s: image cannot be decoded (%d skipped so far)",
                            self.shards[sample.shard], sample.key, len(self.bad))
                continue
            caption = sample.captions[0]
            if len(sample.captions) > 1:
                from minidalle.api import item_rng

                caption = item_rng(self.seed, self.epoch, i).choice(sample.captions)
            return {"caption": caption, "image": image,
                    "key": f"{self.shards[sample.shard].name}/{sample.key}"}
        raise DataError(f"{self.shards[0]}: no sample with a readable image")

    # Open file handles stay in the process that opened them (DataLoader workers reopen).
    def __getstate__(self):
        state = dict(self.__dict__)
        state["_files"] = {}
        return state

    def __del__(self):
        for f in getattr(self, "_files", {}).values():
            f.close()


SPLITS = ("train", "val", "all")


def build(config: WebDatasetConfig, *, image_size: int, split: str = "train",
          seed: int = 0) -> WebDataset:
    """``train``: ``shards``; ``val``: ``val_shards``; ``all``: both."""
    if split not in SPLITS:
        raise DataError(f"webdataset: unknown split {split!r} (known: {', '.join(SPLITS)})")
    if split == "val" and not config.val_shards:
        raise DataError("dataset.val_shards: not set, so the webdataset has no validation split")
    shards: list[Path] = []
    if split in ("train", "all"):
        shards += expand_shards(config.shards, "dataset.shards")
    if split in ("val", "all") and config.val_shards:
        shards += expand_shards(config.val_shards, "dataset.val_shards")
    return WebDataset(shards, image_size=image_size, caption_key=config.caption_key,
                      max_items=config.max_items, seed=seed)
