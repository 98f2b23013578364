"""What the DALLE-pytorch and Graphcore importers share.

Both networks are minidalle's network under other names: the same embeddings (text table
with one padding id per position, ``<bos>`` = 0, a text position table of
``text_seq_len + 1`` rows, an image table and an axial image position embedding of a row
and a column vector per cell), the same pre-norm blocks (LayerNorm, attention, optional
sandwich LayerNorm, LayerScale; LayerNorm, GEGLU feed-forward, optional sandwich LayerNorm,
LayerScale), the same final LayerNorm + Linear over text and image ids and the same logits
mask and loss. Importing is therefore a renaming of state-dict keys plus reshapes (LayerScale
``[1, 1, dim]`` -> ``[dim]``, axial embedding ``[1, f, 1, dim]`` / ``[1, 1, f, dim]`` ->
``[f, dim]``); the tests check that logits and loss come out equal.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from minidalle.errors import CheckpointError, ConfigError


@dataclass(frozen=True)
class Layout:
    """Where a source keeps each block's parts (``{i}``: the layer index)."""

    prefix: str  # before every key ("model." for Graphcore's WrappedDALLE)
    layer: str  # a layer's two LayerScale stages
    attn: str  # the attention module, below the layer
    ff: str  # the feed-forward nn.Sequential, below the layer


DALLE_PYTORCH = Layout("", "transformer.layers.layers.{i}", "0.fn.fn.fn", "1.fn.fn.net")
GRAPHCORE = Layout("model.", "transformer.layers.{i}", "0.fn.fn", "1.fn.fn.net")


def name_pairs(layout: Layout, depth: int, sandwich: bool) -> list[tuple[str, str, str]]:
    """``(minidalle key, source key, kind)`` of every weight, in DALLE-pytorch's
    ``parameters()`` order; kind says how the shape changes: ``same``, ``scale``
    (LayerScale), ``row`` / ``col`` (axial embedding)."""
    pairs = [("text_pos_emb.weight", "text_pos_emb.weight", "same"),
             ("image_pos_emb.row", "image_pos_emb.weights_0", "row"),
             ("image_pos_emb.col", "image_pos_emb.weights_1", "col")]

    def norm(ours, theirs):
        return [(f"{ours}.weight", f"{theirs}.weight", "same"), (f"{ours}.bias", f"{theirs}.bias", "same")]

    for i in range(depth):
        ours, theirs = f"transformer.layers.{i}", layout.layer.format(i=i)
        attn, ff = f"{theirs}.{layout.attn}", f"{theirs}.{layout.ff}"
        pairs += [(f"{ours}.scale_attn", f"{theirs}.0.scale", "scale"), *norm(f"{ours}.norm_attn", f"{theirs}.0.fn.norm")]
        if sandwich:
            pairs += norm(f"{ours}.post_attn_norm", f"{theirs}.0.fn.norm_out")
        pairs += [(f"{ours}.attn.to_qkv.weight", f"{attn}.to_qkv.weight", "same"),
                  *norm(f"{ours}.attn.to_out", f"{attn}.to_out.0"),
                  (f"{ours}.scale_ff", f"{theirs}.1.scale", "scale"), *norm(f"{ours}.norm_ff", f"{theirs}.1.fn.norm")]
        if sandwich:
            pairs += norm(f"{ours}.post_ff_norm", f"{theirs}.1.fn.norm_out")
        pairs += [*norm(f"{ours}.ff.proj_in", f"{ff}.0"), *norm(f"{ours}.ff.proj_out", f"{ff}.3")]
    pairs += [*norm("norm_out", "to_logits.0"), *norm("to_logits", "to_logits.1"),
              ("text_emb.weight", "text_emb.weight", "same"), ("image_emb.weight", "image_emb.weight", "same")]
    return [(o, layout.prefix + t, kind) for o, t, kind in pairs]


def to_ours(t, kind: str):
    """A source tensor in minidalle's shape (fp32)."""
    t = t.detach().float()
    if kind == "scale":
        return t.reshape(-1).contiguous()
    if kind in ("row", "col"):
        return t.reshape(-1, t.shape[-1]).contiguous()
    return t.contiguous()


def to_theirs(t, kind: str):
    """A minidalle tensor in the source's shape (for export)."""
    t = t.detach().float().contiguous()
    if kind == "scale":
        return t.view(1, 1, -1)
    if kind == "row":
        return t[None, :, None, :].contiguous()
    if kind == "col":
        return t[None, None, :, :].contiguous()
    return t.clone()


def translate_weights(weights: dict, pairs, *, ignore: tuple[str, ...], where: str) -> dict:
    """minidalle's state dict from the source's; every source key must be used or ignored."""
    import torch

    if not isinstance(weights, dict):
        raise CheckpointError(f"{where}: 'weights' is a {type(weights).__name__}, not a state dict "
                              "(a DeepSpeed checkpoint? consolidate it into one file first)")
    missing = [t for _, t, _ in pairs if t not in weights]
    if missing:
        raise CheckpointError(f"{where}: weights: no {missing[0]!r} ({len(missing)} expected keys "
                              "missing): not the layout the hparams describe")
    used = {t for _, t, _ in pairs}
    extra = [k for k in weights if k not in used and not k.startswith(ignore)]
    if extra:
        raise CheckpointError(f"{where}: weights: unexpected {extra[0]!r} ({len(extra)} keys): a "
                              "part minidalle's model does not have")
    out = {}
    for ours, theirs, kind in pairs:
        t = weights[theirs]
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{where}: weights: {theirs!r} is not a tensor")
        out[ours] = to_ours(t, kind)
    return out


def check_sizes(state: dict, model: dict, where: str) -> None:
    """The hparams agree with the weights (a mismatch means a different network)."""
    t = model["text_seq_len"]
    got = {"text_seq_len": state["text_pos_emb.weight"].shape[0] - 1,
           "num_text_tokens": state["text_emb.weight"].shape[0] - t,
           "dim": state["text_emb.weight"].shape[1],
           "heads * dim_head": state["transformer.layers.0.attn.to_qkv.weight"].shape[0] // 3,
           "ff_mult (4)": state["transformer.layers.0.ff.proj_out.weight"].shape[1] // model["dim"]}
    want = {"text_seq_len": t, "num_text_tokens": model["text_vocab"], "dim": model["dim"],
            "heads * dim_head": model["heads"] * model["dim_head"], "ff_mult (4)": 4}
    for key, value in want.items():
        if got[key] != value:
            raise CheckpointError(f"{where}: hparams say {key} = {value}, the weights {got[key]}")


def read_hparams(hp: dict, defaults: dict, where: str, unknown_key: str) -> Callable[[str], Any]:
    """Check an ``hparams`` dict (known keys only; integer ``dim`` and ``depth``) and return
    ``get(key)``: its value, or the source's default. ``unknown_key`` says what an unknown
    key is not (the error's wording)."""
    unknown = sorted(set(hp) - set(defaults) - {"dim", "depth"})
    if unknown:
        raise ConfigError(f"{where}: hparams.{unknown[0]}: {unknown_key}")
    for key in ("dim", "depth"):
        if not isinstance(hp.get(key), int):
            raise ConfigError(f"{where}: hparams.{key}: expected an integer, got {hp.get(key)!r}")
    return lambda key: hp.get(key, defaults[key])


def attn_type_list(value, depth: int, where: str) -> list[str]:
    """``attn_types`` as DALLE-pytorch reads it (a name or a sequence, cycled over depth)."""
    if value is None:
        return ["full"]
    names = [value] if isinstance(value, str) else list(value)
    if not names or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"{where}: hparams.attn_types: expected names, got {value!r}")
    for n in names:
        if n == "sparse":
            raise ConfigError(f"{where}: hparams.attn_types: 'sparse' (DeepSpeed's sparse "
                              "attention) has no minidalle counterpart")
        if n not in ("full", "axial_row", "axial_col", "conv_like"):
            raise ConfigError(f"{where}: hparams.attn_types: unknown attention type {n!r}")
    return names


def distinct_ids(value, depth: int) -> bool:
    """True when ``shared_*_ids`` shares nothing (every layer its own id)."""
    if value is None:
        return True
    ids = list(itertools.islice(itertools.cycle(value), depth))
    return len(set(ids)) == depth


# Objects of IPU libraries that Graphcore's optimizer (poptorch.optim) may leave in
# ``opt_state``: read as inert placeholders, never imported or run.
IPU_MODULES = ("poptorch", "popart", "popdist", "horovod")


class Placeholder:
    """Stands in for an object of an IPU library: keeps its arguments and state, does nothing."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state


def _unsupported_global(exc: Exception) -> str | None:
    import re

    m = re.search(r"GLOBAL ([\w.]+)", str(exc))
    return m.group(1) if m and m.group(1).split(".")[0] in IPU_MODULES else None


def torch_load(path: Path, what: str, warn: Callable[[str], None] | None = None) -> dict:
    """``torch.load(weights_only=True)`` with one-line errors. Globals of IPU libraries
    (see :data:`IPU_MODULES`) become :class:`Placeholder` objects; any other global is refused."""
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    placeholders: list[str] = []
    while True:
        stubs = [(type(name.rsplit(".", 1)[-1], (Placeholder,), {}), name) for name in placeholders]
        try:
            with torch.serialization.safe_globals(stubs):
                obj = torch.load(path, map_location="cpu", weights_only=True)
            break
        except pickle.UnpicklingError as exc:
            name = _unsupported_global(exc)
            if name and name not in placeholders and len(placeholders) < 32:
                placeholders.append(name)
                continue
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unpickling refused"
            raise CheckpointError(f"{path}: not loadable without running code from it "
                                  f"(torch.load weights_only=True): {first[:200]}") from None
        except Exception as exc:  # zip / EOF / format errors of torch.load
            raise CheckpointError(f"{path}: not a readable torch checkpoint: {exc}") from None
    if placeholders and warn is not None:
        warn(f"{len(placeholders)} IPU-library object(s) in the file read as inert placeholders "
             f"({', '.join(placeholders[:3])})")
    if not isinstance(obj, dict) or "hparams" not in obj or "weights" not in obj:
        keys = sorted(obj)[:6] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{path}: not a {what} checkpoint (expected a dict with 'hparams' and "
                              f"'weights'; found {keys})")
    if not isinstance(obj["hparams"], dict):
        raise CheckpointError(f"{path}: hparams: expected a dict, got {type(obj['hparams']).__name__}")
    return obj


# --------------------------------------------------------------------------- optimizer state


def adam_settings(opt_state) -> dict:
    """``[training]`` values (lr, betas, eps, weight_decay) of the source's first param group."""
    groups = opt_state.get("param_groups") if isinstance(opt_state, dict) else None
    if not groups or not isinstance(groups[0], dict):
        return {}
    g0, out = groups[0], {}
    for key in ("lr", "eps") + (("weight_decay",) if len(groups) == 1 else ()):
        if isinstance(g0.get(key), (int, float)) and not isinstance(g0.get(key), bool):
            out[key] = float(g0[key])
    if isinstance(g0.get("betas"), (list, tuple)) and len(g0["betas"]) == 2:
        out["betas"] = [float(b) for b in g0["betas"]]
    return out


def remap_adam_state(opt_state, source_groups: list[list[str]], pairs, our_names: list[str],
                     our_shapes: list[tuple], template: dict, warn: Callable[[str], None]) -> dict:
    """The source's Adam state in minidalle's optimizer layout.

    ``source_groups``: the source parameter names of each param group, in the order the
    source's optimizer numbered them. ``template``: minidalle's fresh optimizer state dict.
    When the state does not map one to one it is dropped with a warning and the fresh
    template is returned (training then starts a new Adam state from the imported weights).
    """
    import torch

    def drop(why: str):
        warn(f"optimizer state dropped ({why}): training continues with a fresh Adam state")
        return template

    if not isinstance(opt_state, dict) or not opt_state.get("param_groups"):
        return drop("the checkpoint has none")
    groups = opt_state["param_groups"]
    sizes = [len(g.get("params", ())) if isinstance(g, dict) else -1 for g in groups]
    if sizes != [len(s) for s in source_groups]:
        return drop(f"its param groups hold {sizes} parameters, the model's "
                    f"{[len(s) for s in source_groups]}")
    index = {}
    for g, names in zip(groups, source_groups):
        index.update(zip(names, g["params"]))
    state = opt_state.get("state") or {}
    if not state:
        return drop("it is empty")
    ours_of = {t: (o, kind) for o, t, kind in pairs}
    position = {name: i for i, name in enumerate(our_names)}
    out: dict[int, dict] = {}
    for theirs, idx in index.items():
        if theirs not in ours_of:
            return drop(f"parameter {theirs!r} has no minidalle counterpart")
        ours, kind = ours_of[theirs]
        st = state.get(idx)
        if st is None:
            continue  # never updated
        if not isinstance(st, dict) or not {"exp_avg", "exp_avg_sq", "step"} <= set(st):
            return drop(f"not Adam's (keys {sorted(st) if isinstance(st, dict) else st!r})")
        i = position[ours]
        try:
            entry = {"step": torch.tensor(float(st["step"]), dtype=torch.float32)}
        except (TypeError, ValueError, RuntimeError):
            return drop(f"the step count of {theirs!r} is not a number")
        for key, value in st.items():
            if key == "step":
                continue
            if not isinstance(value, torch.Tensor) or value.numel() != our_shapes[i].numel():
                return drop(f"{key} of {theirs!r} does not match the weight's shape")
            entry[key] = to_ours(value, kind).view(our_shapes[i])
        out[i] = entry
    return {**template, "state": out}


def source_param_order(weights: dict, ignore: tuple[str, ...]) -> list[str]:
    """The source model's parameter names in ``parameters()`` order: the state-dict order
    (the frozen codec left out; these sources have no other persistent buffers)."""
    return [k for k in weights if not k.startswith(ignore)]


# --------------------------------------------------------------------------- the run directory


@dataclass
class Imported:
    """What an importer hands to :func:`write_run`."""

    source: Path
    table: dict  # the config table (model, training, tokenizer, codec, attention)
    state_dict: dict  # minidalle's weights
    pairs: list  # name pairs (for the optimizer state)
    optimizer: Any = None  # the source's opt_state
    source_groups: list = field(default_factory=list)
    info: dict = field(default_factory=dict)


def codec_section(name: str | None, source_default: str | None, overrides, *, where: str,
                  why: str, geometry: str) -> dict:
    """The ``[codec]`` table: ``--codec NAME``, else what the source names (``vqgan``: its
    checkpoint path must be given), else a one-line error saying what to supply."""
    keys = {o.partition("=")[0].strip() for o in overrides}
    if name:
        return {"name": name}
    if "codec.name" in keys:
        return {}
    if source_default == "vqgan":
        if "codec.path" not in keys:
            raise ConfigError(f"{where}: {why}: a taming VQGAN; pass its checkpoint: "
                              "--set codec.path=PATH/last.ckpt (its model.yaml found beside it, or "
                              "--set codec.config_path=...)")
        return {"name": "vqgan"}
    raise ConfigError(f"{where}: {why}; minidalle has no codec for it: pass --codec NAME "
                      f"(see `minidalle list codec`) whose codes are {geometry}")


def tokenizer_section(name: str | None, overrides) -> dict | None:
    keys = {o.partition("=")[0].strip() for o in overrides}
    if name:
        return {"name": name}
    return {} if "tokenizer.name" in keys else None


def param_names(cfg, state: dict, registry=None) -> list[str]:
    """minidalle's parameter names in ``parameters()`` order (its optimizer's numbering)
    for the model of ``cfg`` with the image geometry of ``state``."""
    from minidalle.model import build_model

    model = build_model(cfg, text_vocab=cfg.model.text_vocab or
                        state["text_emb.weight"].shape[0] - cfg.model.text_seq_len,
                        num_image_tokens=state["image_emb.weight"].shape[0],
                        fmap_size=state["image_pos_emb.row"].shape[0], registry=registry)
    return [n for n, _ in model.named_parameters()]


def write_run(imported: Imported, out_dir: Path | str, overrides=(), *, registry=None,
              warn: Callable[[str], None] = print) -> Path:
    """Write ``out_dir`` as a minidalle run: ``checkpoints/step-00000000`` (weights, the
    resolved config, the optimizer state) and ``config.toml`` (for ``run --resume``)."""
    from minidalle.train.checkpoint import host_rng_state, list_checkpoints, save_checkpoint
    from minidalle.config import apply_overrides, config_from_dict, config_to_dict, to_toml
    from minidalle.fileio import atomic_write
    from minidalle.model import build_model
    from minidalle.train.optim import LrSchedule, build_optimizer
    from minidalle.train.pipeline import build_codec, token_factors
    from minidalle.plugin.discovery import get_registry

    registry = registry or get_registry()
    out_dir = Path(out_dir).resolve()
    if list_checkpoints(out_dir / "checkpoints") or (out_dir / "config.toml").exists():
        raise ConfigError(f"{out_dir}: already holds a run; choose another --out")
    table = dict(imported.table)
    table["run"] = {"name": out_dir.name, "out_dir": str(out_dir), "stages": ["transformer"],
                    **table.get("run", {})}
    table = apply_overrides(table, overrides, {})
    cfg = config_from_dict(table, source=f"{imported.source} (imported)", registry=registry)
    state = imported.state_dict
    num_image_tokens, fmap = state["image_emb.weight"].shape[0], state["image_pos_emb.row"].shape[0]
    if cfg.codec is not None:
        codec = build_codec(cfg, registry)
        if token_factors(codec):
            raise ConfigError(f"codec {cfg.codec.name!r}: its codes are factorised "
                              f"{token_factors(codec)}; the imported model has one image table")
        if (codec.num_tokens, codec.fmap_size) != (num_image_tokens, fmap):
            raise ConfigError(f"codec {cfg.codec.name!r}: {codec.num_tokens} codes on a "
                              f"{codec.fmap_size}x{codec.fmap_size} grid; the checkpoint's model "
                              f"takes {num_image_tokens} codes on {fmap}x{fmap}")
    model = build_model(cfg, text_vocab=cfg.model.text_vocab, num_image_tokens=num_image_tokens,
                        fmap_size=fmap, registry=registry)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = " ".join(s.strip() for s in str(exc).strip().splitlines()[:2])
        raise CheckpointError(f"{imported.source}: the weights do not fit the model of the "
                              f"mapped config: {first[:300]}") from None
    params = list(model.named_parameters())
    optimizer = build_optimizer([p for _, p in params], cfg.training)
    opt_state = remap_adam_state(imported.optimizer, imported.source_groups, imported.pairs,
                                 [n for n, _ in params], [p.shape for _, p in params],
                                 optimizer.state_dict(), warn)
    if opt_state["state"]:
        optimizer.load_state_dict(opt_state)  # fails here, not at resume, if it does not fit
    schedule = LrSchedule(optimizer, cfg.training, 1)
    training_state = {"optimizer": opt_state, "scheduler": schedule.state_dict(), "rng": host_rng_state()}
    info = {"batches_in_epoch": 0, "final": False, "imported_from": imported.info}
    save_checkpoint(out_dir / "checkpoints", step=0, model_state=model.state_dict(),
                    config=config_to_dict(cfg), training_state=training_state, info=info)
    text = f"# Imported from {imported.source} by `minidalle import`.\n" + to_toml(cfg)
    atomic_write(out_dir / "config.toml", lambda f: f.write(text.encode("utf-8")))
    return out_dir
