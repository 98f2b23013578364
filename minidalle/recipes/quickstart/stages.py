"""The quickstart's stages besides ``transformer``: ``codec``, ``tokenizer``, ``samples`` and
``evaluate``, registered through the ``minidalle_stages`` hook by
:mod:`minidalle.plugin.builtins` (which names the functions here as lazy strings).

* ``codec``: trains a VQ codec as ``[codec_training]`` says (``minidalle/components/codecs/vqgan_training.py``)
  and writes it where ``[codec] path`` points (unless ``codec_training.out`` says otherwise),
  so the later stages load it through the ``vqgan`` codec.
* ``tokenizer``: trains a youtokentome BPE model on the training captions of ``[dataset]``
  (``[tokenizer_training] vocab_size``) and writes it to ``[tokenizer] path``.
* ``samples``: ``samples.png`` (images drawn for held-out prompts, the prompt above each
  row; rows of withheld combinations say so) and ``reconstructions.png`` (codec input
  beside its output).
* ``evaluate``: ``metrics.json`` and ``loss.png`` (see ``minidalle/recipes/quickstart/evaluation.py``) and a
  short summary.

Every output is written to a temporary file and renamed, so a stage is either complete or
runs again.
"""
from __future__ import annotations

from pathlib import Path

import attrs

from minidalle.errors import ConfigError
from minidalle.recipes.stages import StageContext

# --------------------------------------------------------------------------- codec


def _codec_settings(cfg):
    """(codec_training settings with ``out`` resolved, the checkpoint path)."""
    from minidalle.components.codecs.vqgan_training import SECTION, output_path, read_settings

    ct = read_settings(cfg)
    target = getattr(cfg.codec.params, "path", None) if cfg.codec is not None else None
    if cfg.codec is None or cfg.codec.name != "vqgan" or not target:
        raise ConfigError(f"{cfg.source}: codec: the codec stage trains a `vqgan` codec; the "
                          "config needs [codec] name = \"vqgan\" with the path it should write")
    if ct.out and Path(ct.out) != Path(target):
        raise ConfigError(f"{cfg.source}: {SECTION}.out: {ct.out!r} differs from codec.path "
                          f"{target!r}; the transformer stage would not find the codec")
    ct = attrs.evolve(ct, out=str(target))
    if cfg.codec.params.config_path:
        raise ConfigError(f"{cfg.source}: codec.config_path: leave it out for a codec the codec "
                          "stage trains (its YAML is written beside the checkpoint)")
    return ct, output_path(cfg, ct)


def _codec_files(ctx: StageContext) -> list[Path]:
    _, ckpt = _codec_settings(ctx.cfg)
    return [ckpt, ckpt.with_suffix(".yaml"), ckpt.with_name(ckpt.stem + ".metrics.json"),
            ckpt.with_name(ckpt.stem + ".recon.png")]


def run_codec(ctx: StageContext) -> None:
    import copy

    from minidalle.components.codecs.vqgan_training import SECTION, train_codec

    ct, ckpt = _codec_settings(ctx.cfg)
    cfg = copy.copy(ctx.cfg)
    cfg.extra = {**ctx.cfg.extra, SECTION: {**ctx.cfg.extra.get(SECTION, {}), "out": str(ckpt)}}
    train_codec(cfg, registry=ctx.registry, log=ctx.log)


def codec_complete(ctx: StageContext) -> bool:
    # the metrics JSON is written after the checkpoint: its presence means the stage finished
    return all(p.exists() for p in _codec_files(ctx)[:3])


def clean_codec(ctx: StageContext) -> None:
    for p in _codec_files(ctx):
        p.unlink(missing_ok=True)


# --------------------------------------------------------------------------- tokenizer


def _tokenizer_target(cfg):
    """(tokenizer_training settings, the model path the stage writes: [tokenizer] path)."""
    from minidalle.components.tokenizers.training import SECTION, default_output, read_settings

    tt = read_settings(cfg)
    target = default_output(cfg)
    if target is None:
        raise ConfigError(f"{cfg.source}: tokenizer: the tokenizer stage trains a `yttm` model; "
                          "the config needs [tokenizer] name = \"yttm\" with the path to write")
    if tt.out and Path(tt.out) != Path(target):
        raise ConfigError(f"{cfg.source}: {SECTION}.out: {tt.out!r} differs from tokenizer.path "
                          f"{target!r}; the transformer stage would not find the tokenizer")
    return tt, Path(target)


def run_tokenizer(ctx: StageContext) -> None:
    from minidalle.components.tokenizers.training import STAGE_VOCAB_SIZE, train_tokenizer
    from minidalle.train.pipeline import build_dataset

    tt, path = _tokenizer_target(ctx.cfg)
    tok, _ = train_tokenizer(ctx.cfg, vocab_size=tt.vocab_size or STAGE_VOCAB_SIZE, out=path,
                                 registry=ctx.registry, split=tt.split, image_size=8)
    ds = build_dataset(ctx.cfg, split=tt.split, image_size=8, registry=ctx.registry)
    longest = max(len(ids) for ids in tok.bpe.encode(list(_sample(ds.captions(), 2000))))
    ctx.log(f"tokenizer: {tok.vocab_size} ids trained on {len(ds)} captions -> {path} "
            f"(longest caption: {longest} tokens; model.text_seq_len = {ctx.cfg.model.text_seq_len})")


def _sample(it, n):
    for i, x in enumerate(it):
        if i >= n:
            break
        yield x


def tokenizer_complete(ctx: StageContext) -> bool:
    return _tokenizer_target(ctx.cfg)[1].exists()


def clean_tokenizer(ctx: StageContext) -> None:
    _tokenizer_target(ctx.cfg)[1].unlink(missing_ok=True)


# --------------------------------------------------------------------------- samples


def _upscale(images, size: int):
    """Nearest-neighbour upscaling so that 32 px images are visible in a grid."""
    import torch.nn.functional as F

    factor = max(1, size // images.shape[-1])
    if factor == 1:
        return images
    return F.interpolate(images.float(), scale_factor=factor, mode="nearest").round().byte()


def run_samples(ctx: StageContext) -> None:
    import torch

    from minidalle.recipes.quickstart import evaluation as ev
    from minidalle.images import make_grid, save_png

    cfg = ctx.cfg
    settings = ev.read_settings(cfg)
    run = ev.LoadedRun(ctx.out_dir, ctx.registry)
    size = run.image_size
    show = max(96, size)
    rows, labels = [], []
    if cfg.generate.prompts:  # the user's own prompts
        groups = [(p, "") for p in cfg.generate.prompts]
    else:
        groups = [(it["caption"], "") for it in ev.prompts(cfg, "val", settings.grid_seen, size,
                                                            distinct=True, registry=ctx.registry)]
        groups += [(it["caption"], "  [withheld: never seen in training]")
                   for it in ev.prompts(cfg, "heldout", settings.grid_withheld, size, distinct=True,
                                        registry=ctx.registry)]
    captions = [c for c, _ in groups for _ in range(settings.grid_images)]
    seed = cfg.run.seed if settings.seed is None else settings.seed
    images = run.draw(captions, seed=seed, batch_size=settings.batch_size, generate=cfg.generate)
    for i, (caption, note) in enumerate(groups):
        rows.append(_upscale(images[i * settings.grid_images:(i + 1) * settings.grid_images], show))
        labels.append(caption + note)
    path = save_png(make_grid(rows, labels), ctx.out_dir / ev.SAMPLES_PNG)
    ctx.log(f"samples: {len(images)} images for {len(groups)} prompts -> {path}")

    # reconstructions: pairs (input, output) side by side, 4 pairs a row
    real = ev.dataset_split(cfg, "val", size, ctx.registry)
    x = torch.stack([real[i]["image"] for i in range(min(settings.reconstructions, len(real)))])
    rec = run.reconstruct(x)
    # each cell: input | output, joined by a thin grey line; 4 pairs a row
    a, b = _upscale(x, show), _upscale(rec, show)
    line = torch.full((len(x), 3, a.shape[2], 2), 128, dtype=torch.uint8)
    pairs = torch.cat([a, line, b], dim=3)
    per_row = 4
    rows = [pairs[i:i + per_row] for i in range(0, len(pairs), per_row)]
    labels = ["codec input | output (held-out images)"] + [""] * (len(rows) - 1)
    path = save_png(make_grid(rows, labels, pad=8), ctx.out_dir / ev.RECONSTRUCTIONS_PNG)
    ctx.log(f"samples: {len(x)} codec reconstructions -> {path}")


def samples_files(ctx):
    from minidalle.recipes.quickstart import evaluation as ev

    return [ctx.out_dir / ev.SAMPLES_PNG, ctx.out_dir / ev.RECONSTRUCTIONS_PNG]


# --------------------------------------------------------------------------- evaluate


def run_evaluate(ctx: StageContext) -> None:
    from minidalle.recipes.quickstart.evaluation import evaluate_run

    evaluate_run(ctx.out_dir, cfg=ctx.cfg, registry=ctx.registry, log=ctx.log)


def evaluate_files(ctx):
    from minidalle.recipes.quickstart import evaluation as ev

    return [ctx.out_dir / ev.LOSS_PNG, ctx.out_dir / ev.METRICS_JSON]
