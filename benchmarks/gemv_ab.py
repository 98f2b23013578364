"""A/B of bf16 or fp32 products with 1-8 rows: oneDNN prepacked vs the minidalle.inference.gemv kernel.

    python benchmarks/gemv_ab.py [--threads 1] [--rows 1 8] [--repeats 15] [--flinear]
        [--dtype bf16|fp32|bf16-stored]

For each L16 decode shape (to_qkv 3072x512, ff proj_in 4096x512, ff proj_out 512x2048 with
the residual, to_out 512x512 with the residual) it times a pass over 16 different weights
(a step's worth, so they come from memory, not cache), the variants alternated in one
process, and prints the minimum time and the weight read rate of each. ``--dtype
bf16-stored``: the kernel reads bf16 copies of fp32 weights with fp32 x (fp32 arithmetic),
against oneDNN's fp32 product. The kernel variant is the one the CPU level allows
(``MINIDALLE_CPU=avx2 ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2`` for AVX2 + FMA, with
oneDNN capped alike); fp32 weights are timed through the kernel even where ``gemv.pack``
leaves them to oneDNN.
"""
from __future__ import annotations

import argparse
import time

SHAPES = [(3072, 512, False), (4096, 512, False), (512, 2048, True), (512, 512, True)]
LAYERS = 16


def main(argv=None) -> int:
    import torch
    import torch.nn.functional as F

    from minidalle import hardware
    from minidalle.inference import gemv

    p = argparse.ArgumentParser(prog="python benchmarks/gemv_ab.py")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--flinear", action="store_true", help="also time F.linear on the plain weight")
    p.add_argument("--dtype", choices=("bf16", "fp32", "bf16-stored"), default="bf16")
    args = p.parse_args(argv)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    torch.set_num_threads(args.threads)
    fn = gemv.function()
    if fn is None:
        raise SystemExit(f"the gemv kernel is not available here: {gemv.status()}")
    if args.dtype == "bf16" and gemv.pack(torch.zeros(16, 16, dtype=dtype)) is None:
        raise SystemExit("no bf16 kernel here")

    def packed_weight(w):
        if args.dtype == "fp32":
            return gemv.pack_rows(w)
        return gemv.pack(w, store="bf16")

    with_onednn = all(hardware.onednn_works(op, dtype) for op in ("linear", "reorder", "linear_add"))
    onednn = torch.ops.mkldnn
    torch.manual_seed(0)
    print(f"CPU level {hardware.cpu_level()}, kernel {gemv.variant()}: {gemv.status()}", flush=True)
    for rows in args.rows:
        for n, k, res in SHAPES:
            ws = [(torch.randn(n, k) * 0.05).to(dtype) for _ in range(LAYERS)]
            bs = [torch.randn(n).to(dtype) for _ in range(LAYERS)]
            pre = [onednn._reorder_linear_weight(w, 1) for w in ws] if with_onednn else []
            packed = [packed_weight(w) for w in ws]
            x = torch.randn(rows, k).to(dtype)
            r = torch.randn(rows, n).to(dtype) if res else None

            def run_onednn():
                for w, b in zip(pre, bs):
                    if res:
                        onednn._linear_pointwise.binary(x, r, w, b, "add")
                    else:
                        onednn._linear_pointwise(x, w, b, "none", [], "")

            def run_kernel():
                for w, b in zip(packed, bs):
                    fn(x, w, b, r)

            def run_flinear():
                for w, b in zip(ws, bs):
                    y = F.linear(x, w, b)
                    if res:
                        y + r

            fns = {"kernel": run_kernel}
            if with_onednn:
                fns["onednn"] = run_onednn
            if args.flinear:
                fns["F.linear"] = run_flinear
            best = dict.fromkeys(fns, float("inf"))
            for _ in range(args.repeats):
                for name, f in fns.items():
                    t = time.perf_counter()
                    f()
                    best[name] = min(best[name], time.perf_counter() - t)
            gb = {name: LAYERS * n * k * (2 if name == "kernel" and args.dtype != "fp32"
                                          else ws[0].element_size()) / 1e9 for name in fns}
            shape = f"{LAYERS} x {n}x{k}{' + residual' if res else ''}"
            print(f"{args.dtype}, {args.threads} thread(s), {rows} row(s), {shape}: "
                  + ", ".join(f"{name} {t * 1e3:.2f} ms ({gb[name] / t:.1f} GB/s)" for name, t in best.items())
                  + (f"; kernel {best['onednn'] / best['kernel']:.2f}x oneDNN's speed" if with_onednn else ""),
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
