"""DALLE-pytorch's ``dalle.pt`` (as its ``train_dalle.py`` saves it) in and out of minidalle.

The file is a dict: ``hparams`` (the ``DALLE(...)`` keyword arguments), ``vae_params``
(``DiscreteVAE`` arguments, or None for a pretrained VAE), ``vae_class_name``, ``version``,
``epoch``, ``weights`` (``dalle.state_dict()``, the frozen VAE under ``vae.``), ``opt_state``
(its ``Adam`` over the trainable parameters) and ``scheduler_state``. Verified against
DALLE-pytorch 1.6.6 (``tests/test_interop_dalle_pytorch.py`` runs the original).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from minidalle.errors import CheckpointError, ConfigError
from minidalle.interop import mapping

FORMAT = "dalle-pytorch"
# DALLE.__init__'s defaults (1.6.6) for keys an hparams dict may leave out.
DEFAULTS = dict(num_text_tokens=10000, text_seq_len=256, heads=8, dim_head=64, reversible=False,
                attn_dropout=0.0, ff_dropout=0.0, sparse_attn=False, attn_types=None,
                loss_img_weight=7, stable=False, sandwich_norm=False, shift_tokens=True,
                rotary_emb=True, shared_attn_ids=None, shared_ff_ids=None,
                share_input_output_emb=False, optimize_for_inference=False)
# What minidalle's model does not have: hparams key -> (is it on?, what it is).
UNSUPPORTED = {
    "reversible": "reversible layers",
    "sparse_attn": "DeepSpeed sparse attention",
    "stable": "the 'stable' variant (DivideMax on the output, stable softmax)",
    "shift_tokens": "token shifting",
    "rotary_emb": "rotary position embeddings",
}
IGNORED = ("vae.",)  # the frozen VAE: the codec comes from [codec]
CONV_CORNER_SINCE = (1, 5, 0)  # SparseConvCausalAttention pads causally from 1.5.0 on


def _version(value) -> tuple[int, ...] | None:
    try:
        return tuple(int(p) for p in str(value).split(".")[:3])
    except ValueError:
        return None


def _shown_by_weights(key: str, weights) -> bool | None:
    """Whether the weights show a feature whose hparams key is absent (checkpoints of
    versions before the key existed): rotary embeddings keep a ``transformer.pos_emb``
    buffer, token shifting wraps every layer twice more."""
    if not isinstance(weights, dict):
        return None
    if key == "rotary_emb":
        return "transformer.pos_emb" in weights
    if key == "shift_tokens":
        return any(".fn.fn.fn.fn." in k for k in weights)
    return None


def model_table(hp: dict, version, where: str, weights=None) -> tuple[dict, dict]:
    """(``[model]``, ``[attention]``) of an hparams dict; refuses what minidalle lacks."""
    get = mapping.read_hparams(hp, DEFAULTS, where, "not a DALLE-pytorch 1.6.6 DALLE argument this importer knows")
    for key, what in UNSUPPORTED.items():
        shown = None if key in hp else _shown_by_weights(key, weights)
        on = get(key) if shown is None else shown
        if on:
            value = f"= {get(key)!r}" if key in hp else "(absent: on by default, and the weights show it)"
            raise ConfigError(f"{where}: hparams.{key} {value}: {what}, which minidalle's model "
                              f"does not have (train with {key} off to import)")
    depth = hp["depth"]
    for key in ("shared_attn_ids", "shared_ff_ids"):
        if not mapping.distinct_ids(get(key), depth):
            raise ConfigError(f"{where}: hparams.{key} = {get(key)!r}: layers sharing weights, "
                              "which minidalle's model does not have")
    attn_types = mapping.attn_type_list(get("attn_types"), depth, where)
    model = {"dim": hp["dim"], "depth": depth, "heads": get("heads"), "dim_head": get("dim_head"),
             "text_seq_len": get("text_seq_len"), "text_vocab": get("num_text_tokens"),
             "attn_types": attn_types, "loss_img_weight": float(get("loss_img_weight")),
             "ff_mult": 4, "attn_dropout": float(get("attn_dropout")),
             "ff_dropout": float(get("ff_dropout")), "sandwich_norm": bool(get("sandwich_norm"))}
    attention = {}
    if "conv_like" in attn_types:
        v = _version(version)
        anchor = "corner" if v is None or v >= CONV_CORNER_SINCE else "centre"
        attention["conv_like"] = {"kernel_size": 5, "dilation": 1, "anchor": anchor}
    return model, attention


def _untie(weights: dict, hp: dict) -> dict:
    """``share_input_output_emb``: the embeddings are rows of ``to_logits.1.weight``; give
    minidalle its own copies (the same function; fine-tuning then trains them apart)."""
    w = weights["to_logits.1.weight"]
    rows = hp.get("num_text_tokens", DEFAULTS["num_text_tokens"]) + hp.get("text_seq_len", DEFAULTS["text_seq_len"])
    out = {k: v for k, v in weights.items() if not k.startswith(("text_emb.", "image_emb."))}
    out["text_emb.weight"], out["image_emb.weight"] = w[:rows].clone(), w[rows:].clone()
    return out


def _codec_source(obj) -> tuple[str | None, str]:
    """(codec name minidalle has for the source's VAE or None, how the source names it)."""
    cls, params = obj.get("vae_class_name"), obj.get("vae_params")
    if cls == "VQGanVAE":
        return "vqgan", "vae_class_name 'VQGanVAE'"
    if params is not None:
        return None, f"vae_params: a DALLE-pytorch DiscreteVAE ({_short(params)})"
    if cls:
        return None, f"vae_class_name {cls!r}"
    return None, "vae_params is None (OpenAI's dVAE or a VQGAN, the file does not say which)"


def _short(params) -> str:
    if not isinstance(params, dict):
        return repr(params)[:60]
    keys = ("num_tokens", "num_layers", "image_size")
    return ", ".join(f"{k}={params[k]}" for k in keys if k in params)


def read(path: Path | str, *, tokenizer: str | None = None, codec: str | None = None,
         backend: str | None = None, overrides=(), warn: Callable[[str], None] = print) -> mapping.Imported:
    """The minidalle config table and weights of a DALLE-pytorch checkpoint."""
    path = Path(path)
    obj = mapping.torch_load(path, "DALLE-pytorch", warn)
    hp, weights, where = obj["hparams"], obj["weights"], str(path)
    if isinstance(weights, dict) and any(k.startswith("model.transformer.") for k in weights):
        raise CheckpointError(f"{path}: its weights are under 'model.': Graphcore's mini DALL-E "
                              "format; use `minidalle import graphcore`")
    model, attention = model_table(hp, obj.get("version"), where, weights)
    shared = bool(hp.get("share_input_output_emb"))
    if shared and isinstance(weights, dict):
        weights = _untie(weights, hp)
    pairs = mapping.name_pairs(mapping.DALLE_PYTORCH, model["depth"], model["sandwich_norm"])
    state = mapping.translate_weights(weights, pairs, ignore=IGNORED, where=where)
    mapping.check_sizes(state, model, where)
    default_codec, why = _codec_source(obj)
    f, n = state["image_pos_emb.row"].shape[0], state["image_emb.weight"].shape[0]
    table = {"model": model,
             "training": {"optimizer": "adam", **mapping.adam_settings(obj.get("opt_state"))},
             "codec": mapping.codec_section(codec, default_codec, overrides, where=where, why=why,
                                            geometry=f"{n} codes on a {f}x{f} grid")}
    tok = mapping.tokenizer_section(tokenizer, overrides)
    if tok is not None:
        table["tokenizer"] = tok
    if attention:
        table["attention"] = attention
    if backend is not None:
        table["backend"] = {"name": backend}
    opt = obj.get("opt_state")
    if shared and opt:
        warn("optimizer state dropped (share_input_output_emb: one table in DALLE-pytorch, "
             "two in minidalle): training continues with a fresh Adam state")
        opt = None
    groups = [mapping.source_param_order(weights, IGNORED)]
    info = {"format": FORMAT, "path": str(path.resolve()), "version": obj.get("version"),
            "epoch": obj.get("epoch"), "vae_class_name": obj.get("vae_class_name")}
    return mapping.Imported(source=path, table=table, state_dict=state, pairs=pairs, optimizer=opt,
                            source_groups=groups, info=info)


def import_checkpoint(path, out_dir, *, tokenizer=None, codec=None, backend=None, overrides=(),
                      registry=None, warn: Callable[[str], None] = print) -> Path:
    imported = read(path, tokenizer=tokenizer, codec=codec, backend=backend, overrides=overrides, warn=warn)
    return mapping.write_run(imported, out_dir, overrides, registry=registry, warn=warn)


# --------------------------------------------------------------------------- export


def export_run(run_dir, out_path, *, registry=None, warn: Callable[[str], None] = print) -> Path:
    """Write a minidalle run's newest checkpoint as a DALLE-pytorch ``dalle.pt``.

    Only a network DALLE-pytorch 1.6.6 can build is exported: attention full, axial_row,
    axial_col or conv_like with its fixed 5x5 corner window; one image table; ff_mult 4.
    The optimizer state is written when it is Adam's over all parameters.
    """
    import torch

    from minidalle.train.checkpoint import load_checkpoint
    from minidalle.fileio import atomic_write

    ck = load_checkpoint(run_dir, registry=registry)
    cfg, where = ck.config, str(ck.path)
    m = cfg.model
    for name in m.attn_types:
        if name not in ("full", "axial_row", "axial_col", "conv_like"):
            raise ConfigError(f"{where}: model.attn_types: {name!r} has no DALLE-pytorch counterpart")
    conv = cfg.attention.get("conv_like")
    if conv is not None and (conv.kernel_size, conv.dilation, conv.anchor) != (5, 1, "corner"):
        raise ConfigError(f"{where}: attention.conv_like: DALLE-pytorch 1.6.6 has only kernel_size 5, "
                          "dilation 1, anchor \"corner\"")
    if m.ff_mult != 4:
        raise ConfigError(f"{where}: model.ff_mult = {m.ff_mult}: DALLE-pytorch's is 4")
    state = ck.state_dict
    if "image_emb.weight" not in state:
        raise ConfigError(f"{where}: factorised image codes have no DALLE-pytorch counterpart")
    text_vocab = state["text_emb.weight"].shape[0] - m.text_seq_len
    pairs = mapping.name_pairs(mapping.DALLE_PYTORCH, m.depth, m.sandwich_norm)
    extra = set(state) - {o for o, _, _ in pairs}
    if extra:
        raise ConfigError(f"{where}: weight {sorted(extra)[0]!r} has no DALLE-pytorch counterpart")
    # name_pairs lists DALLE-pytorch's parameters() order: its Adam numbering
    weights = {t: mapping.to_theirs(state[o], kind) for o, t, kind in pairs}
    order = list(weights)
    hparams = dict(num_text_tokens=text_vocab, text_seq_len=m.text_seq_len, dim=m.dim, depth=m.depth,
                   heads=m.heads, dim_head=m.dim_head, reversible=False,
                   loss_img_weight=m.loss_img_weight, attn_types=tuple(m.attn_types),
                   ff_dropout=m.ff_dropout, attn_dropout=m.attn_dropout, stable=False,
                   sandwich_norm=m.sandwich_norm, shift_tokens=False, rotary_emb=False,
                   shared_attn_ids=None, shared_ff_ids=None, share_input_output_emb=False)
    codec = cfg.codec.name if cfg.codec is not None else None
    if codec != "vqgan":
        warn(f"codec {codec!r}: DALLE-pytorch has no counterpart; load the file with the VAE its "
             "codes belong to (vae_params is None, vae_class_name left out)")
    obj = {"hparams": hparams, "vae_params": None, "epoch": int(ck.meta.get("epoch", 0)),
           "version": "1.6.6", "weights": weights,
           "opt_state": _their_optimizer(ck, pairs, order, mapping.param_names(cfg, state, registry), warn),
           "scheduler_state": None}
    if codec == "vqgan":
        obj["vae_class_name"] = "VQGanVAE"
    out_path = Path(out_path)
    atomic_write(out_path, lambda f: torch.save(obj, f))
    return out_path


def _their_optimizer(ck, pairs, order, ours, warn):
    """minidalle's Adam state renumbered in DALLE-pytorch's parameter order (or None);
    ``ours``: minidalle's parameter names in ``parameters()`` order."""
    ts = ck.training_state or {}
    opt = ts.get("optimizer")
    if not opt or not opt.get("state"):
        return None
    groups = opt.get("param_groups", [])
    if len(groups) != 1 or len(groups[0].get("params", ())) != len(ours):
        warn("optimizer state left out: not one Adam group over all parameters")
        return None
    theirs_of = {o: (t, kind) for o, t, kind in pairs}
    position = {t: i for i, t in enumerate(order)}
    state = {}
    for i, entry in opt["state"].items():
        t, kind = theirs_of[ours[int(i)]]
        state[position[t]] = {k: (v.clone() if k == "step" else mapping.to_theirs(v, kind))
                              for k, v in entry.items()}
    g = {k: v for k, v in groups[0].items() if k != "params"}
    g.update(params=list(range(len(order))), fused=None, foreach=None)  # DALLE-pytorch's choice
    return {"state": state, "param_groups": [g]}
