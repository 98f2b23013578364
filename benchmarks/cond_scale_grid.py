"""One prompt at several classifier-free guidance scales, as one labelled picture.

    python benchmarks/cond_scale_grid.py --checkpoint output/quickstart \\
        --text "a large red circle at the top left" --scales 1 1.5 2 3 --num-images 4 \\
        --out docs/cond_scale.png

One row per ``cond_scale`` (the same seed in every row, so row 1 is the unguided sample and
the rows differ only by the guidance); the checkpoint must have been trained with
``training.null_caption_prob > 0``. Sampling settings are the checkpoint's ``[generate]``.
"""
from __future__ import annotations

import argparse


def main(argv=None) -> int:
    import torch

    from minidalle import images as img_io
    from minidalle.commands.generate import check_guidance
    from minidalle.inference.loader import load_for_inference
    from minidalle.inference.sampling import generate_image_codes

    p = argparse.ArgumentParser(prog="python benchmarks/cond_scale_grid.py")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--text", required=True)
    p.add_argument("--scales", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0])
    p.add_argument("--num-images", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="cond_scale.png")
    p.add_argument("--filter-thres", type=float, default=None,
                   help="top-k share kept (default: the run's generate.filter_thres)")
    args = p.parse_args(argv)

    run = load_for_inference(args.checkpoint)
    cfg, tokenizer, codec, model = run.cfg, run.tokenizer, run.codec, run.model
    g = cfg.generate
    text = tokenizer.encode([args.text], cfg.model.text_seq_len, truncate=True).repeat(args.num_images, 1)
    rows = []
    for s in args.scales:
        check_guidance(cfg, s, args.checkpoint)
        thres = g.filter_thres if args.filter_thres is None else args.filter_thres
        codes = generate_image_codes(model, text, filter_thres=thres, top_p=g.top_p,
                                     temperature=g.temperature, seed=args.seed, cond_scale=s)
        with torch.no_grad():
            rows.append(codec.decode(codes).float().clamp(0, 1))
    labels = [f"{args.text} - cond_scale {s:g}" for s in args.scales]
    print(img_io.save_grid(rows, labels, args.out))
    return 0


if __name__ == "__main__":
    import sys

    from minidalle.errors import MinidalleError

    try:
        raise SystemExit(main())
    except MinidalleError as exc:
        print(f"cond_scale_grid: error: {exc}", file=sys.stderr)
        raise SystemExit(2)
