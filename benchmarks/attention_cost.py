"""Per-layer cost of each built-in attention variant at the L16 shapes.

    python benchmarks/attention_cost.py [--repeats 16]

One attention module (q/k/v and output projections included) forward + backward on a
[3, 336, 512] input, 16 heads x 64, the recipe's 81 text positions and 16 x 16 image grid;
variants interleaved, best of the repeats. Issue 3 asks that the axial and conv-like layers
cost no more per step than full attention.
"""
from __future__ import annotations

import argparse
import time

import torch

from minidalle.api import AttentionSpec, get_registry
from minidalle.model import build_attention

NAMES = ("full", "axial_row", "axial_col", "conv_like")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=16)
    args = ap.parse_args()
    torch.manual_seed(0)
    spec = AttentionSpec(dim=512, heads=16, dim_head=64, dropout=0.0, text_len=81, fmap_size=16)
    registry = get_registry()
    modules = {name: build_attention(name, None, spec, registry) for name in NAMES}
    x, grad = torch.randn(3, 336, 512), torch.randn(3, 336, 512)

    def step(module):
        module(x.clone().requires_grad_()).backward(grad)

    best = dict.fromkeys(NAMES, float("inf"))
    for module in modules.values():
        step(module)  # warm-up
    for _ in range(args.repeats):
        for name, module in modules.items():
            start = time.perf_counter()
            step(module)
            best[name] = min(best[name], time.perf_counter() - start)
    full = best["full"]
    print(f"attention layer fwd+bwd, batch 3, {torch.get_num_threads()} threads, best of {args.repeats}:")
    for name in NAMES:
        print(f"  {name:10s} {best[name] * 1e3:7.1f} ms  ({best[name] / full:.2f}x full)")


if __name__ == "__main__":
    main()
