"""Where a cached L16 step's time goes, against its memory-bandwidth floor.

    python benchmarks/decode_floor.py [CONFIG] [--precision fp32|bf16|bf16w] [--threads 2] [--turns 4]

In turn, ``--turns`` times (best of each; the machine's read rate drifts): the read
bandwidth (``sum()`` over 512 MB, ordinary and huge pages), the step's products alone (every matrix once, the
kernel or oneDNN as the decoder uses them, from the decoder's buffer), the lean step as sampling runs it (with the
gemv kernel's fused attention and block steps where they apply) and the same step in
Python ops (the fused steps off). Prints each in ms and as a multiple of the floor (weight
bytes per step / bandwidth).
"""
from __future__ import annotations

import argparse
import time

import torch

from minidalle.api import load_config
from minidalle.bench.generate import read_bandwidth
from minidalle.bench.settings import bench_geometry
from minidalle.inference import decode
from minidalle.inference.sampling import _Decoder
from minidalle.train.pipeline import build_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", nargs="?", default="configs/l16.toml")
    p.add_argument("--precision", choices=("fp32", "bf16", "bf16w"), default="bf16")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--turns", type=int, default=4)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, [])
    geo = bench_geometry(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, text_vocab=geo["text_vocab"], num_image_tokens=geo["num_image_tokens"],
                        fmap_size=geo["fmap_size"], registry=cfg.registry).eval()
    if args.precision == "bf16":
        model = model.to(torch.bfloat16)
    store = "bf16" if args.precision == "bf16w" else None
    weights = decode._weights(model, store)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    linears = [lin for layer in weights.layers for lin in layer.linears] + [weights.image_head]
    inputs = [torch.randn(1, lin.shape[1], dtype=dtype) for lin in linears]
    text = torch.randint(1, geo["text_vocab"], (1, cfg.model.text_seq_len))

    def products(n=64):
        start = time.perf_counter()
        for _ in range(n):
            for lin, x in zip(linears, inputs):
                lin(x)
        return (time.perf_counter() - start) / n

    def steps(fused: bool, n=128):
        with torch.no_grad():
            d = _Decoder(model, True, weight_store=store)
            if not fused:
                d.lean.step_slices = [None] * len(d.lean.step_slices)
            h = d.feed(model.prepare_text(text))
            token = torch.zeros(1, 1, dtype=torch.long)
            start = time.perf_counter()
            for _ in range(n):
                d.image_logits(h)
                h = d.feed(token)
            return (time.perf_counter() - start) / n


    products(10), steps(True, 20), steps(False, 20)  # warm-up: packing, the kernel's build
    rates, prod, fused, plain = [], [], [], []
    for _ in range(args.turns):
        rates.append(read_bandwidth(repeats=3) * 1e9)
        prod.append(products())
        fused.append(steps(True))
        plain.append(steps(False))
    floor = weights.bytes_read() / max(rates)
    show = lambda t: f"{min(t) * 1e3:.2f} ms ({min(t) / floor:.2f}x)"
    print(f"{args.precision}, {args.threads} threads: read bandwidth {max(rates) / 1e9:.1f} GB/s, "
          f"floor {floor * 1e3:.2f} ms ({weights.bytes_read() / 1e6:.1f} MB a step); products alone "
          f"{show(prod)}; step {show(fused)}; the same step in Python ops {show(plain)}")


if __name__ == "__main__":
    main()
