"""``coco``: MS COCO 2017 captions as downloaded, or as written by ``minidalle prepare coco``.

Layout under ``root`` (split ``train`` -> ``train2017``, ``val`` -> ``val2017``)::

    train2017/000000000009.jpg ...               the images
    annotations/captions_train2017.json          the original annotations, or
    train2017_captions/000000000009.txt ...      one caption a line (`prepare coco`)

``captions = "auto"`` reads the caption folder when it exists, else the JSON. Images
without a caption and captions whose image file is missing are reported and skipped.
Each item uses one of its image's captions, chosen from ``(seed, epoch, index)``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Union

import attrs

from minidalle.config import one_of, positive
from minidalle.data import CaptionedImages, read_caption_lines, report_skipped
from minidalle.errors import DataError

SPLITS = {"train": "train2017", "val": "val2017"}


@attrs.define
class CocoConfig:
    root: str
    captions: str = attrs.field(default="auto", validator=one_of("auto", "json", "txt"))
    max_items: Union[int, None] = attrs.field(default=None, validator=positive)


def annotations_path(root: Path, split: str) -> Path:
    return root / "annotations" / f"captions_{SPLITS[split]}.json"


def captions_dir(root: Path, split: str) -> Path:
    return root / f"{SPLITS[split]}_captions"


def read_annotations(path: Path) -> tuple[dict[int, str], dict[int, list[str]]]:
    """``image id -> file name`` and ``image id -> captions`` (whitespace collapsed, empty
    ones dropped) from a COCO captions JSON file."""
    try:
        with path.open("r", encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: COCO annotations file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: cannot read COCO annotations: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise DataError(f"{path}: not a COCO captions file (needs 'images' and 'annotations' lists)")
    try:
        files = {int(im["id"]): str(im["file_name"]) for im in data["images"]}
        captions: dict[int, list[str]] = {}
        for ann in data["annotations"]:
            text = " ".join(str(ann["caption"]).split())
            if text:
                captions.setdefault(int(ann["image_id"]), []).append(text)
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{path}: malformed COCO entry ({type(exc).__name__}: {exc})") from None
    return files, captions


def build(config: CocoConfig, *, image_size: int, split: str = "train", seed: int = 0):
    root = Path(config.root)
    if split not in SPLITS:
        raise DataError(f"coco: unknown split {split!r} (known: {', '.join(SPLITS)})")
    image_dir = root / SPLITS[split]
    if not image_dir.is_dir():
        raise DataError(f"dataset.root: image folder not found: {image_dir}")
    what = f"coco {root} ({SPLITS[split]})"
    on_disk = {e.name for e in os.scandir(image_dir) if e.is_file()}
    txt_dir = captions_dir(root, split)
    use_txt = config.captions == "txt" or (config.captions == "auto" and txt_dir.is_dir())
    paths, captions, no_image, no_caption = [], [], [], []
    if use_txt:
        if not txt_dir.is_dir():
            raise DataError(f"{txt_dir}: caption folder not found (run `minidalle prepare coco --root {root}`)")
        by_stem = {Path(n).stem: n for n in on_disk}
        texts = {Path(e.name).stem: e.path for e in os.scandir(txt_dir) if e.name.endswith(".txt")}
        for stem in sorted(texts):
            lines = read_caption_lines(texts[stem])
            if stem not in by_stem:
                no_image.append(texts[stem])
            elif lines:
                paths.append(image_dir / by_stem[stem])
                captions.append(lines)
        no_caption = sorted(n for s, n in by_stem.items() if s not in texts)
    else:
        files, by_id = read_annotations(annotations_path(root, split))
        for image_id, name in sorted(files.items(), key=lambda kv: kv[1]):
            if name not in on_disk:
                no_image.append(name)
            elif image_id in by_id:
                paths.append(image_dir / name)
                captions.append(by_id[image_id])
            else:
                no_caption.append(name)
    report_skipped(what, "captioned images whose file is missing", no_image)
    report_skipped(what, "images without captions", no_caption)
    return CaptionedImages(paths, captions, image_size=image_size, seed=seed,
                           max_items=config.max_items, what=what)


# --------------------------------------------------------------------------- prepare coco


def prepare_captions(root, split: str) -> dict:
    """Write ``<split>2017_captions/<image stem>.txt`` (one caption a line) from the JSON.

    Captions are repaired with ftfy (mojibake, bad escapes) and whitespace-collapsed; empty
    ones are dropped. The folder is built beside the old one and swapped in at the end.
    Returns counts for the summary.
    """
    import shutil
    import tempfile

    from minidalle.fileio import replace_dir

    import ftfy

    root = Path(root)
    path = annotations_path(root, split)
    files, _ = read_annotations(path)  # validates the structure
    data = json.loads(path.read_text(encoding="utf-8"))
    by_image: dict[int, list[str]] = {}
    fixed = empty = unknown = 0
    for ann in data["annotations"]:
        raw = str(ann["caption"])
        text = " ".join(ftfy.fix_text(raw).split())
        fixed += text != " ".join(raw.split())
        if not text:
            empty += 1
            continue
        if int(ann["image_id"]) not in files:
            unknown += 1
            continue
        by_image.setdefault(int(ann["image_id"]), []).append(text)
    image_dir = root / SPLITS[split]
    on_disk = {e.name for e in os.scandir(image_dir)} if image_dir.is_dir() else set()
    target = captions_dir(root, split)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
    try:
        for image_id, texts in by_image.items():
            stem = Path(files[image_id]).stem
            (tmp / f"{stem}.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
        replace_dir(tmp, target, aside=target.with_name(f".{target.name}-old"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "split": SPLITS[split], "out": str(target), "images": len(by_image),
        "captions": sum(map(len, by_image.values())), "fixed": fixed, "empty_dropped": empty,
        "unknown_image_ids": unknown, "images_without_captions": len(files) - len(by_image),
        "missing_image_files": sum(1 for i in by_image if files[i] not in on_disk),
    }
