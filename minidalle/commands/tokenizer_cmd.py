"""`minidalle tokenizer train CONFIG --vocab-size N --out FILE`: a youtokentome model from
the captions of the config's dataset (every caption of every item, images not decoded).

``--vocab-size`` and ``--out`` default to ``[tokenizer_training] vocab_size / out`` and then
to ``tokenizer.path`` when the config's tokenizer is ``yttm``.
"""
from __future__ import annotations


def add_parser(sub):
    from minidalle.cli import add_config_arguments

    p = sub.add_parser("tokenizer", help="train a tokenizer from a dataset's captions")
    tsub = p.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    train = tsub.add_parser("train", help="train a youtokentome BPE model on the dataset's captions")
    add_config_arguments(train)
    train.add_argument("--vocab-size", type=int, help="vocabulary size (ids incl. pad/unk/bos/eos)")
    train.add_argument("--out", help="model file to write (default: tokenizer.path of the config)")
    train.add_argument("--split", default="train", help="dataset split to read (default train)")
    train.set_defaults(func=run)


def run(args) -> int:
    from minidalle.config import load_config
    from minidalle.errors import ConfigError

    cfg = load_config(args.config, args.overrides)
    table = cfg.extra.get("tokenizer_training", {})
    vocab_size = args.vocab_size or table.get("vocab_size")
    out = args.out or table.get("out")
    if out is None and cfg.tokenizer is not None and cfg.tokenizer.name == "yttm":
        out = cfg.tokenizer.params.path
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size <= 0:
        raise ConfigError(f"--vocab-size: expected a positive integer (or tokenizer_training.vocab_size "
                          f"in the config), got {vocab_size!r}")
    if not out:
        raise ConfigError("--out: where to write the model (or tokenizer.path with name = \"yttm\")")
    tok, count = train_tokenizer(cfg, vocab_size=vocab_size, out=out, split=args.split)
    print(f"trained on {count} captions: {tok.vocab_size} ids -> {out}")
    return 0


def train_tokenizer(cfg, *, vocab_size: int, out, split: str = "train", registry=None):
    """Train a yttm model on ``cfg``'s dataset captions; returns (tokenizer, caption count)."""
    from minidalle.components.tokenizers.yttm import train
    from minidalle.errors import ConfigError
    from minidalle.plugin.discovery import get_registry

    registry = registry or get_registry()
    if cfg.dataset is None:
        raise ConfigError(f"{cfg.source or 'config'}: dataset: tokenizer training needs a [dataset] section")
    # Captions do not depend on the image size; use the codec's when the config states it.
    image_size = getattr(cfg.codec.params, "image_size", None) if cfg.codec else None
    dataset = registry.get("dataset", cfg.dataset.name).build(
        cfg.dataset.params, image_size=image_size or 256, split=split, seed=cfg.run.seed)
    count = 0

    def counted():
        nonlocal count
        for caption in dataset.captions():
            count += 1
            yield caption

    tok = train(counted(), vocab_size, out)
    return tok, count
