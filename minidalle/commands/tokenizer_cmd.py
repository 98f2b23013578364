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
    from minidalle.api import get_registry, load_config
    from minidalle.components.tokenizers.training import default_output, read_settings, train_tokenizer
    from minidalle.errors import ConfigError

    registry = get_registry()
    cfg = load_config(args.config, args.overrides, registry=registry)
    settings = read_settings(cfg)
    vocab_size = args.vocab_size or settings.vocab_size
    out = args.out or settings.out or default_output(cfg)
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size <= 0:
        raise ConfigError(f"--vocab-size: expected a positive integer (or tokenizer_training.vocab_size "
                          f"in the config), got {vocab_size!r}")
    if not out:
        raise ConfigError("--out: where to write the model (or tokenizer.path with name = \"yttm\")")
    tok, count = train_tokenizer(cfg, vocab_size=vocab_size, out=out, split=args.split,
                                 registry=registry)
    print(f"trained on {count} captions: {tok.vocab_size} ids -> {out}")
    return 0
