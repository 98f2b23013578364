"""A/B of cached sampling: module forward steps vs the lean decode step, same process.

    python benchmarks/decode_ab.py configs/l16.toml [--threads 1] [--images 1]
        [--precision bf16] [--repeats 3] [--kinds module,lean]

Draws the same image(s) alternately with each step kind and prints the minimum wall and CPU
time of each: ``module`` is what sampling did before ``minidalle/inference/decode.py``
(``LeanDecoder.supports`` patched to False), ``lean`` the lean step as shipped, ``onednn``
the lean step with every product on oneDNN (the :mod:`minidalle.inference.gemv` kernel off).
Interleaving and the minimum make the ratio usable on a machine that other jobs share;
absolute times are not.
"""
from __future__ import annotations

import argparse
import contextlib
import time
from unittest import mock


def main(argv=None) -> int:
    import torch

    from minidalle.inference import gemv
    from minidalle.bench.settings import bench_geometry
    from minidalle.api import load_config
    from minidalle.inference.decode import LeanDecoder
    from minidalle.train.pipeline import build_model
    from minidalle.inference.sampling import generate_image_codes

    p = argparse.ArgumentParser(prog="python benchmarks/decode_ab.py")
    p.add_argument("config")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--images", type=int, default=1, help="images drawn together")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--kinds", default="module,lean", help="two or more of module, onednn, lean")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    cfg = load_config(args.config)
    geo = bench_geometry(cfg)
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg, text_vocab=geo["text_vocab"], num_image_tokens=geo["num_image_tokens"],
                        fmap_size=geo["fmap_size"]).eval()
    model.to(torch.bfloat16 if args.precision == "bf16" else torch.float32)
    g = torch.Generator().manual_seed(0)
    text = torch.randint(1, geo["text_vocab"], (args.images, cfg.model.text_seq_len), generator=g)
    text[:, -cfg.model.text_seq_len // 4 :] = 0  # padding, as in the bench

    patches = {"module": lambda: mock.patch.object(LeanDecoder, "supports",
                                                   staticmethod(lambda m: False)),
               "onednn": lambda: mock.patch.object(gemv, "MAX_ROWS", 0),
               "lean": contextlib.nullcontext}

    def draw(kind, **kw):
        with patches[kind]():
            return generate_image_codes(model, text, seed=0, **kw)

    prime = torch.zeros(args.images, model.image_seq_len - 4, dtype=torch.long)
    kinds = args.kinds.split(",")
    if len(kinds) < 2 or not set(kinds) <= set(patches):
        p.error("--kinds: two or more of module, onednn, lean")
    codes = {}
    for kind in kinds:  # warm-up (and the lean step's one-off weight preparation)
        draw(kind, prime_codes=prime)
    best = {k: (float("inf"), float("inf")) for k in kinds}
    for r in range(args.repeats):
        for kind in kinds:
            wall, cpu = time.perf_counter(), time.process_time()
            codes[kind] = draw(kind)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            best[kind] = (min(best[kind][0], wall), min(best[kind][1], cpu))
            print(f"  repeat {r}: {kind} step {wall:.2f} s (CPU {cpu:.2f} s)", flush=True)
    (bw, bc), (lw, lc) = best[kinds[0]], best[kinds[-1]]
    same = all(torch.equal(codes[k], codes[kinds[0]]) for k in kinds)
    print(f"{args.images} image(s), {args.precision}, {args.threads} thread(s), min of {args.repeats}: "
          + ", ".join(f"{k} {w:.2f} s (CPU {c:.2f} s)" for k, (w, c) in best.items())
          + f": {kinds[-1]} is {bw / lw:.2f}x faster than {kinds[0]} (CPU {bc / lc:.2f}x); "
          f"codes {'identical' if same else 'differ'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
