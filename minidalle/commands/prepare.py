"""`minidalle prepare coco|codes`: one-off data preparation.

* ``prepare coco --root DIR``: caption text files from COCO's annotations JSON.
* ``prepare codes CONFIG``: encode the config's dataset with its codec once, so training
  can read codes (dataset ``codes``) instead of running the codec every step.
"""
from __future__ import annotations


def add_parser(sub):
    from minidalle.cli import add_config_arguments

    p = sub.add_parser("prepare", help="prepare data: COCO caption files, a codes cache")
    psub = p.add_subparsers(dest="prepare_command", metavar="WHAT", required=True)

    coco = psub.add_parser("coco", help="write one caption file per COCO image (fixes text, drops empty captions)")
    coco.add_argument("--root", required=True, help="COCO folder (with annotations/ and train2017/)")
    coco.add_argument("--split", action="append", choices=("train", "val"),
                      help="split to prepare (repeatable; default: every split whose JSON exists)")
    coco.set_defaults(func=run_coco)

    codes = psub.add_parser("codes", help="encode the config's dataset with its codec into a codes cache")
    add_config_arguments(codes)
    codes.add_argument("--out", help="cache folder (default: <run.out_dir>/codes)")
    codes.add_argument("--split", action="append", help="dataset split to encode (repeatable; default: train)")
    codes.add_argument("--batch-size", type=int, default=32, help="images per codec call (default 32)")
    codes.add_argument("--device", default="cpu", help="torch device for the codec (default cpu)")
    codes.add_argument("--no-progress", action="store_true", help="no progress bar")
    codes.set_defaults(func=run_codes)


def run_coco(args) -> int:
    from pathlib import Path

    from minidalle.components.datasets.coco import SPLITS, annotations_path, prepare_captions
    from minidalle.errors import DataError

    root = Path(args.root)
    if not root.is_dir():
        raise DataError(f"--root: folder not found: {root}")
    splits = args.split or [s for s in SPLITS if annotations_path(root, s).is_file()]
    if not splits:
        raise DataError(f"{root / 'annotations'}: no captions_train2017.json or captions_val2017.json")
    for split in splits:
        s = prepare_captions(root, split)
        print(f"{s['split']}: wrote {s['captions']} captions for {s['images']} images to {s['out']} "
              f"({s['fixed']} captions fixed, {s['empty_dropped']} empty dropped, "
              f"{s['images_without_captions']} images without captions, "
              f"{s['missing_image_files']} image files missing"
              + (f", {s['unknown_image_ids']} captions of unknown images dropped" if s["unknown_image_ids"] else "")
              + ")")
    return 0


def run_codes(args) -> int:
    from pathlib import Path

    from minidalle.api import load_config
    from minidalle.errors import ConfigError

    cfg = load_config(args.config, args.overrides)
    out = Path(args.out) if args.out else Path(cfg.run.out_dir) / "codes"
    if args.batch_size <= 0:
        raise ConfigError(f"--batch-size: expected a positive integer, got {args.batch_size}")
    for info in prepare_codes(cfg, out, splits=args.split or ["train"], batch_size=args.batch_size,
                              device=args.device, progress=not args.no_progress):
        print(f"{info['split']}: {info['count']} items, {info['fmap_size']}x{info['fmap_size']} codes "
              f"of {info['num_tokens']} -> {out / (info['split'] + '.safetensors')}")
    print(f"use it with: [dataset] name = \"codes\", path = \"{out}\"")
    return 0


def prepare_codes(cfg, out, *, splits=("train",), batch_size: int = 32, device: str = "cpu",
                  progress: bool = True, registry=None) -> list[dict]:
    """Encode ``cfg``'s dataset with ``cfg``'s codec into the cache folder ``out``."""
    from minidalle.components.datasets.codes import write_cache
    from minidalle.config import unstructure
    from minidalle.errors import ConfigError

    registry = registry or cfg.registry
    where = cfg.source or "config"
    if cfg.codec is None:
        raise ConfigError(f"{where}: codec: prepare codes needs a [codec] section")
    if cfg.dataset is None:
        raise ConfigError(f"{where}: dataset: prepare codes needs a [dataset] section")
    if cfg.dataset.name == "codes":
        raise ConfigError(f"{where}: dataset.name: already a codes cache; name the image dataset instead")
    codec = registry.get("codec", cfg.codec.name).build(cfg.codec.params)
    meta = {
        "codec": {"name": cfg.codec.name, **(unstructure(cfg.codec.params) if cfg.codec.params else {})},
        "dataset": {"name": cfg.dataset.name,
                    **(unstructure(cfg.dataset.params) if cfg.dataset.params else {})},
        "seed": cfg.run.seed,
    }
    infos = []
    for split in splits:
        dataset = registry.get("dataset", cfg.dataset.name).build(
            cfg.dataset.params, image_size=int(codec.image_size), split=split, seed=cfg.run.seed)
        infos.append(write_cache(dataset, codec, out, split, batch_size=batch_size,
                                 workers=cfg.training.dataloader_workers, device=device,
                                 meta=meta, progress=progress))
    return infos
