"""Interleaved A/B of one training-path change on CONFIG's model, in one process.

    python benchmarks/train_ab.py configs/l16.toml --variant onednn-linear [--rounds 8]
    python benchmarks/train_ab.py configs/l16.toml --variant axial-core
    python benchmarks/train_ab.py configs/l16.toml --profile      # op table of one step

A variant is switched off and on between training steps of the same runner, batch and
weights (as ``minidalle bench`` builds them: synthetic tokens, one micro-batch per step), so
a slow spell of a shared or virtual machine hits both sides; prints the best and the mean
step of each side and their ratios. Variants:

- ``onednn-linear``: the model's fp32 linears on oneDNN (``minidalle.model.linear``) or on
  ``F.linear`` (MKL);
- ``axial-core``: the axial layers' hand-written training path (``_AxialCore``) or their
  generic ``attend`` under autograd.
"""
from __future__ import annotations

import argparse
import contextlib
import time


def _onednn_linear(on: bool) -> None:
    import minidalle.model.linear as linear

    linear.ENABLED = on and linear.onednn_available()


_ORIGINAL_PROJECTION = {}


def _axial_core(on: bool) -> None:
    from minidalle.components.attention import AxialAttention

    original = _ORIGINAL_PROJECTION.setdefault("axial", AxialAttention.attend_projection)
    AxialAttention.attend_projection = original if on else (lambda self, qkv: None)


VARIANTS = {"onednn-linear": _onednn_linear, "axial-core": _axial_core}


def build_runner(config: str, precision: str):
    import torch

    from minidalle.bench.settings import bench_geometry
    from minidalle.commands.run import load_run_config
    from minidalle.train.pipeline import build_model
    from minidalle.plugin.discovery import get_registry
    from minidalle.train.trainer import seed_everything

    cfg = load_run_config(config, [], "cpu", after=["training.gradient_accumulation=1",
                                                      f"backend.precision={precision}"])
    geo = bench_geometry(cfg)
    registry = get_registry()
    backend = registry.build("backend", cfg.backend.name, cfg.backend.params)
    seed_everything(cfg.run.seed)
    model = backend.setup_model(build_model(cfg, text_vocab=geo["text_vocab"],
                                            num_image_tokens=geo["num_image_tokens"],
                                            fmap_size=geo["fmap_size"], registry=registry))
    runner = backend.prepare(model, backend.build_optimizer(model, cfg.training), cfg.training)
    g = torch.Generator().manual_seed(0)
    n = cfg.training.batch_size
    text = torch.randint(1, geo["text_vocab"], (n, cfg.model.text_seq_len), generator=g)
    text[:, -cfg.model.text_seq_len // 4:] = 0
    image = torch.randint(0, geo["num_image_tokens"], (n, geo["fmap_size"] ** 2), generator=g)
    return runner, {"text": text, "image": image}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config")
    ap.add_argument("--variant", choices=sorted(VARIANTS))
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "bf16-master"))
    ap.add_argument("--profile", action="store_true", help="print the op table of one step")
    args = ap.parse_args()
    if not args.variant and not args.profile:
        ap.error("give --variant or --profile")
    runner, batch = build_runner(args.config, args.precision)

    def step() -> float:
        start = time.perf_counter()
        runner.train_step(batch)
        return time.perf_counter() - start

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        step(), step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            print(f"profiled step: {step():.3f} s")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    if not args.variant:
        return
    switch = VARIANTS[args.variant]
    for _ in range(2):  # warm-up, both sides
        for on in (False, True):
            switch(on)
            step()
    times = {False: [], True: []}
    for _ in range(args.rounds):
        for on in (False, True):
            switch(on)
            times[on].append(step())
    switch(True)
    for on, label in ((False, "off"), (True, "on")):
        ts = times[on]
        print(f"{args.variant} {label:3s}: best {min(ts):.3f} s, mean {sum(ts) / len(ts):.3f} s")
    print(f"speed-up of on over off: best {min(times[False]) / min(times[True]):.3f}x, "
          f"mean {sum(times[False]) / sum(times[True]):.3f}x ({args.rounds} rounds)")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
