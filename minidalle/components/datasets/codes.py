"""``codes``: a cache of (captions, image codes) written by ``minidalle prepare codes``.

``path`` is the cache folder; split ``S`` reads ``S.safetensors`` (tensor ``codes``,
``[N, fmap_size**2]``, stored as int16 or int32) and ``S.json`` (the captions of every
item, a list per image, plus the codec and dataset that made them). Items are
``{"caption": str, "codes": int64 [fmap_size**2]}`` (plus any JSON-able extra keys the
source dataset had, such as ``attributes``); the caption is chosen from
``(seed, epoch, index)`` like the image datasets. Nothing is unpickled: tensors come from
safetensors, everything else from JSON.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Union

import attrs
import torch

from minidalle.config import positive
from minidalle.data import item_rng
from minidalle.errors import DataError

log = logging.getLogger("minidalle.data")

FORMAT = "minidalle-codes"
VERSION = 1


@attrs.define
class CodesConfig:
    path: str  # the folder `minidalle prepare codes --out` wrote
    max_items: Union[int, None] = attrs.field(default=None, validator=positive)


def cache_files(folder, split: str) -> tuple[Path, Path]:
    folder = Path(folder)
    return folder / f"{split}.safetensors", folder / f"{split}.json"


def read_meta(folder, split: str) -> dict:
    tensors, meta_path = cache_files(folder, split)
    if not meta_path.is_file() or not tensors.is_file():
        raise DataError(f"{folder}: no codes cache for split {split!r} (expected {meta_path.name} "
                        f"and {tensors.name}; write it with `minidalle prepare codes CONFIG`)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{meta_path}: cannot read codes cache metadata: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DataError(f"{meta_path}: not a minidalle codes cache")
    if meta.get("version") != VERSION:
        raise DataError(f"{meta_path}: codes cache version {meta.get('version')!r}, "
                        f"this minidalle reads version {VERSION}; rerun `minidalle prepare codes`")
    return meta


class CodesDataset(torch.utils.data.Dataset):
    def __init__(self, config: CodesConfig, image_size: int | None, split: str, seed: int) -> None:
        self.folder = Path(config.path)
        self.split, self.seed, self.epoch = split, seed, 0
        meta = read_meta(self.folder, split)
        self.fmap_size = int(meta["fmap_size"])
        self.num_tokens = int(meta["num_tokens"])
        self.image_size = int(meta["image_size"])
        factors = meta.get("token_factors")  # a codec with several codebooks
        self.token_factors = tuple(int(k) for k in factors) if factors else None
        if image_size and image_size != self.image_size:
            # A warning, not an error: callers without a codec pass a default size.
            log.warning("%s: codes were made for %dpx images by codec %r, but %dpx was asked "
                        "for; rerun `minidalle prepare codes` if the codec changed", self.folder,
                        self.image_size, meta.get("codec", {}).get("name"), image_size)
        n = len(meta["captions"])
        self.length = min(n, config.max_items) if config.max_items else n
        self.caption_lists = meta["captions"][: self.length]
        self.extras = (meta.get("extras") or [{}] * n)[: self.length]
        self.meta = {k: v for k, v in meta.items() if k not in ("captions", "extras")}
        self._codes = None
        if self.length == 0:
            raise DataError(f"{self.folder}: the codes cache for split {split!r} is empty")

    @property
    def codes(self) -> torch.Tensor:
        # Loaded on first use, so that pickling the dataset to workers stays cheap.
        if self._codes is None:
            from safetensors import SafetensorError
            from safetensors.torch import load_file

            path = cache_files(self.folder, self.split)[0]
            try:
                codes = load_file(str(path))["codes"]
            except (SafetensorError, OSError, KeyError) as exc:
                raise DataError(f"{path}: cannot read codes: {exc}") from None
            if codes.ndim != 2 or codes.shape[1] != self.fmap_size ** 2 or codes.shape[0] < self.length:
                raise DataError(f"{path}: codes of shape {tuple(codes.shape)} do not match the "
                                f"metadata ({self.length} items of {self.fmap_size ** 2} codes)")
            self._codes = codes[: self.length]
        return self._codes

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_codes"] = None
        return state

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(index)
        options = self.caption_lists[index]
        caption = options[item_rng(self.seed, self.epoch, index).randrange(len(options))]
        item = {"caption": caption, "codes": self.codes[index].long()}
        item.update(self.extras[index])
        return item

    def item_captions(self, index: int) -> list[str]:
        return list(self.caption_lists[index])

    def captions(self):
        for options in self.caption_lists:
            yield from options


def build(config: CodesConfig, *, image_size: int | None = None, split: str = "train", seed: int = 0):
    return CodesDataset(config, image_size, split, seed)


# --------------------------------------------------------------------------- writing


class _Indexed(torch.utils.data.Dataset):
    """Yields ``(index, item)`` so the writer knows which item a batch row came from."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return index, self.dataset[index]


def _collate(batch):
    return batch


def _jsonable(value) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def write_cache(dataset, codec, out, split: str, *, batch_size: int = 32, workers: int = 0,
                device: str = "cpu", meta: dict | None = None, progress: bool = True) -> dict:
    """Encode every image of ``dataset`` with ``codec`` and write ``out/split.*``.

    Files are written under temporary names and renamed into place, so an interrupted run
    leaves any earlier cache intact. Returns the metadata written (without the captions).
    """
    from safetensors.torch import save
    from tqdm import tqdm

    from minidalle.fileio import atomic_write
    from minidalle.train.pipeline import token_factors

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n = len(dataset)
    if n == 0:
        raise DataError(f"split {split!r}: the dataset is empty")
    fmap, num_tokens, image_size = int(codec.fmap_size), int(codec.num_tokens), int(codec.image_size)
    dtype = torch.int16 if num_tokens <= torch.iinfo(torch.int16).max else torch.int32
    codes = torch.empty(n, fmap * fmap, dtype=dtype)
    captions: list[list[str]] = [[] for _ in range(n)]
    extras: list[dict] = [{} for _ in range(n)]
    loader = torch.utils.data.DataLoader(_Indexed(dataset), batch_size=batch_size, shuffle=False,
                                         num_workers=workers, collate_fn=_collate)
    codec = codec.to(device).eval()
    with torch.inference_mode(), tqdm(total=n, desc=f"encoding {split}", unit="img",
                                      disable=not progress) as bar:
        for batch in loader:
            idx = [i for i, _ in batch]
            items = [item for _, item in batch]
            if "image" not in items[0]:
                raise DataError(f"split {split!r}: dataset items have no 'image' to encode")
            images = torch.stack([item["image"] for item in items]).to(device)
            images = images.float() / 255.0 if not images.is_floating_point() else images
            got = codec.encode(images)
            if tuple(got.shape) != (len(items), fmap * fmap):
                raise DataError(f"codec returned codes of shape {tuple(got.shape)}, "
                                f"expected {(len(items), fmap * fmap)}")
            codes[idx] = got.to("cpu", dtype)
            for i, item in zip(idx, items):
                # an item whose image was unreadable carries a neighbour's image and caption
                options = dataset.item_captions(i) if hasattr(dataset, "item_captions") else []
                captions[i] = options if item["caption"] in options else [item["caption"]]
                extras[i] = {k: v for k, v in item.items()
                             if k not in ("caption", "image", "codes", "index") and _jsonable(v)}
            bar.update(len(items))
    tensors_path, meta_path = cache_files(out, split)
    factors = token_factors(codec)
    info = {"format": FORMAT, "version": VERSION, "split": split, "count": n,
            "fmap_size": fmap, "num_tokens": num_tokens, "image_size": image_size,
            **({"token_factors": list(factors)} if factors else {}),
            **(meta or {})}
    atomic_write(tensors_path, lambda f: f.write(save({"codes": codes.contiguous()})))
    body = {**info, "captions": captions}
    if any(extras):
        body["extras"] = extras
    atomic_write(meta_path, lambda f: f.write(json.dumps(body, ensure_ascii=False).encode("utf-8")))
    return info
