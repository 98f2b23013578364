"""``minidalle generate``: draw images for prompts from a trained checkpoint."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from minidalle.errors import ConfigError, DataError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "generate", help="draw images for text prompts from a checkpoint",
        description="Load a checkpoint made by `minidalle run` (its config names the tokenizer "
                    "and codec), draw images for each prompt with the key/value cache, and "
                    "write one PNG per image plus a labelled grid.png. Defaults come from the "
                    "checkpoint's [generate] section.")
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="a run dir, its checkpoints/ dir (newest step) or a step dir")
    p.add_argument("--text", action="append", default=[], metavar="PROMPT",
                   help="a prompt (repeatable; default: generate.prompts of the config)")
    p.add_argument("--num-images", type=int, metavar="N", help="images per prompt")
    p.add_argument("--out", default="samples", metavar="DIR", help="output folder (default samples/)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--filter-thres", type=float, metavar="F",
                   help="top-k: keep the top (1 - F) share of the image codes")
    p.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling threshold")
    p.add_argument("--temperature", type=float, metavar="T")
    p.add_argument("--prime-image", metavar="PATH",
                   help="keep the first codes of this image and sample the rest")
    p.add_argument("--prime-fraction", type=float, metavar="F",
                   help="share of the image codes kept from --prime-image (default 0.4375)")
    p.add_argument("--batch-size", type=int, metavar="B", help="images drawn together")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "bf16-weights"),
                   help="fp32; bf16 (the model in bf16); bf16-weights (fp32 model, the cached "
                        "steps read bf16 copies of its matrices in fp32 arithmetic); auto (the "
                        "fastest of those for this CPU, printed)")
    p.add_argument("--no-cache", action="store_true", help="recompute every step (slow; for checks)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="torch threads (default: all cores; 1 is faster on a machine other jobs keep busy)")
    p.add_argument("--cond-scale", type=float, metavar="S",
                   help="classifier-free guidance scale (1 = off; needs a checkpoint trained "
                        "with training.null_caption_prob > 0)")
    p.add_argument("--candidates", type=int, metavar="N",
                   help="images drawn per prompt before reranking (default: --num-images)")
    p.add_argument("--keep", type=int, metavar="K",
                   help="images kept per prompt, the best K by --rerank (default: --num-images)")
    p.add_argument("--rerank", metavar="NAME",
                   help="sort each prompt's images by this reranker's score, best first "
                        "(built in: likelihood, clip); scores go to scores.json")
    p.set_defaults(func=run)


def _settings(args, g):
    """Command-line values over the checkpoint's [generate] section, validated."""
    out = {
        "num_images": args.num_images if args.num_images is not None else g.num_images,
        "filter_thres": args.filter_thres if args.filter_thres is not None else g.filter_thres,
        "top_p": args.top_p if args.top_p is not None else g.top_p,
        "temperature": args.temperature if args.temperature is not None else g.temperature,
        "prime_fraction": args.prime_fraction if args.prime_fraction is not None else g.prime_fraction,
        "batch_size": args.batch_size if args.batch_size is not None else g.batch_size,
        "precision": args.precision or g.precision,
        "use_cache": g.use_cache and not args.no_cache,
        "cond_scale": _pick(args, "cond_scale", g.cond_scale),
        "rerank": _pick(args, "rerank", g.rerank),
    }
    candidates, keep = _pick(args, "candidates", g.candidates), _pick(args, "keep", g.keep)
    out["candidates"] = candidates if candidates is not None else out["num_images"]
    out["keep"] = keep if keep is not None else min(out["num_images"], out["candidates"])
    checks = [("num-images", out["num_images"] >= 1), ("batch-size", out["batch_size"] >= 1),
              ("filter-thres", 0 <= out["filter_thres"] < 1), ("temperature", out["temperature"] > 0),
              ("top-p", out["top_p"] is None or 0 < out["top_p"] <= 1),
              ("prime-fraction", 0 <= out["prime_fraction"] <= 1),
              ("cond-scale", out["cond_scale"] >= 0), ("candidates", out["candidates"] >= 1),
              ("keep", 1 <= out["keep"] <= out["candidates"])]
    for name, ok in checks:
        if not ok:
            raise ConfigError(f"--{name}: out of range: {out[name.replace('-', '_')]}"
                              + (f" (at most --candidates {out['candidates']})" if name == "keep" else ""))
    return out


def _pick(args, name, default):
    value = getattr(args, name, None)
    return default if value is None else value


def check_guidance(cfg, cond_scale: float, where) -> None:
    """Refuse ``cond_scale`` != 1 for a checkpoint trained without null captions."""
    if cond_scale != 1 and cfg.training.null_caption_prob <= 0:
        raise ConfigError(f"{where}: --cond-scale {cond_scale:g}: the checkpoint was trained with "
                          "training.null_caption_prob = 0, so it has no null-caption model to guide "
                          "with (use cond_scale = 1, or train with null_caption_prob > 0)")


def _encode_prompts(tokenizer, prompts, text_seq_len):
    text = tokenizer.encode(prompts, text_seq_len, truncate=True)
    lengths = (tokenizer.encode(prompts, 4 * text_seq_len + 64, truncate=True) != 0).sum(1)
    for prompt, n in zip(prompts, lengths.tolist()):
        if n > text_seq_len:
            print(f"minidalle: warning: prompt {prompt[:40]!r}... has {n} tokens: truncated to "
                  f"the model's {text_seq_len}", file=sys.stderr)
    return text


def _prime_codes(path, codec, fraction, image_seq_len):
    import torch
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError, ValueError) as exc:
        raise DataError(f"{path}: cannot read the prime image: {exc}") from None
    size = codec.image_size
    # centre crop to a square, then resize to the codec's size
    w, h = im.size
    s = min(w, h)
    im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    im = im.resize((size, size), Image.BICUBIC)
    x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(size, size, 3)
    x = x.permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        codes = codec.encode(x)
    return codes[:, : int(fraction * image_seq_len)]


def generate(args, registry=None) -> list:
    """Run the command; returns the written paths (grid last)."""
    import torch
    from tqdm import tqdm

    from minidalle import images as img_io
    from minidalle.inference.decode import generation_precision
    from minidalle.inference.loader import load_for_inference
    from minidalle.inference.sampling import draw_images

    if getattr(args, "threads", None) is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads: expected a positive number, got {args.threads}")
        torch.set_num_threads(args.threads)
    prompts = [t.strip() for t in args.text]
    for i, t in enumerate(prompts):
        if not t:
            raise ConfigError(f"--text #{i + 1}: empty prompt")
        try:
            t.encode("utf-8")
        except UnicodeEncodeError as exc:  # undecodable bytes in argv
            raise ConfigError(f"--text #{i + 1}: not valid UTF-8 (byte {exc.start})") from None
    if not 0 <= args.seed < 2**64:
        raise ConfigError(f"--seed: expected an integer from 0 to 2**64 - 1, got {args.seed}")
    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir}: exists and is not a folder")
    run = load_for_inference(args.checkpoint, registry)
    cfg, tokenizer, codec, model = run.cfg, run.tokenizer, run.codec, run.model
    prompts = prompts or [p.strip() for p in cfg.generate.prompts if p.strip()]
    if not prompts:
        raise ConfigError("no prompt: give --text \"...\" (or generate.prompts in the config)")
    s = _settings(args, cfg.generate)
    check_guidance(cfg, s["cond_scale"], args.checkpoint)
    reranker = _reranker(s["rerank"], cfg, registry)
    if reranker is not None and s["rerank"] is None:
        s["rerank"] = cfg.reranker.name  # named by the config's [reranker] section
    if reranker is None and s["keep"] < s["candidates"]:
        raise ConfigError(f"--keep {s['keep']} of --candidates {s['candidates']}: choose the "
                          "kept ones with --rerank NAME (or generate.rerank)")
    if getattr(reranker, "needs_null_captions", False) and cfg.training.null_caption_prob <= 0:
        raise ConfigError(f"{args.checkpoint}: reranker {s['rerank']!r} with pmi = true scores "
                          "against the null caption, but the checkpoint was trained with "
                          "training.null_caption_prob = 0")
    if hasattr(reranker, "bind"):  # a reranker that scores with the generating model
        reranker.bind(model=model, tokenizer=tokenizer, codec=codec)

    precision = generation_precision(s["precision"])
    if precision == "bf16":
        model.to(torch.bfloat16)
    weight_store = "bf16" if precision == "bf16-weights" else None
    text = _encode_prompts(tokenizer, prompts, cfg.model.text_seq_len)
    _check_memory(len(prompts) * s["candidates"], codec.image_size)
    prime = None
    if args.prime_image:
        prime = _prime_codes(args.prime_image, codec, s["prime_fraction"], model.image_seq_len)
    # Unwritable or earlier outputs are found before sampling, not after.
    out_dir.mkdir(parents=True, exist_ok=True)
    if not os.access(out_dir, os.W_OK):
        raise ConfigError(f"--out {out_dir}: folder is not writable")
    if (out_dir / "grid.png").exists():
        print(f"minidalle: warning: {out_dir} holds images of an earlier run: those of the same "
              "names (grid.png, ...) are replaced", file=sys.stderr)

    n = s["candidates"]
    text = text.repeat_interleave(n, dim=0)
    generator = torch.Generator().manual_seed(args.seed)
    todo = model.image_seq_len - (prime.shape[1] if prime is not None else 0)
    bar = tqdm(total=len(text) * todo, desc="sampling", unit="tok", file=sys.stderr,
               disable=None, leave=False)
    all_codes = []
    images = draw_images(model, codec, text, batch_size=s["batch_size"], generator=generator,
                         filter_thres=s["filter_thres"], top_p=s["top_p"],
                         temperature=s["temperature"], use_cache=s["use_cache"],
                         cond_scale=s["cond_scale"], prime_codes=prime, progress=bar.update,
                         codes_out=all_codes, weight_store=weight_store)
    bar.close()
    images = images.view(len(prompts), n, *images.shape[1:])
    all_codes = torch.cat(all_codes).view(len(prompts), n, -1)

    k = s["keep"]
    kept, scores = [], []
    for p, prompt in enumerate(prompts):
        if reranker is None:
            kept.append(images[p][:k])
            continue
        with torch.no_grad():
            if getattr(reranker, "takes_codes", False):
                score = reranker.score([prompt] * n, images[p], codes=all_codes[p])
            else:
                score = reranker.score([prompt] * n, images[p])
        score = torch.as_tensor(score).flatten().float()
        order = score.argsort(descending=True)
        kept.append(images[p][order[:k]])
        scores.append((order, score))

    paths, table = [], []
    for p, prompt in enumerate(prompts):
        written = img_io.save_images(kept[p], out_dir, f"{p:02d}-{img_io.slug(prompt)}")
        paths += written
        if scores:
            order, score = scores[p]
            table.append({"prompt": prompt,
                          "kept": [{"file": w.name, "candidate": int(i), "score": float(score[i])}
                                   for w, i in zip(written, order[:k])],
                          "dropped": [{"candidate": int(i), "score": float(score[i])} for i in order[k:]]})
    if scores:
        paths.append(_write_scores(out_dir, s, table))
    paths.append(img_io.save_grid(kept, prompts, f"{out_dir}/grid.png"))
    return paths


def _check_memory(count: int, image_size: int) -> None:
    """Every image stays in memory until the grid is written: refuse a count that cannot fit."""
    try:
        physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return
    need = count * 3 * image_size * image_size * 4
    if need > physical:
        raise ConfigError(f"--num-images: {count} images of {image_size} px need {need / 2**30:.0f} GiB "
                          f"of memory, more than this machine's {physical / 2**30:.0f} GiB")


def _write_scores(out_dir, s, table):
    """``scores.json`` beside the images: each prompt's kept images (file, candidate index,
    score) best first, and the scores of the dropped candidates."""
    import json
    from pathlib import Path

    from minidalle.fileio import atomic_write

    doc = {"reranker": s["rerank"], "candidates": s["candidates"], "keep": s["keep"],
           "cond_scale": s["cond_scale"], "prompts": table}
    data = (json.dumps(doc, indent=1) + "\n").encode("utf-8")
    return atomic_write(Path(out_dir) / "scores.json", lambda f: f.write(data))


def _reranker(name, cfg, registry):
    if name is None and cfg.reranker is None:
        return None
    registry = registry or cfg.registry
    if name is None or (cfg.reranker is not None and cfg.reranker.name == name):
        return registry.build("reranker", cfg.reranker.name, cfg.reranker.params)
    return registry.build("reranker", name)


def run(args) -> int:
    paths = generate(args)
    for path in paths:
        print(path)
    return 0
