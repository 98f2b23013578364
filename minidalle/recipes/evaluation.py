"""``minidalle evaluate RUN_DIR`` for any dataset.

From the run's final checkpoint and the config stored in it, on held-out data (the
dataset's ``val`` split when it has one, else the items ``training.val_fraction`` kept out
of training, else, said so in ``heldout.source``, the training items):

* ``heldout_loss``: text and image loss (cross entropy, nats) and bits per image token;
* ``codec``: PSNR and SSIM of codec reconstructions, codebook use and perplexity (plus the
  figures ``train-codec`` recorded, under ``train_codec``); a ``codes`` dataset has no
  images, so only codebook use and perplexity of its codes;
* ``fid``: FID and KID (torchmetrics) of images generated for held-out captions against
  the real held-out images, through the Inception weights of ``evaluate.fid_weights``;
* ``clip``: CLIP score (open_clip) with the weights of ``evaluate.clip_weights``;
* ``grid``: ``evaluate_grid.png``, images drawn for ``evaluate.prompts`` (default: held-out
  captions);
* the component's own metrics: a dataset (or codec) registered with ``evaluate=fn`` adds
  ``fn(ctx)`` under its name (the shapes dataset: prompt fidelity);
* ``loss``: the last training and validation losses of ``metrics.jsonl`` (``loss.png``).

What cannot be measured (no weights, no package, no images) is ``{"skipped": reason}`` and
is printed with how to enable it. Everything goes into ``metrics.json``.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from minidalle.errors import MinidalleError

GRID_PNG = "evaluate_grid.png"
# metrics.json keys of the evaluator itself; a component's evaluate hook adds other keys
RESERVED = {"run_dir", "checkpoint", "step", "dataset", "heldout", "heldout_loss", "codec", "fid",
            "clip", "grid", "loss", "seconds"}


@dataclass
class HeldOut:
    dataset: Any
    indices: list[int]
    source: str  # where the items come from, for metrics.json

    def items(self, n: int) -> list[dict]:
        return [self.dataset[i] for i in self.indices[:n]]


@dataclass
class EvalContext:
    """What a component's ``evaluate(ctx)`` hook gets."""

    cfg: Any  # the config whose [evaluate]/[generate] settings apply
    run: Any  # minidalle.recipes.quickstart.evaluation.LoadedRun: run.cfg, draw(), reconstruct()
    settings: Any  # EvaluateConfig
    heldout: HeldOut
    seed: int
    registry: Any = None
    log: Callable[[str], None] = print


def heldout_data(cfg, image_size: int, registry=None) -> HeldOut:
    from minidalle.recipes.quickstart.evaluation import dataset_split
    from minidalle.train.trainer import split_indices

    try:
        ds = dataset_split(cfg, "val", image_size, registry)
        if len(ds):
            return HeldOut(ds, list(range(len(ds))), "the dataset's val split")
    except (MinidalleError, OSError, ValueError):
        pass  # this dataset has no val split
    ds = dataset_split(cfg, "train", image_size, registry)
    _, val = split_indices(len(ds), cfg.training.val_fraction, cfg.run.seed)
    if val:
        return HeldOut(ds, val, "training.val_fraction of the train split")
    return HeldOut(ds, list(range(len(ds))), "the train split (no held-out data: the figures "
                                             "flatter the model)")


def _codes_of(run, items: list[dict]) -> torch.Tensor:
    if "codes" in items[0]:
        return torch.stack([it["codes"] for it in items]).long()
    x = torch.stack([it["image"] for it in items]).float() / 255
    with torch.no_grad():
        return run.codec.encode(x).long()


def heldout_loss(run, held: HeldOut, n: int, batch_size: int) -> dict:
    """Text and image cross entropy of the model on ``n`` held-out items."""
    import torch.nn.functional as F

    model, t = run.model, run.cfg.model.text_seq_len
    totals, count = {"text": 0.0, "image": 0.0}, 0
    items = held.items(n)
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        text = run.tokenizer.encode([it["caption"] for it in chunk], t, truncate=True)
        codes = _codes_of(run, chunk)
        with torch.no_grad():
            seq = torch.cat([model.prepare_text(text), codes], dim=1)[:, :model.max_positions]
            hn = model.norm_out(model.hidden(seq))
            lt = F.cross_entropy(model.text_logits_raw(hn[:, :t]).flatten(0, 1).float(),
                                 seq[:, 1:t + 1].flatten())
            li = F.cross_entropy(model.image_logits_raw(hn[:, t:]).flatten(0, 1).float(),
                                 codes.flatten())
        totals["text"] += lt.item() * len(chunk)
        totals["image"] += li.item() * len(chunk)
        count += len(chunk)
    if not count:
        return {"skipped": "no held-out items"}
    text, image = totals["text"] / count, totals["image"] / count
    w = run.cfg.model.loss_img_weight
    return {"items": count, "text_loss": round(text, 4), "image_loss": round(image, 4),
            "loss": round((text + w * image) / (w + 1), 4),
            "bits_per_image_token": round(image / math.log(2), 4)}


def codec_quality(run, held: HeldOut, n: int) -> dict:
    """PSNR, SSIM, codebook use and perplexity of the codec on ``n`` held-out items."""
    from minidalle.components.codecs.vqgan_training import psnr, usage_stats
    from minidalle.plugin.registry import module_missing
    from minidalle.recipes.image_metrics import ssim
    from minidalle.recipes.quickstart.evaluation import codec_metrics

    out: dict = {}
    items = held.items(n)
    if items:
        codes = _codes_of(run, items)
        num = int(run.codec.num_tokens)
        usage, perplexity = usage_stats(torch.bincount(codes.flatten(), minlength=num))
        out.update({"images": len(items), "usage": round(usage, 4), "perplexity": round(perplexity, 2),
                    "num_tokens": num, "fmap_size": int(run.codec.fmap_size)})
        if "image" in items[0]:
            x = torch.stack([it["image"] for it in items]).float() / 255
            with torch.no_grad():
                rec = run.codec.decode(codes).float().clamp(0, 1)
            out["psnr"] = round(psnr(rec, x).mean().item(), 3)
            if module_missing("torchmetrics"):
                out["ssim"] = None
                out["skipped"] = "SSIM: needs torchmetrics (pip install 'minidalle[eval]')"
            else:
                out["ssim"] = round(ssim(rec, x), 4)
        else:
            out["psnr"] = out["ssim"] = None
            out["skipped"] = "PSNR and SSIM: the dataset holds image codes, not images"
    trained = {k: v for k, v in codec_metrics(run.cfg).items()}  # train-codec's own JSON
    if trained:
        out["train_codec"] = trained
    return out


def _fid_features(ev, injected):
    if injected is not None:
        return injected, None
    if not ev.fid_weights:
        from minidalle.recipes.image_metrics import FID_HOWTO

        return None, "no evaluate.fid_weights: " + FID_HOWTO
    from minidalle.plugin.registry import module_missing

    missing = [m for m in ("torchmetrics", "torch_fidelity") if module_missing(m)]
    if missing:
        return None, f"needs {', '.join(missing)} (pip install 'minidalle[eval]')"
    from minidalle.recipes.image_metrics import inception_features

    return inception_features(ev.fid_weights), None


def real_images(run, items: list[dict]) -> tuple[torch.Tensor, str]:
    """uint8 held-out images, or (codes datasets) their codes decoded by the codec."""
    if "image" in items[0]:
        return torch.stack([it["image"] for it in items]), "held-out images"
    with torch.no_grad():
        rec = run.codec.decode(_codes_of(run, items)).float().clamp(0, 1)
    return (rec * 255).round().to(torch.uint8), "held-out codes decoded by the codec"


def grid(run, ev, held: HeldOut, seed: int, generate, out: Path) -> dict:
    from minidalle.images import make_grid, save_png

    prompts = list(ev.prompts)
    source = "evaluate.prompts"
    if not prompts:
        source = "held-out captions"
        for it in held.items(max(ev.grid_prompts * 20, ev.grid_prompts)):
            if it["caption"] not in prompts:
                prompts.append(it["caption"])
            if len(prompts) >= ev.grid_prompts:
                break
    if not prompts:
        return {"skipped": "no prompts"}
    k = ev.grid_images
    images = run.draw([p for p in prompts for _ in range(k)], seed=seed + 2,
                      batch_size=ev.batch_size, generate=generate)
    factor = max(1, 96 // images.shape[-1])
    if factor > 1:
        images = images.repeat_interleave(factor, -1).repeat_interleave(factor, -2)
    rows = [images[i * k:(i + 1) * k] for i in range(len(prompts))]
    path = save_png(make_grid(rows, prompts), out)
    return {"path": str(path), "prompts": prompts, "prompt_source": source, "images_per_prompt": k}


def evaluate_run(run_dir, *, cfg=None, registry=None, log: Callable[[str], None] = print,
                 fid_features=None) -> dict:
    """Evaluate the run in ``run_dir``; write ``metrics.json`` and ``loss.png``; return metrics.

    ``cfg``: the config whose ``[evaluate]`` / ``[generate]`` settings apply (default: the
    checkpoint's). ``fid_features``: a feature extractor for FID/KID instead of the
    Inception of ``evaluate.fid_weights`` (see :func:`minidalle.recipes.image_metrics.fid_kid`).
    """
    from minidalle.plugin.discovery import get_registry
    from minidalle.recipes.image_metrics import CLIP_HOWTO, clip_score, fid_kid
    from minidalle.recipes.quickstart import evaluation as qe

    run_dir = Path(run_dir)
    start = time.perf_counter()
    run = qe.LoadedRun(run_dir, registry)
    cfg = cfg or run.cfg
    ev = qe.read_settings(cfg)
    from minidalle.commands.generate import check_guidance

    check_guidance(run.cfg, cfg.generate.cond_scale, run.checkpoint)  # guidance needs null captions
    seed = cfg.run.seed if ev.seed is None else ev.seed
    registry = registry or getattr(run.cfg, "registry", None) or get_registry()
    metrics: dict = {"run_dir": str(run_dir), "checkpoint": str(run.checkpoint), "step": run.step,
                     "dataset": run.cfg.dataset.name if run.cfg.dataset else None}
    held = heldout_data(run.cfg, run.image_size, registry)
    metrics["heldout"] = {"source": held.source, "items": len(held.indices)}
    ctx = EvalContext(cfg=cfg, run=run, settings=ev, heldout=held, seed=seed, registry=registry,
                      log=log)

    # a component's own metrics first (shapes: its analyser check may refuse the run)
    for kind in ("dataset", "codec"):
        spec = getattr(run.cfg, kind)
        hook = registry.get(kind, spec.name).evaluate if spec is not None else None
        if hook is not None:
            from minidalle.plugin.registry import resolve

            extra = resolve(hook)(ctx)
            clash = sorted(set(extra) & (set(metrics) | RESERVED))
            if clash:
                raise ValueError(f"{kind} {spec.name!r}: its evaluate hook returned keys that "
                                 f"minidalle evaluate uses itself: {', '.join(clash)}")
            metrics.update(extra)

    metrics["heldout_loss"] = heldout_loss(run, held, ev.heldout_images, ev.batch_size)
    metrics["codec"] = codec_quality(run, held, ev.heldout_images)

    needs_fake = ev.fid_images > 0
    features, fid_skip = (None, "evaluate.fid_images = 0") if not needs_fake else _fid_features(ev, fid_features)
    clip_skip = None if ev.clip_weights else "no evaluate.clip_weights: " + CLIP_HOWTO
    fake = captions = None
    if needs_fake and (features is not None or clip_skip is None):
        items = held.items(ev.fid_images)
        captions = [it["caption"] for it in items]
        t = time.perf_counter()
        fake = run.draw(captions, seed=seed + 3, batch_size=ev.batch_size, generate=cfg.generate)
        gen_secs = round(time.perf_counter() - t, 1)
    if features is not None:
        real, what = real_images(run, held.items(ev.fid_images))
        metrics["fid"] = {**fid_kid(real, fake, features, kid_subset_size=ev.kid_subset_size),
                          "real": what, "features": "inception" if fid_features is None
                          else type(fid_features).__name__, "generate_seconds": gen_secs}
    else:
        metrics["fid"] = {"skipped": fid_skip}
    if clip_skip is None and fake is not None:
        metrics["clip"] = clip_score(captions, fake, weights=ev.clip_weights, model_name=ev.clip_model)
    else:
        metrics["clip"] = {"skipped": clip_skip or "evaluate.fid_images = 0 (the images it scores)"}

    metrics["grid"] = grid(run, ev, held, seed, cfg.generate, run_dir / GRID_PNG) \
        if ev.grid_prompts or ev.prompts else {"skipped": "evaluate.grid_prompts = 0"}
    train, val = qe.loss_history(run_dir)
    metrics["loss"] = qe.loss_summary(train, val)
    metrics["seconds"] = round(time.perf_counter() - start, 1)
    qe.plot_losses(train, val, run_dir / qe.LOSS_PNG, title=f"{run.cfg.run.name}: loss")
    qe.write_json(run_dir / qe.METRICS_JSON, metrics)
    for line in summary_lines(metrics):
        log(line)
    log(f"wrote {run_dir / qe.METRICS_JSON} and {run_dir / qe.LOSS_PNG}")
    return metrics


def summary_lines(metrics: dict) -> list[str]:
    from minidalle.recipes.quickstart.evaluation import summary_lines as shapes_lines

    lines = [f"held-out data: {metrics['heldout']['items']} items from {metrics['heldout']['source']}"]
    lines += shapes_lines(metrics)  # the shapes dataset's fidelity, when present
    h = metrics.get("heldout_loss", {})
    if "text_loss" in h:
        lines.append(f"held-out loss on {h['items']} items: text {h['text_loss']:.4f}, image "
                     f"{h['image_loss']:.4f} ({h['bits_per_image_token']:.3f} bits per image token)")
    c = metrics.get("codec", {})
    if c.get("images"):
        quality = f"PSNR {c['psnr']:.2f} dB, " if c.get("psnr") is not None else ""
        quality += f"SSIM {c['ssim']:.3f}, " if c.get("ssim") is not None else ""
        lines.append(f"codec on {c['images']} held-out items: {quality}codebook use {c['usage']:.0%} "
                     f"(perplexity {c['perplexity']:.1f} of {c['num_tokens']} codes)")
    for key, label in (("fid", "FID/KID"), ("clip", "CLIP score")):
        m = metrics.get(key, {})
        if "skipped" in m:
            lines.append(f"{label}: skipped: {m['skipped']}")
    f = metrics.get("fid", {})
    if "fid" in f:
        lines.append(f"FID {f['fid']:.2f}, KID {f['kid_mean']:.4f} +- {f['kid_std']:.4f} "
                     f"({f['generated_images']} generated vs {f['real_images']} {f['real']}, "
                     f"{f['features']} features)")
    if "clip_score" in metrics.get("clip", {}):
        lines.append(f"CLIP score {metrics['clip']['clip_score']:.2f} ({metrics['clip']['model']})")
    if "path" in metrics.get("grid", {}):
        lines.append(f"caption grid: {metrics['grid']['path']}")
    lo = metrics.get("loss", {})
    if lo.get("steps"):
        val = f", validation {lo['val_loss']:.4f}" if "val_loss" in lo else ""
        lines.append(f"loss after {lo['steps']} steps: training {lo.get('train_loss', float('nan')):.4f}{val}")
    return lines
