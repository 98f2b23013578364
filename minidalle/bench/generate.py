"""Sampling speed: what ``minidalle bench CONFIG --generate`` prints.

Times drawing one image (every image position) with and without the key/value cache, in
fp32 and with bf16 weights, then 8 images drawn together, and one image with
classifier-free guidance (cond_scale 3: the caption and null-caption rows in one cached
batch of 2) against the unguided one. The model has CONFIG's shape with
random weights (speed does not depend on the weights); vocabulary sizes as for ``bench``.
"""
from __future__ import annotations

import copy
import time


def _time(fn) -> float:
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    wall = time.perf_counter() - start
    # CPU time shows when other processes share the cores (wall >> cpu / threads)
    _time.last_cpu = time.process_time() - cpu
    return wall


def run_generate_bench(cfg, args=None, registry=None) -> dict:
    import torch

    from minidalle.bench.settings import bench_geometry
    from minidalle.train.pipeline import build_model
    from minidalle.inference.sampling import generate_image_codes

    registry = registry or cfg.registry
    geo = bench_geometry(cfg)
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg, text_vocab=geo["text_vocab"], num_image_tokens=geo["num_image_tokens"],
                        fmap_size=geo["fmap_size"], registry=registry).eval()
    model_bf16 = copy.deepcopy(model).to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    text = torch.randint(1, geo["text_vocab"], (8, cfg.model.text_seq_len), generator=g)
    text[:, -cfg.model.text_seq_len // 4 :] = 0
    uncached = not getattr(args, "no_uncached", False)

    def draw(m, n, cache, cond_scale=1.0):
        return lambda: generate_image_codes(m, text[:n], seed=0, use_cache=cache, cond_scale=cond_scale)

    # warm-up: a short primed run on each model (first calls allocate)
    prime = torch.zeros(8, model.image_seq_len - 4, dtype=torch.long)
    for m in (model, model_bf16):
        generate_image_codes(m, text[:1], seed=0, prime_codes=prime[:1])
        generate_image_codes(m, text, seed=0, prime_codes=prime)

    r: dict = {"image_tokens": model.image_seq_len, "threads": torch.get_num_threads()}
    print(f"Generate: {model.image_seq_len} image tokens per image, "
          f"{torch.get_num_threads()} threads", flush=True)

    def timed(key, fn, label, extra=lambda: ""):
        r[key] = _time(fn)
        r[key.replace("_s", "_cpu_s")] = _time.last_cpu
        print(f"  {label}: {r[key]:.2f} s (CPU time {_time.last_cpu:.2f} s){extra()}", flush=True)

    timed("cached_fp32_s", draw(model, 1, True), "1 image, cached, fp32 weights")
    timed("cached_bf16_s", draw(model_bf16, 1, True), "1 image, cached, bf16 weights")
    if uncached:
        timed("uncached_fp32_s", draw(model, 1, False), "1 image, uncached, fp32 weights",
              lambda: f"; cached is {r['uncached_fp32_s'] / r['cached_fp32_s']:.1f}x faster in fp32, "
                      f"cached bf16 {r['uncached_fp32_s'] / r['cached_bf16_s']:.1f}x faster")
        r["speedup_fp32"] = r["uncached_fp32_s"] / r["cached_fp32_s"]
        timed("uncached_bf16_s", draw(model_bf16, 1, False), "1 image, uncached, bf16 weights",
              lambda: f"; cached is {r['uncached_bf16_s'] / r['cached_bf16_s']:.1f}x faster in bf16")
        r["speedup_bf16"] = r["uncached_bf16_s"] / r["cached_bf16_s"]
    for kind, m in (("fp32", model), ("bf16", model_bf16)):
        key, base = f"guided_cached_{kind}_s", f"cached_{kind}_s"
        cpu, cpu_base = key.replace("_s", "_cpu_s"), base.replace("_s", "_cpu_s")
        timed(key, draw(m, 1, True, 3.0), f"1 image, guided (cond_scale 3), cached, {kind} weights",
              lambda: f"; a guided step costs {r[key] / r[base]:.2f}x an unguided one "
                      f"({1e3 * r[key] / model.image_seq_len:.2f} ms), {r[cpu] / r[cpu_base]:.2f}x in CPU time")
        r[f"guided_step_ratio_{kind}"] = r[key] / r[base]
        r[f"guided_step_cpu_ratio_{kind}"] = r[cpu] / r[cpu_base]
    timed("cached_8_fp32_s", draw(model, 8, True), "8 images together, cached, fp32 weights")
    timed("cached_8_bf16_s", draw(model_bf16, 8, True), "8 images together, cached, bf16 weights")

    # How close bf16 weights stay to fp32: image-token probabilities along one sequence.
    with torch.no_grad():
        codes = generate_image_codes(model, text[:2], seed=0)
        p32 = model(text[:2], codes).float()[:, cfg.model.text_seq_len :, model.num_text_tokens :]
        p16 = model_bf16(text[:2], codes).float()[:, cfg.model.text_seq_len :, model.num_text_tokens :]
        diff = (p32.softmax(-1) - p16.softmax(-1)).abs().sum(-1).max().item()
        agree = (p32.argmax(-1) == p16.argmax(-1)).float().mean().item()
    r["bf16_max_total_variation"] = diff / 2
    r["bf16_top1_agreement"] = agree
    print(f"  bf16 vs fp32 image-token distributions: max total variation {diff / 2:.4f}, "
          f"top-1 agreement {100 * agree:.1f}% (random weights)", flush=True)
    return r


def main(argv=None) -> int:
    """``python -m minidalle.bench.generate CONFIG [--no-uncached] [--set k=v]``: the
    sampling half of ``minidalle bench CONFIG --generate`` alone."""
    import argparse

    from minidalle.api import load_config

    p = argparse.ArgumentParser(prog="python -m minidalle.bench.generate")
    p.add_argument("config")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--no-uncached", action="store_true", help="skip the slow uncached runs")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    run_generate_bench(load_config(args.config, args.overrides), args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
