"""Graphcore's mini DALL-E checkpoints (``output/ckpt/dalle_<epoch>.pt``) into minidalle.

Graphcore's ``train.py`` (graphcore/examples, ``multimodal/mini_dalle/pytorch``) saves
``{'hparams', 'vae_params' (None), 'epoch', 'weights', 'opt_state', 'scheduler_state'}``;
``weights`` is the state dict of its ``WrappedDALLE``, whose ``model`` is a DALL-E derived
from DALLE-pytorch 1.0: keys ``model.text_emb.weight`` (or
``model.text_emb.split_embeddings.<k>.weight`` with ``embedding_serialization_factor`` > 1),
``model.image_emb.weight``, ``model.text_pos_emb.weight``, ``model.image_pos_emb.weights_0/1``,
``model.transformer.layers.<i>.0.scale``, ``.0.fn.norm.*``, ``.0.fn.norm_out.*`` (sandwich),
``.0.fn.fn.to_qkv.weight``, ``.0.fn.fn.to_out.0.*``, ``.1.scale``, ``.1.fn.norm.*``,
``.1.fn.norm_out.*``, ``.1.fn.fn.net.0.*``, ``.1.fn.fn.net.3.*``, ``model.to_logits.0.*``,
``model.to_logits.1.*``; ``model.vae.*`` (the VQGAN) is not read. Its conv_like window is
centred on the query. The VAE is always a taming VQGAN (``--vqgan_model_path``). The IPU
placement (``layers_per_ipu``, ``embedding_ipu_id``, ``cls_ipu_id``,
``embedding_serialization_factor``, ``fp16``) becomes ``[backend] name = "ipu"``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import re

from minidalle.errors import CheckpointError, ConfigError
from minidalle.interop import mapping

FORMAT = "graphcore"
# models/pipeline_dalle.py WrappedDALLE.__init__ defaults.
DEFAULTS = dict(num_text_tokens=10000, text_seq_len=256, heads=8, dim_head=64, attn_dropout=0.0,
                ff_dropout=0.0, sparse_attn=False, attn_types=None, loss_img_weight=7,
                sandwich_norm=False, embedding_ipu_id=0, embedding_serialization_factor=1,
                layers_per_ipu=None, cls_ipu_id=None, fp16=False, byteio=False)
# Placement and precision on IPUs: no effect on the function; they become the keys of
# minidalle's `[backend] name = "ipu"` (see ipu_backend).
IPU_ONLY = ("embedding_ipu_id", "embedding_serialization_factor", "layers_per_ipu", "cls_ipu_id", "fp16")


def ipu_backend(hp: dict) -> dict | None:
    """Graphcore's pipeline placement as minidalle's ``[backend] name = "ipu"`` keys, or None
    when the hparams hold no ``layers_per_ipu``."""
    layers = hp.get("layers_per_ipu")
    if not isinstance(layers, (list, tuple)) or not layers:
        return None
    table = {"name": "ipu", "ipus_per_replica": len(layers), "layers_per_ipu": [int(n) for n in layers],
             "embedding_ipu": int(hp.get("embedding_ipu_id") or 0),
             "embedding_serialization_factor": int(hp.get("embedding_serialization_factor") or 1),
             "fp16": bool(hp.get("fp16"))}
    if hp.get("cls_ipu_id") is not None:
        table["output_ipu"] = int(hp["cls_ipu_id"])
    return table


def model_table(hp: dict, where: str) -> tuple[dict, dict]:
    get = mapping.read_hparams(hp, DEFAULTS, where, "not an argument of Graphcore's WrappedDALLE this importer knows")
    if get("sparse_attn"):
        raise ConfigError(f"{where}: hparams.sparse_attn = {get('sparse_attn')!r}: sparse attention, "
                          "which minidalle's model does not have")
    attn_types = mapping.attn_type_list(get("attn_types"), hp["depth"], where)
    model = {"dim": hp["dim"], "depth": hp["depth"], "heads": get("heads"), "dim_head": get("dim_head"),
             "text_seq_len": get("text_seq_len"), "text_vocab": get("num_text_tokens"),
             "attn_types": attn_types, "loss_img_weight": float(get("loss_img_weight")), "ff_mult": 4,
             "attn_dropout": float(get("attn_dropout")), "ff_dropout": float(get("ff_dropout")),
             "sandwich_norm": bool(get("sandwich_norm")), "byteio": bool(get("byteio"))}
    attention = {"conv_like": {"kernel_size": 5, "dilation": 1, "anchor": "centre"}} \
        if "conv_like" in attn_types else {}
    return model, attention


def _layout(weights: dict) -> mapping.Layout:
    """``model.``-prefixed keys (WrappedDALLE), or the inner DALLE's own state dict."""
    if any(k.startswith("model.") for k in weights):
        return mapping.GRAPHCORE
    return mapping.Layout("", *mapping.GRAPHCORE[1:])


def _join_text_embedding(weights: dict, prefix: str) -> dict:
    """SerializedEmbedding's ``split_embeddings.<k>.weight`` -> one ``text_emb.weight``."""
    pattern = re.compile(re.escape(prefix) + r"text_emb\.split_embeddings\.(\d+)\.weight$")
    parts = {int(m.group(1)): v for k, v in weights.items() if (m := pattern.match(k))}
    if not parts:
        return weights
    import torch

    out = {k: v for k, v in weights.items() if not pattern.match(k)}
    out[prefix + "text_emb.weight"] = torch.cat([parts[i] for i in sorted(parts)])
    return out


def read(path: Path | str, *, tokenizer: str | None = None, codec: str | None = None,
         backend: str | None = None, overrides=(), warn: Callable[[str], None] = print) -> mapping.Imported:
    path = Path(path)
    obj = mapping.torch_load(path, "Graphcore mini DALL-E", warn)
    hp, weights, where = obj["hparams"], obj["weights"], str(path)
    if not isinstance(weights, dict):
        raise CheckpointError(f"{path}: 'weights' is a {type(weights).__name__}, not a state dict")
    if any(k.startswith("transformer.layers.layers.") for k in weights):
        raise CheckpointError(f"{path}: DALLE-pytorch's key layout; use `minidalle import dalle-pytorch`")
    model, attention = model_table(hp, where)
    layout = _layout(weights)
    serialized = any(".split_embeddings." in k for k in weights)
    weights = _join_text_embedding(weights, layout.prefix)
    pairs = mapping.name_pairs(layout, model["depth"], model["sandwich_norm"])
    state = mapping.translate_weights(weights, pairs, ignore=(layout.prefix + "vae.",), where=where)
    mapping.check_sizes(state, model, where)
    f, n = state["image_pos_emb.row"].shape[0], state["image_emb.weight"].shape[0]
    if hp.get("fp16"):
        warn("hparams.fp16 is on: the weights are read as fp32 ([backend] ipu keeps fp16 = true)")
    table = {"model": model, "training": mapping.adam_settings(obj.get("opt_state")),
             "codec": mapping.codec_section(codec, "vqgan", overrides, where=where,
                                            why="Graphcore's example encodes images with",
                                            geometry=f"{n} codes on a {f}x{f} grid")}
    tok = mapping.tokenizer_section(tokenizer, overrides)
    if tok is not None:
        table["tokenizer"] = tok
    if attention:
        table["attention"] = attention
    ipu = ipu_backend(hp)
    if backend is not None and (ipu is None or backend != "ipu"):
        table["backend"] = {"name": backend}  # the IPU placement belongs to the ipu backend
    elif ipu is not None:
        table["backend"] = ipu
    # get_optimizer (models/optimization.py): group 0 = parameters of 2+ dimensions,
    # group 1 = 1-D parameters, each in parameters() order.
    order = mapping.source_param_order(weights, (layout.prefix + "vae.",))
    groups = [[k for k in order if weights[k].dim() >= 2], [k for k in order if weights[k].dim() < 2]]
    opt = obj.get("opt_state")
    if serialized and opt:
        warn("optimizer state dropped (embedding_serialization_factor > 1: the text table was "
             "split): training continues with a fresh Adam state")
        opt = None
    info = {"format": FORMAT, "path": str(path.resolve()), "epoch": obj.get("epoch"),
            "ipu_settings": {k: hp[k] for k in IPU_ONLY if k in hp}}
    return mapping.Imported(source=path, table=table, state_dict=state, pairs=pairs, optimizer=opt,
                            source_groups=groups, info=info)


def import_checkpoint(path, out_dir, *, tokenizer=None, codec=None, backend=None, overrides=(),
                      registry=None, warn: Callable[[str], None] = print) -> Path:
    imported = read(path, tokenizer=tokenizer, codec=codec, backend=backend, overrides=overrides, warn=warn)
    return mapping.write_run(imported, out_dir, overrides, registry=registry, warn=warn)
