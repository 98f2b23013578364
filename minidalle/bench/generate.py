"""Sampling speed: what ``minidalle bench CONFIG --generate`` prints.

Times drawing one image (every image position) with and without the key/value cache, in
fp32 and with bf16 weights, then 8 images drawn together (``--generate-images N``). The
model has CONFIG's shape with random weights (speed does not depend on the weights);
vocabulary sizes as for ``bench``. With the ``cuda`` backend it runs on its GPU: the
timings synchronise the GPU, and cached steps replay a CUDA graph when the backend's
``cuda_graphs`` is on (``minidalle/inference/graph_decode.py``); with any other backend, on the CPU.
"""
from __future__ import annotations

import copy
import time


def _time(fn, sync=lambda: None) -> float:
    sync()
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    sync()
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
    # On the cuda backend's GPU; anything else (cpu, or an ipu config) times the CPU.
    backend = registry.build("backend", "cuda", cfg.backend.params) if cfg.backend.name == "cuda" else None
    device = backend.device if backend is not None else torch.device("cpu")
    graphs = backend is not None and backend.config.cuda_graphs
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    many = getattr(args, "generate_images", 8) or 8
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg, text_vocab=geo["text_vocab"], num_image_tokens=geo["num_image_tokens"],
                        fmap_size=geo["fmap_size"], registry=registry).eval()
    if backend is not None:
        model = backend.setup_model(model)  # on the GPU, with the backend's attention options
    model_bf16 = copy.deepcopy(model).to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    text = torch.randint(1, geo["text_vocab"], (max(many, 2), cfg.model.text_seq_len), generator=g)
    text[:, -cfg.model.text_seq_len // 4 :] = 0
    text = text.to(device)
    uncached = not getattr(args, "no_uncached", False)

    def draw(m, n, cache):
        return lambda: generate_image_codes(m, text[:n], seed=0, use_cache=cache, cuda_graph=graphs)

    # warm-up: a short primed run on each model (first calls allocate; capture the graphs)
    prime = torch.zeros(many, model.image_seq_len - 4, dtype=torch.long, device=device)
    for m in (model, model_bf16):
        generate_image_codes(m, text[:1], seed=0, prime_codes=prime[:1], cuda_graph=graphs)
        generate_image_codes(m, text[:many], seed=0, prime_codes=prime, cuda_graph=graphs)

    r: dict = {"image_tokens": model.image_seq_len, "threads": torch.get_num_threads(),
               "device": str(device), "cuda_graphs": graphs, "images_together": many}
    print(f"Generate: {model.image_seq_len} image tokens per image, on {device}"
          f"{' (cached steps from CUDA graphs)' if graphs else ''}, "
          f"{torch.get_num_threads()} threads", flush=True)

    def timed(key, fn, label, extra=lambda: ""):
        r[key] = _time(fn, sync)
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
        key = f"cached_{many}_{kind}_s"
        timed(key, draw(m, many, True), f"{many} images together, cached, {kind} weights",
              lambda: f"; {many / r[key]:.1f} images/s")
        r[f"images_per_sec_{kind}"] = many / r[key]

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
    p.add_argument("--generate-images", type=int, default=8, metavar="N",
                   help="images drawn together in the batched timing (default 8)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    run_generate_bench(load_config(args.config, args.overrides), args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
