"""Conformance checks for dataset components. From a plugin's pytest::

    from minidalle.testing.dataset import check_dataset

    def test_my_dataset_conforms(tmp_path):
        check_dataset(lambda seed: build(MyConfig(...), image_size=32, seed=seed), image_size=32)

``make(seed)`` builds the dataset (same config every call) with the given seed. The checks:
items are dicts with a ``str`` caption and either ``image`` (``uint8 [3, S, S]``) or
``codes`` (``int64 [N]``); ``captions()`` yields strings and every item's caption is among
them (a dataset may hold several captions per image); two builds with the same seed give
identical items; a pickled copy (what a data-loader worker receives) gives identical items;
reading past the end raises ``IndexError``. Each failure raises ``AssertionError``.
"""
from __future__ import annotations

import pickle
from typing import Callable

import torch


def _items(ds, n: int) -> list[dict]:
    return [ds[i] for i in range(min(n, len(ds)))]


def _same(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and torch.equal(x, y)):
                return False
        elif x != y:
            return False
    return True


def check_item(item, image_size: int | None, where: str = "item") -> None:
    assert isinstance(item, dict), f"{where}: must be a dict, got {type(item).__name__}"
    assert isinstance(item.get("caption"), str), f"{where}: 'caption' must be a str, got {item.get('caption')!r}"
    assert ("image" in item) != ("codes" in item), f"{where}: needs exactly one of 'image' or 'codes', has {sorted(item)}"
    if "image" in item:
        img = item["image"]
        assert isinstance(img, torch.Tensor), f"{where}: 'image' must be a tensor, got {type(img).__name__}"
        assert img.dtype == torch.uint8, f"{where}: 'image' must be uint8, got {img.dtype}"
        assert tuple(img.shape) == (3, image_size, image_size), (
            f"{where}: 'image' must have shape (3, {image_size}, {image_size}), got {tuple(img.shape)}")
    else:
        codes = item["codes"]
        assert isinstance(codes, torch.Tensor) and codes.dtype == torch.long and codes.ndim == 1, (
            f"{where}: 'codes' must be a 1-D int64 tensor, got "
            f"{getattr(codes, 'dtype', type(codes).__name__)} {tuple(getattr(codes, 'shape', ()))}")
        assert int(codes.min()) >= 0, f"{where}: negative codes"


def check_dataset(make: Callable[[int], object], *, image_size: int | None, max_items: int = 8,
                  seed: int = 0) -> None:
    """Run every check on ``make(seed)`` (first ``max_items`` items)."""
    ds = make(seed)
    n = len(ds)
    assert isinstance(n, int) and n > 0, f"len(dataset) must be a positive int, got {n!r}"
    items = _items(ds, max_items)
    for i, item in enumerate(items):
        check_item(item, image_size, where=f"item {i}")

    captions = list(ds.captions())
    assert all(isinstance(c, str) for c in captions), "captions() must yield str"
    assert len(captions) >= n, f"captions() yielded {len(captions)} captions for {n} items"
    known = set(captions)
    for i, item in enumerate(items):
        assert item["caption"] in known, f"item {i}: caption {item['caption']!r} is not among captions()"

    again = _items(make(seed), max_items)
    for i, (a, b) in enumerate(zip(items, again)):
        assert _same(a, b), f"item {i}: two builds with seed {seed} differ"
    try:
        copy = pickle.loads(pickle.dumps(ds))
    except Exception as exc:
        raise AssertionError(f"the dataset must pickle (data-loader workers get a pickled copy): "
                             f"{type(exc).__name__}: {exc}") from None
    for i, a in enumerate(items):
        assert _same(a, copy[i]), f"item {i}: a pickled copy (as data-loader workers get) differs"

    try:
        ds[n]
    except IndexError:
        pass
    else:
        raise AssertionError(f"dataset[{n}] (past the end) must raise IndexError")
