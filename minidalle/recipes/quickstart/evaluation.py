"""Evaluation of a quickstart-style run: does the model draw what the prompt says?

``minidalle evaluate`` (:mod:`minidalle.recipes.evaluation`, any dataset) calls
:func:`shapes_fidelity`, the ``shapes`` dataset's ``evaluate`` hook, which measures:

* **analyser accuracy**: the pixel analyser (:func:`minidalle.recipes.quickstart.analyse.
  analyse`) must recover shape, colour and position from real dataset images at least
  ``min_analyser_accuracy`` (98%) of the time, or no fidelity is reported (a DataError);
* **prompt fidelity**: the share of generated images whose shape, colour and position, as
  the analyser reads them, match the prompt's; separately for prompts of combinations seen
  in training (the ``val`` split) and of withheld ones (the ``heldout`` split, the
  combinations in ``dataset.exclude``). The analyser's score on codec reconstructions of
  the same kind of images is reported too: the best fidelity this codec allows;
* **guidance** (only for a run trained with ``training.null_caption_prob > 0``): prompt
  fidelity (seen and withheld) and the image loss of validation images under the guided
  distribution, at each of ``evaluate.cond_scales``, so a user can pick ``generate.cond_scale``;
* **reranking** (``evaluate.rerank_candidates = N`` > 0): withheld fidelity when each image
  is the best of N candidates by the ``likelihood`` reranker, beside the plain one.

This module also keeps what the evaluator and the quickstart's stages share: the loaded
run (:class:`LoadedRun`), the loss history and ``loss.png``, ``train-codec``'s codec figures.

Settings come from the config's ``[evaluate]`` table (:class:`EvaluateConfig`).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Union

import attrs

from minidalle.config import non_negative, positive, read_section
from minidalle.errors import ConfigError, DataError
from minidalle.fileio import atomic_write

SECTION = "evaluate"
METRICS_JSON = "metrics.json"
LOSS_PNG = "loss.png"
SAMPLES_PNG = "samples.png"
RECONSTRUCTIONS_PNG = "reconstructions.png"
ATTRIBUTES = ("shape", "colour", "position")  # what fidelity checks (size is reported apart)


@attrs.define
class EvaluateConfig:
    # real dataset images (val split) the analyser is checked on before anything else
    analyser_images: int = attrs.field(default=300, validator=positive)
    min_analyser_accuracy: float = attrs.field(default=0.98, validator=non_negative)
    # prompts drawn from the val split (seen combinations) and the heldout split (withheld)
    seen_prompts: int = attrs.field(default=64, validator=non_negative)
    withheld_prompts: int = attrs.field(default=64, validator=non_negative)
    images_per_prompt: int = attrs.field(default=1, validator=positive)
    batch_size: int = attrs.field(default=64, validator=positive)
    seed: Union[int, None] = None  # default: run.seed
    # the `samples` stage: rows of samples.png and images per row, reconstructions shown
    grid_seen: int = attrs.field(default=4, validator=non_negative)
    grid_withheld: int = attrs.field(default=4, validator=non_negative)
    grid_images: int = attrs.field(default=6, validator=positive)
    reconstructions: int = attrs.field(default=16, validator=positive)
    # any dataset (minidalle/recipes/evaluation.py): held-out items for the loss and the
    # codec figures; generated images for FID/KID/CLIP (0: none); their local weights
    heldout_images: int = attrs.field(default=256, validator=positive)
    fid_images: int = attrs.field(default=256, validator=non_negative)
    fid_weights: Union[str, None] = None  # torch-fidelity's Inception weights (.pth/.safetensors)
    kid_subset_size: int = attrs.field(default=100, validator=positive)
    clip_weights: Union[str, None] = None  # open_clip weights of clip_model
    clip_model: str = "ViT-B-32"
    # evaluate_grid.png: images for these prompts (default: grid_prompts held-out captions)
    prompts: list[str] = attrs.field(factory=list)
    grid_prompts: int = attrs.field(default=4, validator=non_negative)
    # classifier-free guidance scales measured (runs trained with null captions only)
    cond_scales: list[float] = attrs.field(factory=lambda: [1.0, 1.5, 2.0, 3.0])
    guided_loss_images: int = attrs.field(default=64, validator=non_negative)
    # best-of-N withheld fidelity with the likelihood reranker (0: not measured)
    rerank_candidates: int = attrs.field(default=0, validator=non_negative)
    rerank_pmi: bool = False
    # top-k of the reranking candidates (None: generate.filter_thres; greedy sampling, as
    # the quickstart's 0.999, draws 8 equal candidates)
    rerank_filter_thres: Union[float, None] = attrs.field(default=None, validator=non_negative)


def read_settings(cfg) -> EvaluateConfig:
    return read_section(cfg, SECTION, EvaluateConfig)


# --------------------------------------------------------------------------- files




def write_json(path: Path, data: dict) -> Path:
    text = json.dumps(data, indent=2) + "\n"
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


# --------------------------------------------------------------------------- the analyser


def _shapes_params(cfg):
    if cfg.dataset is None or cfg.dataset.name != "shapes":
        name = cfg.dataset.name if cfg.dataset is not None else "none"
        raise ConfigError(f"{cfg.source}: dataset.name: evaluate measures prompt fidelity with "
                          f"the shapes analyser; it needs the `shapes` dataset, got {name!r}")
    return cfg.dataset.params


def analyser_for(cfg) -> Callable:
    """``analyse(image) -> attributes or None`` for the config's shapes dataset."""
    from minidalle.recipes.quickstart.analyse import analyse

    p = _shapes_params(cfg)
    return lambda image: analyse(image, colours=p.colours, shapes=p.shapes,
                                 background=tuple(p.background))


def matches(found: dict | None, expected: dict, keys=ATTRIBUTES) -> bool:
    return found is not None and all(found.get(k) == expected[k] for k in keys)


def score(images, expected: list[dict], analyse: Callable, captions: list[str] | None = None) -> dict:
    """Share of ``images`` whose attributes match ``expected`` (all three, and each one);
    with ``captions``, also ``by_caption`` (the share right for each caption) and
    ``captions_right`` (how many captions are drawn right at least half of the time)."""
    found = [analyse(img) for img in images]
    n = max(len(expected), 1)
    right = [matches(f, e) for f, e in zip(found, expected)]
    out = {"images": len(expected), "accuracy": sum(right) / n}
    for key in (*ATTRIBUTES, "size"):
        out[key] = sum(f is not None and f.get(key) == e.get(key)
                       for f, e in zip(found, expected)) / n
    if captions is not None:
        per: dict[str, list[bool]] = {}
        for caption, ok in zip(captions, right):
            per.setdefault(caption, []).append(ok)
        out["by_caption"] = {c: round(sum(v) / len(v), 4) for c, v in per.items()}
        out["captions_right"] = sum(sum(v) * 2 >= len(v) for v in per.values())
        out["captions"] = len(per)
    return out


def dataset_split(cfg, split: str, image_size: int, registry=None):
    from minidalle.train.pipeline import build_dataset

    return build_dataset(cfg, split=split, image_size=image_size, registry=registry)


def check_analyser(cfg, image_size: int, n: int, registry=None) -> dict:
    """The analyser's score on ``n`` real images of the val split."""
    ds = dataset_split(cfg, "val", image_size, registry)
    items = [ds[i] for i in range(min(n, len(ds)))]
    return score([it["image"] for it in items], [it["attributes"] for it in items], analyser_for(cfg))


def has_withheld(cfg) -> bool:
    return bool(_shapes_params(cfg).exclude)


def prompts(cfg, split: str, n: int, image_size: int, *, distinct: bool = False,
            registry=None) -> list[dict]:
    """``n`` items (caption, attributes, image) of ``split``, balanced over its captions.

    ``val`` holds the combinations seen in training, ``heldout`` the withheld ones. The items
    are taken round-robin over the split's distinct captions (in order of first appearance),
    so each combination gets ``n / combinations`` prompts give or take one: a random draw gave
    one withheld combination 13 of 64 prompts and another 3, so one combination drawn wrong
    moved the score by 5 to 20 points depending on the draw. ``distinct``: each caption once.
    """
    if n == 0 or (split == "heldout" and not has_withheld(cfg)):
        return []
    ds = dataset_split(cfg, split, image_size, registry)
    by_caption: dict[str, list[dict]] = {}
    for i in range(len(ds)):
        item = ds[i]
        by_caption.setdefault(item["caption"], []).append(item)
    groups = list(by_caption.values())
    out = []
    for round_ in range(1 if distinct else max(map(len, groups), default=0)):
        for group in groups:
            if len(out) >= n:
                return out
            if round_ < len(group):
                out.append(group[round_])
    return out


# --------------------------------------------------------------------------- the trained run


class LoadedRun:
    """A run's final model with its config, tokenizer and codec, ready to draw images."""

    def __init__(self, run_dir, registry=None) -> None:
        import torch

        from minidalle.inference.loader import load_for_inference

        loaded = load_for_inference(run_dir, registry)
        self.checkpoint = loaded.checkpoint
        self.step = loaded.step
        self.cfg = loaded.cfg
        self.tokenizer = loaded.tokenizer
        self.codec = loaded.codec
        self.image_size = int(self.codec.image_size)
        self.model = loaded.model
        self.torch = torch

    def draw(self, captions: list[str], *, seed: int, batch_size: int = 64,
             generate=None, cond_scale: float | None = None, codes_out: list | None = None) -> "torch.Tensor":
        """uint8 images ``[N, 3, S, S]`` drawn for ``captions`` (in order); ``cond_scale``
        default: ``generate.cond_scale``; ``codes_out`` collects the sampled codes."""
        from minidalle.inference.decode import generation_precision
        from minidalle.inference.sampling import draw_images

        torch = self.torch
        g = generate or self.cfg.generate
        precision = generation_precision(g.precision)
        cast = ((lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16"
                else None)
        weight_store = "bf16" if precision == "bf16-weights" else None
        gen = torch.Generator().manual_seed(int(seed))
        if not captions:
            return torch.zeros(0, 3, self.image_size, self.image_size, dtype=torch.uint8)
        text = self.tokenizer.encode(captions, self.cfg.model.text_seq_len, truncate=True)
        images = draw_images(self.model, self.codec, text, batch_size=batch_size, generator=gen,
                             filter_thres=g.filter_thres, top_p=g.top_p, temperature=g.temperature,
                             use_cache=g.use_cache, sample_context=cast, weight_store=weight_store,
                             cond_scale=g.cond_scale if cond_scale is None else cond_scale,
                             codes_out=codes_out)
        return (images * 255).round().to(torch.uint8)

    def reconstruct(self, images) -> "torch.Tensor":
        """uint8 images through the codec (encode, decode)."""
        torch = self.torch
        with torch.no_grad():
            x = images.float() / 255
            rec = self.codec.decode(self.codec.encode(x)).float()
        return (rec.clamp(0, 1) * 255).round().to(torch.uint8)


# --------------------------------------------------------------------------- codec, losses


def codec_metrics(cfg, run: LoadedRun | None = None, registry=None) -> dict:
    """PSNR and codebook use of the run's codec (train-codec's metrics JSON, else measured)."""
    if cfg.codec is None:
        return {}
    path = getattr(cfg.codec.params, "path", None)
    if path:
        mpath = Path(path).with_name(Path(path).stem + ".metrics.json")
        if mpath.is_file():
            try:
                data = json.loads(mpath.read_text(encoding="utf-8"))
                return {k: data[k] for k in ("psnr", "usage", "perplexity", "n_embed", "num_tokens",
                                             "codebook_usage", "fmap_size", "train_seconds")
                        if k in data}
            except (OSError, ValueError):
                pass  # measured below
    if run is None:
        return {}
    import torch

    from minidalle.components.codecs.vqgan_training import psnr, usage_stats

    ds = dataset_split(cfg, "val", run.image_size, registry)
    x = torch.stack([ds[i]["image"] for i in range(min(128, len(ds)))]).float() / 255
    with torch.no_grad():
        codes = run.codec.encode(x)
        rec = run.codec.decode(codes).float()
    n = int(run.codec.num_tokens)
    usage, perplexity = usage_stats(torch.bincount(codes.flatten(), minlength=n))
    return {"psnr": round(psnr(rec, x).mean().item(), 3), "usage": round(usage, 4),
            "perplexity": round(perplexity, 2), "num_tokens": n, "fmap_size": int(run.codec.fmap_size)}


def loss_history(run_dir) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(train, val) lists of (step, loss) from the trainer's ``metrics.jsonl``."""
    from minidalle.train.trainer import load_metrics

    train, val = [], []
    for r in load_metrics(run_dir):
        if "loss" in r and "step" in r:
            train.append((int(r["step"]), float(r["loss"])))
        if "val_loss" in r and "step" in r:
            val.append((int(r["step"]), float(r["val_loss"])))
    return train, val


def loss_summary(train, val) -> dict:
    out = {"steps": train[-1][0] if train else 0}
    if train:
        tail = [l for _, l in train[-20:]]
        out["train_loss"] = round(sum(tail) / len(tail), 4)  # mean of the last 20 steps
        out["first_train_loss"] = round(train[0][1], 4)
    if val:
        out["val_loss"] = round(val[-1][1], 4)
    return out


def plot_losses(train, val, path: Path, title: str = "") -> Path:
    """``loss.png``: training loss (and its running mean) and validation loss by step."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, color="tab:blue", alpha=0.35, linewidth=0.8, label="training")
        k = max(1, len(losses) // 50)
        if k > 1:  # running mean, so the trend is visible through the noise
            smooth = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1])
                      for i in range(len(losses))]
            ax.plot(steps, smooth, color="tab:blue", linewidth=1.5, label=f"training (mean of {k})")
    if val:
        steps, losses = zip(*val)
        ax.plot(steps, losses, "o-", color="tab:orange", markersize=3, linewidth=1.5,
                label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    values = [l for _, l in train + val]
    if values and min(values) > 0 and max(values) / min(values) > 5:
        ax.set_yscale("log")  # a loss falling over decades
    ax.set_title(title or "loss")
    ax.grid(True, alpha=0.3)
    if train or val:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no losses recorded", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    try:
        return atomic_write(Path(path), lambda f: fig.savefig(f, format="png"))
    finally:
        plt.close(fig)


# --------------------------------------------------------------------------- the whole thing


def shapes_fidelity(ctx) -> dict:
    """The ``shapes`` dataset's own metrics (its ``evaluate`` hook, see
    :mod:`minidalle.recipes.evaluation`): the analyser check on real images, then prompt
    fidelity on seen and withheld combinations with the codec ceiling beside it."""
    import torch

    run, ev, cfg, seed = ctx.run, ctx.settings, ctx.cfg, ctx.seed
    check = check_analyser(run.cfg, run.image_size, ev.analyser_images, ctx.registry)
    if check["accuracy"] < ev.min_analyser_accuracy:
        raise DataError(f"the shapes analyser recovers only {check['accuracy']:.1%} of "
                        f"{check['images']} real images (needs {ev.min_analyser_accuracy:.0%}): "
                        "prompt fidelity would not mean anything at this image size")
    fidelity = {}
    for group, split, n in (("seen", "val", ev.seen_prompts), ("withheld", "heldout", ev.withheld_prompts)):
        items = prompts(run.cfg, split, n, run.image_size, registry=ctx.registry)
        if not items:
            continue
        captions = [it["caption"] for it in items for _ in range(ev.images_per_prompt)]
        expected = [it["attributes"] for it in items for _ in range(ev.images_per_prompt)]
        t = time.perf_counter()
        images = run.draw(captions, seed=seed + (0 if group == "seen" else 1), batch_size=ev.batch_size,
                          generate=cfg.generate)
        # per caption for the withheld group only: there it is one line per combination
        result = score(images, expected, analyser_for(run.cfg),
                       captions if group == "withheld" else None)
        result["prompts"] = len(items)
        result["seconds"] = round(time.perf_counter() - t, 1)
        # the best this codec allows: the analyser on reconstructions of real images
        recon = run.reconstruct(torch.stack([it["image"] for it in items]))
        result["codec_ceiling"] = score(recon, [it["attributes"] for it in items],
                                        analyser_for(run.cfg))["accuracy"]
        fidelity[group] = result
    out = {"analyser": check, "fidelity": fidelity}
    factors = getattr(run.codec, "token_factors", None)
    if factors and len(factors) == 2 and hasattr(run.codec, "image_size"):
        from minidalle.recipes.quickstart.codec_factors import factor_report

        params = _shapes_params(run.cfg)
        out["codec_factors"] = factor_report(run.codec, params.colours, params.shapes, params.sizes[0])
    if run.cfg.training.null_caption_prob > 0 and ev.cond_scales:
        out["guidance"] = guidance_table(run, cfg, ev, seed, ctx.registry, ctx.log)
    if ev.rerank_candidates > 0:
        out["rerank"] = rerank_fidelity(run, cfg, ev, seed, ctx.registry)
    return out


def _fidelity_at(run, cfg, ev, seed, registry, cond_scale) -> dict:
    out = {}
    for group, split, n in (("seen", "val", ev.seen_prompts), ("withheld", "heldout", ev.withheld_prompts)):
        items = prompts(run.cfg, split, n, run.image_size, registry=registry)
        if not items:
            continue
        captions = [it["caption"] for it in items for _ in range(ev.images_per_prompt)]
        expected = [it["attributes"] for it in items for _ in range(ev.images_per_prompt)]
        images = run.draw(captions, seed=seed + (0 if group == "seen" else 1), batch_size=ev.batch_size,
                          generate=cfg.generate, cond_scale=cond_scale)
        out[group] = round(score(images, expected, analyser_for(run.cfg))["accuracy"], 4)
    return out


def guided_image_loss(run, items, cond_scale: float, batch_size: int) -> float:
    """Mean cross entropy (nats per code) of the images of ``items`` under the guided
    distribution at ``cond_scale``."""
    import torch

    from minidalle.inference.sampling import image_log_likelihood

    total, count = 0.0, 0
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        text = run.tokenizer.encode([it["caption"] for it in chunk], run.cfg.model.text_seq_len,
                                    truncate=True)
        with torch.no_grad():
            codes = run.codec.encode(torch.stack([it["image"] for it in chunk]).float() / 255)
            total -= image_log_likelihood(run.model, text, codes, cond_scale=cond_scale).sum().item()
        count += codes.numel()
    return total / max(count, 1)


def guidance_table(run, cfg, ev, seed, registry, log) -> dict:
    """``{cond_scale: {"seen", "withheld", "image_loss"}}`` for ``evaluate.cond_scales``."""
    items = prompts(run.cfg, "val", ev.guided_loss_images, run.image_size, registry=registry)
    table = {}
    for s in ev.cond_scales:
        row = _fidelity_at(run, cfg, ev, seed, registry, float(s))
        if items:
            row["image_loss"] = round(guided_image_loss(run, items, float(s), ev.batch_size), 4)
        table[f"{float(s):g}"] = row
    return table


def rerank_fidelity(run, cfg, ev, seed, registry) -> dict:
    """Withheld (else seen) fidelity of the best of ``rerank_candidates`` by likelihood,
    against the first candidate alone (a plain sample with the same settings)."""
    import torch

    from minidalle.components.rerankers.likelihood import LikelihoodConfig, LikelihoodReranker

    n = ev.rerank_candidates
    split, group = ("heldout", "withheld") if has_withheld(run.cfg) else ("val", "seen")
    items = prompts(run.cfg, split, ev.withheld_prompts if group == "withheld" else ev.seen_prompts,
                    run.image_size, registry=registry)
    if not items:
        return {}
    reranker = LikelihoodReranker(LikelihoodConfig(pmi=ev.rerank_pmi))
    reranker.bind(model=run.model, tokenizer=run.tokenizer, codec=run.codec)
    captions = [it["caption"] for it in items for _ in range(n)]
    codes = []
    g = cfg.generate
    if ev.rerank_filter_thres is not None:
        g = attrs.evolve(g, filter_thres=ev.rerank_filter_thres)
    images = run.draw(captions, seed=seed + 2, batch_size=ev.batch_size, generate=g, codes_out=codes)
    codes = torch.cat(codes)
    scores = reranker.score(captions, codes=codes).view(len(items), n)
    best = scores.argmax(1)
    images = images.view(len(items), n, *images.shape[1:])
    expected = [it["attributes"] for it in items]
    analyse = analyser_for(run.cfg)
    return {"group": group, "candidates": n, "pmi": ev.rerank_pmi, "prompts": len(items),
            "filter_thres": g.filter_thres, "cond_scale": g.cond_scale,
            "first": round(score(images[:, 0], expected, analyse)["accuracy"], 4),
            "reranked": round(score(images[torch.arange(len(items)), best], expected, analyse)["accuracy"], 4)}


def summary_lines(metrics: dict) -> list[str]:
    """The shapes lines of the summary (analyser check, prompt fidelity)."""
    lines = []
    a = metrics.get("analyser", {})
    if a:
        lines.append(f"analyser on {a['images']} real images: {a['accuracy']:.1%}")
    for group, r in metrics.get("fidelity", {}).items():
        lines.append(f"prompt fidelity ({group} combinations): {r['accuracy']:.1%} of {r['images']} "
                     f"images (shape {r['shape']:.0%}, colour {r['colour']:.0%}, position "
                     f"{r['position']:.0%}; codec ceiling {r['codec_ceiling']:.0%})")
        if "by_caption" in r:
            wrong = [f"{c!r} {v:.0%}" for c, v in r["by_caption"].items() if v < 0.5]
            lines.append(f"  {group} combinations drawn right: {r['captions_right']} of {r['captions']}"
                         + (f" (wrong: {', '.join(wrong)})" if wrong else ""))
    f = metrics.get("codec_factors")
    if f:
        lines.append(f"codec factors: a shape's codes the same in every cell {f['same_codes_in_every_cell']:.0%}, "
                     f"outline codes colour-blind {f['outline_same_across_colours']:.0%}, "
                     f"one colour code per colour: {'yes' if f['one_code_per_colour'] else 'no'}")
    for s, row in metrics.get("guidance", {}).items():
        parts = [f"{g} {row[g]:.1%}" for g in ("seen", "withheld") if g in row]
        if "image_loss" in row:
            parts.append(f"image loss {row['image_loss']:.4f}")
        lines.append(f"cond_scale {s}: fidelity " + ", ".join(parts))
    r = metrics.get("rerank", {})
    if r:
        lines.append(f"likelihood{' (pmi)' if r['pmi'] else ''} reranking, best of {r['candidates']} "
                     f"({r['group']}): {r['reranked']:.1%} vs {r['first']:.1%} for one sample")
    return lines
