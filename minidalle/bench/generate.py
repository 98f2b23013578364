"""Sampling speed: what ``minidalle bench CONFIG --generate`` prints.

Times drawing one image (every image position) with the key/value cache at each generation
precision (``fp32``, ``bf16-weights``, ``bf16``; see
:func:`minidalle.inference.decode.generation_precision`, whose ``auto`` choice is marked),
without the cache (fp32, bf16; ``bf16-weights`` runs its uncached steps in fp32), then 8
images drawn together (``--generate-images N``). On the CPU each cached time is set against the
memory-bandwidth floor: the bytes of weight one cached step reads in that precision's format
(every matrix once), divided by the read bandwidth measured here (the best of a few sums
over a 512 MB tensor, in ordinary and huge-page memory), times the image positions; each
image is also set against the bandwidth measured just before and after it (the ratios in
turn: this kind of machine's read rate moves by up to 2x within minutes). The model has CONFIG's shape with random
weights (speed does not depend on the weights); vocabulary sizes as for ``bench``. With the
``cuda`` backend it runs on its GPU (fp32 and bf16 only; no floor): the timings synchronise
the GPU, and cached steps replay a CUDA graph when the backend's ``cuda_graphs`` is on
(``minidalle/inference/graph_decode.py``); with any other backend, on the CPU.
Then one image with classifier-free guidance (cond_scale 3: the caption and null-caption rows
in one cached batch of 2) against an unguided one drawn in turn with it, in fp32 and bf16.
"""
from __future__ import annotations

import copy
import time

PRECISIONS = ("fp32", "bf16-weights", "bf16")


def _time(fn, repeats: int = 1, sync=lambda: None) -> float:
    """The best wall time of ``repeats`` calls (CPU time of that call in ``_time.last_cpu``)."""
    best = None
    for _ in range(repeats):
        sync()
        start, cpu = time.perf_counter(), time.process_time()
        fn()
        sync()
        wall = time.perf_counter() - start
        if best is None or wall < best:
            # CPU time shows when other processes share the cores (wall >> cpu / threads)
            best, _time.last_cpu = wall, time.process_time() - cpu
    return best


def read_bandwidth(mbytes: int = 512, repeats: int = 5) -> float:
    """Memory read rate in GB/s: the best of ``repeats`` ``sum()`` over an fp32 tensor of
    ``mbytes`` MB (far beyond the caches), with torch's threads, in ordinary memory and in
    memory on 2 MB pages (:func:`minidalle.hardware.huge_page_buffer`, where the OS grants
    them; the decoder's weights live there, and there the same sum reads faster)."""
    import torch

    from minidalle import hardware

    n = mbytes * 2**20 // 4
    best = None
    for x in (torch.ones(n), hardware.huge_page_buffer(4 * n).view(torch.float32).fill_(1)):
        x.sum()
        t = min(_time(x.sum) for _ in range(repeats))
        best = t if best is None else min(best, t)
    return n * 4 / best / 1e9


def run_generate_bench(cfg, args=None, registry=None) -> dict:
    import torch

    from minidalle.bench.settings import bench_geometry
    from minidalle.inference.decode import LeanDecoder, generation_precision
    from minidalle.inference.sampling import generate_image_codes
    from minidalle.train.pipeline import build_model

    registry = registry or cfg.registry
    geo = bench_geometry(cfg)
    # On the cuda backend's GPU; anything else (cpu, or an ipu config) times the CPU.
    backend = registry.build("backend", "cuda", cfg.backend.params) if cfg.backend.name == "cuda" else None
    device = backend.device if backend is not None else torch.device("cpu")
    on_gpu = device.type == "cuda"
    graphs = backend is not None and backend.config.cuda_graphs
    sync = (lambda: torch.cuda.synchronize(device)) if on_gpu else (lambda: None)
    many = getattr(args, "generate_images", 8) or 8
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg, text_vocab=geo["text_vocab"], num_image_tokens=geo["num_image_tokens"],
                        fmap_size=geo["fmap_size"], registry=registry).eval()
    if backend is not None:
        model = backend.setup_model(model)  # on the GPU, with the backend's attention options
    model_bf16 = copy.deepcopy(model).to(torch.bfloat16)
    # precision -> (model, the lean decoder's weight store)
    setups = {"fp32": (model, None), "bf16-weights": (model, "bf16"), "bf16": (model_bf16, None)}
    g = torch.Generator().manual_seed(0)
    text = torch.randint(1, geo["text_vocab"], (max(many, 2), cfg.model.text_seq_len), generator=g)
    text[:, -cfg.model.text_seq_len // 4 :] = 0
    text = text.to(device)
    uncached = not getattr(args, "no_uncached", False)
    repeats = max(1, getattr(args, "repeats", 1) or 1)
    auto = "bf16" if on_gpu else generation_precision("auto")
    wanted = getattr(args, "precisions", None) or PRECISIONS
    chosen = [p for p in PRECISIONS if p in wanted and not (on_gpu and p == "bf16-weights")]
    setups = {p: setups[p] for p in chosen}

    def draw(precision, n, cache, cond_scale=1.0):
        m, store = setups[precision]
        return lambda: generate_image_codes(m, text[:n], seed=0, use_cache=cache, weight_store=store,
                                            cuda_graph=graphs, cond_scale=cond_scale)

    # warm-up: a short primed run in each precision (first calls allocate, pack the weights,
    # capture the graphs)
    prime = torch.zeros(many, model.image_seq_len - 4, dtype=torch.long, device=device)
    for m, store in setups.values():
        generate_image_codes(m, text[:1], seed=0, prime_codes=prime[:1], weight_store=store, cuda_graph=graphs)
        generate_image_codes(m, text[:many], seed=0, prime_codes=prime, weight_store=store, cuda_graph=graphs)

    bandwidth = None if on_gpu else read_bandwidth()
    r: dict = {"image_tokens": model.image_seq_len, "threads": torch.get_num_threads(),
               "auto": auto, "read_bandwidth_gb_s": bandwidth, "device": str(device),
               "cuda_graphs": graphs, "images_together": many}
    print(f"Generate: {model.image_seq_len} image tokens per image, on {device}"
          f"{' (cached steps from CUDA graphs)' if graphs else ''}, {torch.get_num_threads()} "
          f"threads; precision auto -> {auto}"
          + ("" if bandwidth is None else f"; read bandwidth {bandwidth:.1f} GB/s (sum over 512 MB, "
                                          "best of 5, 4 KB and huge pages)")
          + (f"; best of {repeats} runs each" if repeats > 1 else ""), flush=True)

    def floor(precision) -> float | None:
        m, store = setups[precision]
        if bandwidth is None or not LeanDecoder.supports(m):
            return None
        step_bytes = LeanDecoder(m, store).weights.bytes_read()
        r[f"bytes_per_token_{key(precision)}"] = step_bytes
        return step_bytes / (bandwidth * 1e9) * model.image_seq_len

    def timed(key, fn, label, extra=lambda: "", n=1):
        r[key] = _time(fn, n, sync)
        r[key.replace("_s", "_cpu_s")] = _time.last_cpu
        print(f"  {label}: {r[key]:.2f} s (CPU time {_time.last_cpu:.2f} s){extra()}", flush=True)

    def key(precision):
        return precision.replace("-weights", "w")  # bf16-weights -> bf16w

    for p in chosen:
        f = floor(p)
        k = f"cached_{key(p)}_s"
        mark = " (auto)" if p == auto else ""
        if f is None:
            timed(k, draw(p, 1, True), f"1 image, cached, {p}{mark}", n=repeats)
            continue
        # The machine's read rate drifts by up to 2x within minutes (other tenants of the
        # host): each image is set against the bandwidth measured just before and after it
        # (the better of the two: the lower floor), and the ratios of the turns are reported
        # with the best image and the best bandwidth seen.
        rates, times, ratios = [bandwidth], [], []
        for _ in range(max(3, repeats)):
            before = read_bandwidth(repeats=2)
            times.append((_time(draw(p, 1, True), 1, sync), _time.last_cpu))
            after = read_bandwidth(repeats=2)
            rates += [before, after]
            ratios.append(times[-1][0] / (f * bandwidth / max(before, after)))
        r[k], r[k.replace("_s", "_cpu_s")] = min(times)
        f *= bandwidth / max(rates)
        r[f"floor_{key(p)}_s"] = f
        r[f"read_bandwidth_{key(p)}_gb_s"] = max(rates)
        ratios.sort()
        r[f"floor_ratios_in_turn_{key(p)}"] = ratios
        print(f"  1 image, cached, {p}{mark}: {r[k]:.2f} s (CPU time {r[k.replace('_s', '_cpu_s')]:.2f} s); "
              f"{r[f'bytes_per_token_{key(p)}'] / 1e6:.1f} MB of weights per token; each image against "
              f"the bandwidth around it: {ratios[len(ratios) // 2]:.2f} x floor (median of "
              f"{len(ratios)}, range {ratios[0]:.2f}-{ratios[-1]:.2f}); the best image against the "
              f"best bandwidth ({max(rates):.1f} GB/s, floor {f:.2f} s): {r[k] / f:.2f} x floor",
              flush=True)
        r[f"floor_ratio_{key(p)}"] = r[k] / f
    if uncached:
        for p in [p for p in ("fp32", "bf16") if p in chosen or p == "fp32" and "bf16-weights" in chosen]:
            k = key(p)
            if p not in setups:  # bf16-weights' uncached steps: the fp32 model's
                setups[p] = (model, None)
            timed(f"uncached_{k}_s", draw(p, 1, False), f"1 image, uncached, {p}",
                  lambda k=k: f"; cached is {r[f'uncached_{k}_s'] / r[f'cached_{k}_s']:.1f}x faster "
                              f"at the same precision")
            r[f"speedup_{k}"] = r[f"uncached_{k}_s"] / r[f"cached_{k}_s"]
        if "bf16-weights" in chosen:
            r["speedup_bf16w"] = r["uncached_fp32_s"] / r["cached_bf16w_s"]
            print(f"  bf16-weights (uncached steps in fp32): cached is {r['speedup_bf16w']:.1f}x "
                  f"faster than uncached", flush=True)
    for p in chosen:
        mark = " (auto)" if p == auto else ""
        k = f"cached_{many}_{key(p)}_s"
        timed(k, draw(p, many, True), f"{many} images together, cached, {p}{mark}", n=repeats,
              extra=lambda k=k: f"; {many / r[k]:.1f} images/s")
        r[f"images_per_sec_{key(p)}"] = many / r[k]

    # Guided against unguided, the two images drawn in turn (at least 3 of each, the best
    # of each counts): a ratio from one stretch of time, as the machine's speed drifts.
    turns = max(3, repeats)
    for p in [p for p in ("fp32", "bf16") if p in chosen]:
        k, kc = f"guided_cached_{key(p)}_s", f"guided_cached_{key(p)}_cpu_s"
        plain, guided = [], []
        for _ in range(turns):
            plain.append((_time(draw(p, 1, True), 1, sync), _time.last_cpu))
            guided.append((_time(draw(p, 1, True, 3.0), 1, sync), _time.last_cpu))
        (base, base_cpu), (r[k], r[kc]) = min(plain), min(guided)
        ratio = r[f"guided_step_ratio_{key(p)}"] = r[k] / base
        cpu_ratio = r[f"guided_step_cpu_ratio_{key(p)}"] = r[kc] / base_cpu
        print(f"  1 image, guided (cond_scale 3), cached, {p}: {r[k]:.2f} s (CPU time {r[kc]:.2f} s); "
              f"unguided in turn {base:.2f} s: a guided step costs {ratio:.2f}x an unguided one "
              f"({1e3 * r[k] / model.image_seq_len:.2f} ms), {cpu_ratio:.2f}x in CPU time "
              f"(best of {turns} each)", flush=True)

    if "bf16" not in chosen:
        return r
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
    """``python -m minidalle.bench.generate CONFIG [--no-uncached] [--repeats N]
    [--precisions P ...] [--generate-images N] [--threads N] [--set k=v]``:
    the sampling half of ``minidalle bench CONFIG --generate`` alone."""
    import argparse

    from minidalle.api import load_config

    p = argparse.ArgumentParser(prog="python -m minidalle.bench.generate")
    p.add_argument("config")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--no-uncached", action="store_true", help="skip the slow uncached runs")
    p.add_argument("--generate-images", type=int, default=8, metavar="N",
                   help="images drawn together in the batched timing (default 8)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--repeats", type=int, default=1,
                   help="time each cached run N times and keep the best (a shared machine)")
    p.add_argument("--precisions", nargs="+", choices=PRECISIONS,
                   help="time only these (default: all; bf16 is slow without native bf16)")
    args = p.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    run_generate_bench(load_config(args.config, args.overrides), args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
