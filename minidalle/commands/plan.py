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
MACHINES = {4: "one IPU-M2000", 16: "an IPU-POD16", 64: "an IPU-POD64", 256: "an IPU-POD256"}


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


def _mb(n: float) -> str:
    return f"{n / 1e6:,.0f}"


def _component(spec) -> str:
    return spec.name if spec is not None else "-"


def plan_dict(cfg, plan, sizes) -> dict:
    import attrs

    out = attrs.asdict(plan, recurse=True)
    for stage, obj in zip(out["stages"], plan.stages):
        stage["memory_bytes"] = obj.memory_bytes
        stage["over_memory"] = obj.over_memory
    out["components"] = {k: _component(getattr(cfg, k)) for k in
                         ("tokenizer", "codec", "dataset", "backend")}
    out["sizes"] = sizes
    return out


def render(cfg, plan, sizes, notes) -> str:
    from minidalle.components.backends.ipu.plan import IPU_MEMORY_BYTES

    lines = [f"Config: {cfg.source}"]
    vocab, tokens, fmap = sizes["text_vocab"], sizes["num_image_tokens"], sizes["fmap_size"]
    lines.append(
        f"Components: tokenizer {_component(cfg.tokenizer)} ({vocab:,} ids), codec "
        f"{_component(cfg.codec)} ({tokens:,} codes, {fmap}x{fmap}), dataset "
        f"{_component(cfg.dataset)}, backend {cfg.backend.name}, attention "
        f"{', '.join(dict.fromkeys(cfg.model.attn_types))}")
    m = cfg.model
    lines.append(f"Model: dim {m.dim}, depth {m.depth}, heads {m.heads} x {m.dim_head}, "
                 f"text {m.text_seq_len} + image {fmap * fmap} tokens")
    for note in notes:
        lines.append(f"  note: {note}")
    total = plan.total_ipus
    where = f" ({MACHINES[total]})" if total in MACHINES else ""
    lines.append(f"IPUs: {plan.replication_factor} replica(s) x {plan.ipus_per_replica} IPU(s) = "
                 f"{total} IPU(s){where}"
                 + (f", {plan.requested_ipus} reserved" if plan.requested_ipus != total else ""))
    lines.append(
        f"Samples per step: {plan.samples_per_step:,} = batch_size {plan.micro_batch_size} x "
        f"gradient_accumulation {plan.gradient_accumulation} x replication_factor "
        f"{plan.replication_factor} x device_iterations {plan.device_iterations}")
    if plan.steps_per_epoch is not None:
        lines.append(f"Steps per epoch: {plan.steps_per_epoch:,} ({plan.dataset_size:,} samples"
                     f"; {cfg.training.epochs} epochs = "
                     f"{plan.steps_per_epoch * cfg.training.epochs:,} steps)")
    else:
        lines.append("Steps per epoch: unknown (pass --dataset-size N)")
    if cfg.backend.name != "ipu":
        lines.append(f"Backend {cfg.backend.name!r} is not the IPU: planned on one IPU per "
                     "replica with the IPU defaults (set [backend] name = \"ipu\" and its keys "
                     "to plan a pipeline)")
    prec = "fp16" if plan.fp16 else "fp32"
    extras = [n for n, on in (("half partials", plan.half_partials),
                              ("stochastic rounding", plan.stochastic_rounding),
                              ("automatic loss scaling", plan.automatic_loss_scaling)) if on]
    lines.append(f"Precision: {prec} weights" + "".join(f", {e}" for e in extras)
                 + f"; loss scaling {plan.loss_scaling:g}")
    lines.append(
        f"Optimizer: {plan.optimizer} lr {plan.lr:g}; gradient accumulators {plan.accum_dtype}, "
        f"moments {plan.first_order_momentum_dtype}/{plan.second_order_momentum_dtype}"
        + ("; state sharded across replicas (RTS)" if plan.enable_rts else "")
        + ("; state off-chip" if plan.optimizer_state_offchip else ""))
    if plan.embedding_serialization_factor > 1:
        f = plan.embedding_serialization_factor
        lines.append(f"Serialization: text embedding ({plan.text_rows:,} rows) and output "
                     f"projection ({plan.logits_dim:,} logits) in {f} pieces")
    props = ", ".join(f"{k} {v:g}" for k, v in plan.available_memory_proportion.items())
    lines.append(f"Available memory proportion: {props}")
    loader = f"{plan.dataloader_mode}, {plan.dataloader_workers} workers"
    if plan.rebatched_worker_size:
        loader += f", worker batch {plan.rebatched_worker_size}"
    lines.append(f"Data loader: poptorch.DataLoader {loader}")
    lines.append(f"Executable cache: {plan.executable_cache_dir or 'off'}")
    lines.append("")
    blocks_by_ipu: dict[int, list[str]] = {}
    for b in plan.blocks:
        blocks_by_ipu.setdefault(b.ipu, []).append(f"{b.name}@{b.module}")
    rows = [("IPU", "HOLDS", "BLOCKS START AT", "PARAMS", "WEIGHTS MB", "OPT STATE MB", "TOTAL MB",
             f"OF {IPU_MEMORY_BYTES // 10**6} MB")]
    for s in plan.stages:
        rows.append((str(s.ipu), ", ".join(s.parts) or "-", ", ".join(blocks_by_ipu.get(s.ipu, [])) or "-",
                     f"{s.params:,}", _mb(s.weight_bytes), _mb(s.optimizer_bytes),
                     _mb(s.memory_bytes),
                     f"{100 * s.memory_bytes / IPU_MEMORY_BYTES:.0f}%" + (" !" if s.over_memory else "")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    lines.append("(estimate per IPU of each replica: weights, gradient accumulators and Adam "
                 "moments; activations, code and exchange buffers come on top)")
    lines.append("")
    lines.append("Checks:")
    lines.extend(f"  ok  {c}" for c in plan.checks)
    if plan.warnings:
        lines.append("Warnings:")
        lines.extend(f"  !   {w}" for w in plan.warnings)
    return "\n".join(lines)


def run(args) -> int:
    from minidalle.api import load_config
    from minidalle.components.backends.ipu.plan import build_plan

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
