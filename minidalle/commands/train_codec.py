"""``minidalle train-codec CONFIG``: train a small VQGAN codec on the config's dataset."""
from __future__ import annotations


def add_parser(sub) -> None:
    from minidalle.cli import add_config_arguments

    p = sub.add_parser(
        "train-codec", help="train a VQGAN image codec on the config's [dataset]",
        description="Train a VQGAN-architecture codec (taming-transformers modules) on the "
                    "config's [dataset] with the settings of its [codec_training] table, and "
                    "save it in taming's format (.ckpt + .yaml) for the `vqgan` codec, with "
                    "held-out PSNR and codebook usage in <stem>.metrics.json.")
    add_config_arguments(p)
    p.add_argument("--out", metavar="CKPT",
                   help="where to write the .ckpt (default: codec_training.out, else "
                        "<run.out_dir>/codec/vqgan.ckpt)")
    p.set_defaults(func=run)


def run(args) -> int:
    import json

    from minidalle.components.codecs.vqgan_training import train_codec
    from minidalle.api import load_config

    overrides = list(args.overrides)
    if args.out:
        overrides.append("codec_training.out=" + json.dumps(args.out))  # a TOML string
    cfg = load_config(args.config, overrides)
    train_codec(cfg, log=lambda line: print(line, flush=True))
    return 0
