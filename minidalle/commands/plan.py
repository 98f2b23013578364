"""`minidalle plan CONFIG`: the IPU plan of a config, without PopTorch or an IPU.

Prints the resolved components, the pipeline placement with parameters and an estimate of
weight + optimizer-state memory per IPU (against the 900 MB of a Mk2 IPU), the samples per
step, the steps per epoch and the checks. Sizes come from the tokenizer, codec and dataset
when their files are there; otherwise from ``--text-vocab``/``--dataset-size`` or, for the
recipe's own components, the recipe's numbers (printed as assumed).
"""
from __future__ import annotations

import json

# The recipe's sizes, used only when the component's files are missing (and said so).
RECIPE_TEXT_VOCAB = {"yttm": 8192, "clip": 49409}
# taming's ImageNet f16-1024 VQGAN (vqgan_imagenet_f16_1024/configs/model.yaml).
RECIPE_VQGAN = dict(
    ddconfig=dict(double_z=False, z_channels=256, resolution=256, in_channels=3, out_ch=3,
                  ch=128, ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2, attn_resolutions=[16],
                  dropout=0.0),
    n_embed=1024, embed_dim=256)


def add_parser(sub):
    from minidalle.cli import add_config_arguments

    p = sub.add_parser("plan", help="show the IPU pipeline plan, batch arithmetic and checks",
                       description="Show how a config runs on IPUs: components, pipeline "
                       "placement and memory per IPU, samples per step, steps per epoch, checks. "
                       "Needs no PopTorch.")
    add_config_arguments(p)
    p.add_argument("--dataset-size", type=int, metavar="N",
                   help="number of training samples (default: the dataset's length, if it loads)")
    p.add_argument("--text-vocab", type=int, metavar="N",
                   help="text vocabulary size (default: model.text_vocab or the tokenizer's)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def _note_error(exc: Exception) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def resolve_text_vocab(cfg, given, notes):
    from minidalle.errors import ConfigError, MinidalleError

    if given:
        return given, "given"
    if cfg.model.text_vocab:
        return cfg.model.text_vocab, "model.text_vocab"
    if cfg.tokenizer is None:
        raise ConfigError(f"{cfg.source}: tokenizer: missing section; pass --text-vocab N")
    from minidalle.train.pipeline import build_tokenizer

    try:
        return build_tokenizer(cfg).vocab_size, "tokenizer"
    except MinidalleError as exc:
        planned = cfg.extra.get("tokenizer_training", {}).get("vocab_size")
        if cfg.tokenizer.name == "yttm" and isinstance(planned, int):
            notes.append(f"tokenizer not trained yet ({_note_error(exc)}): the "
                         f"[tokenizer_training] vocabulary of {planned} ids")
            return planned, "tokenizer_training"
        if cfg.tokenizer.name in RECIPE_TEXT_VOCAB:
            notes.append(f"tokenizer not loaded ({_note_error(exc)}): assumed the recipe's "
                         f"{RECIPE_TEXT_VOCAB[cfg.tokenizer.name]} ids")
            return RECIPE_TEXT_VOCAB[cfg.tokenizer.name], "assumed"
        raise ConfigError(f"{_note_error(exc)} (or pass --text-vocab N)") from None


def _encoder_params(codec) -> int:
    """Parameters of what runs to encode images (the decoder is not used in training)."""
    names = ("encoder", "quant_conv", "quantize", "colour_encoder", "structure_encoder",
             "structure_quant_conv", "structure_quantize")
    parts = [getattr(codec, n) for n in names if hasattr(codec, n)]
    if parts:
        return sum(p.numel() for part in parts for p in part.parameters())
    return sum(p.numel() for p in codec.parameters())


def resolve_codec(cfg, notes):
    """(num_image_tokens, fmap_size, encoder parameter count, source)."""
    from minidalle.errors import ConfigError, MinidalleError

    if cfg.codec is not None:
        from minidalle.train.pipeline import build_codec

        try:
            codec = build_codec(cfg)
            return int(codec.num_tokens), int(codec.fmap_size), _encoder_params(codec), "codec"
        except MinidalleError as exc:
            if cfg.codec.name != "vqgan":
                raise
            import torch

            from minidalle.components.codecs.vqgan import VQGAN

            if "codec_training" in cfg.extra:  # a codec stage will train it
                from minidalle.components.codecs.vqgan_training import read_settings

                ct = read_settings(cfg)
                shape = dict(ddconfig=ct.ddconfig(), n_embed=ct.n_embed, embed_dim=ct.embed_dim,
                             structure=ct.structure())
                note, source = "the VQGAN [codec_training] will train", "codec_training"
            else:
                shape = RECIPE_VQGAN
                note, source = "assumed the recipe's ImageNet f16-1024 VQGAN", "assumed"
            with torch.device("meta"):  # shapes only, no memory, no weights
                codec = VQGAN(**shape)
            notes.append(f"codec not loaded ({_note_error(exc)}): {note}")
            return codec.num_tokens, codec.fmap_size, _encoder_params(codec), source
    try:
        from minidalle.train.pipeline import build_dataset, image_geometry

        tokens, fmap = image_geometry(None, build_dataset(cfg))
        return tokens, fmap, 0, "dataset"
    except MinidalleError as exc:
        raise ConfigError(f"{cfg.source}: codec: cannot tell the image vocabulary: "
                          f"{_note_error(exc)}") from None


def resolve_dataset_size(cfg, given, notes):
    from minidalle.errors import MinidalleError

    if given is not None:
        return given, "given"
    if cfg.dataset is None:
        notes.append("no [dataset]: pass --dataset-size N for steps per epoch")
        return None, None
    from minidalle.train.pipeline import build_dataset

    try:
        n = len(build_dataset(cfg))
    except MinidalleError as exc:
        notes.append(f"dataset not loaded ({_note_error(exc)}): pass --dataset-size N "
                     "for steps per epoch")
        return None, None
    if cfg.training.val_fraction:
        n -= max(1, int(round(n * cfg.training.val_fraction)))
    return n, "dataset"


def run(args) -> int:
    from minidalle.api import load_config
    from minidalle.components.backends.ipu.plan import build_plan
    from minidalle.components.backends.ipu.report import plan_dict, render

    cfg = load_config(args.config, args.overrides)
    notes: list[str] = []
    text_vocab, vocab_src = resolve_text_vocab(cfg, args.text_vocab, notes)
    tokens, fmap, codec_params, codec_src = resolve_codec(cfg, notes)
    size, size_src = resolve_dataset_size(cfg, args.dataset_size, notes)
    plan = build_plan(cfg, text_vocab=text_vocab, num_image_tokens=tokens, fmap_size=fmap,
                      dataset_size=size, codec_params=codec_params)
    sizes = {"text_vocab": text_vocab, "text_vocab_from": vocab_src, "num_image_tokens": tokens,
             "fmap_size": fmap, "codec_from": codec_src, "codec_params": codec_params,
             "dataset_size": size, "dataset_size_from": size_src}
    if args.json:
        out = plan_dict(cfg, plan, sizes)
        out["notes"] = notes
        print(json.dumps(out, indent=2))
    else:
        print(render(cfg, plan, sizes, notes))
    return 0
