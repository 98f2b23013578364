"""``minidalle bench CONFIG``: time training steps on synthetic token data.

Prints samples/sec, this machine's measured matmul peak (fp32 and bf16; the best square
product of torch.mm and of oneDNN; on cuda, torch.mm on the GPU), the model FLOPs utilisation (MFU) against the peak of
the precision used (overall, and per step against the peak re-measured right after it),
and peak memory.

FLOPs per sample (stated in benchmarks/RESULTS.md too)::

    6 x P_matmul x T  +  12 x d_attn x sum over layers of A_l

``P_matmul``: weights of every ``nn.Linear`` (q/k/v, output, feed-forward, logits; not the
embedding tables, which are lookups); ``T``: training sequence length (text_seq_len + 1 +
fmap**2 - 1 = 336 in the recipe); ``d_attn = heads x dim_head``; ``A_l``: the (query, key)
pairs layer ``l``'s mask allows over the T positions (causal, so at most T(T+1)/2; a layer
without a mask counts T(T+1)/2). Per allowed pair the forward pass costs 2 x d_attn for
QK^T and 2 x d_attn for AV; backward twice that. Sparse layers are credited only with the
pairs they need, so an implementation that computes dense masked attention gets no credit
for the wasted work. The logits layer is credited over the full vocabulary at every
position although the training loss computes text logits at text positions and image
logits at image positions only (``DALLE.loss``): kept so that figures stay comparable.
"""
from __future__ import annotations

def add_parser(sub) -> None:
    from minidalle.cli import add_config_arguments

    p = sub.add_parser(
        "bench", help="time training steps on synthetic data; samples/sec, MFU, peak memory",
        description="Time training steps of CONFIG's model on synthetic token data after "
                    "warm-up (one micro-batch per step: gradient accumulation 1), then print "
                    "samples/sec, the measured matmul peak, the model FLOPs utilisation and "
                    "peak memory. Vocabulary sizes come from [bench] text_vocab / "
                    "num_image_tokens / fmap_size, else model.text_vocab, else the recipe's "
                    "8192 / 1024 / 16.")
    add_config_arguments(p)
    p.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--batch-size", type=int, help="micro-batch (default: training.batch_size)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "bf16-master"),
                   help="override the backend's precision (auto: what the CPU probe picks; bf16: "
                        "autocast; bf16-master: bf16 weights with fp32 master weights)")
    p.add_argument("--no-compare", dest="compare", action="store_false",
                   help="with precision auto on cpu, do not also time the precision auto did not pick")
    p.add_argument("--backend", metavar="NAME", default="cpu",
                   help="backend to time (default cpu; the config's [backend] params are kept "
                        "when it names the same one)")
    p.add_argument("--no-peak", action="store_true", help="skip the matmul peak measurement")
    p.add_argument("--peak-sizes", metavar="N,N",
                   help="square matrix sizes tried for the peak (torch.mm and oneDNN); the best counts "
                        "(default 2048,3072; on cuda 4096,8192 with torch.mm)")
    p.add_argument("--generate", action="store_true",
                   help="also time sampling (minidalle.bench.generate)")
    p.add_argument("--generate-images", type=int, default=8, metavar="N",
                   help="images drawn together in the batched sampling timing (default 8)")
    p.add_argument("--no-uncached", action="store_true",
                   help="with --generate: skip the (slow) uncached sampling timings")
    p.add_argument("--json", dest="json_out", metavar="FILE", help="also write the figures as JSON")
    p.set_defaults(func=run)


# --------------------------------------------------------------------------- measurements


def matmul_flops(model) -> tuple[int, int]:
    """(weights in nn.Linear layers, all parameters)."""
    import torch

    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    return linear, sum(p.numel() for p in model.parameters())


def attention_pairs(model, seq_len: int) -> list[int]:
    """Allowed (query, key) pairs per layer over ``seq_len`` positions."""
    pairs = []
    causal = seq_len * (seq_len + 1) // 2
    for layer in getattr(model.transformer, "layers", []):
        mask = getattr(layer.attn, "mask", None)
        if mask is not None and getattr(mask, "dim", lambda: 0)() == 2 and not getattr(layer.attn, "is_full", False):
            pairs.append(int(mask[:seq_len, :seq_len].sum()))
        else:
            pairs.append(causal)
    return pairs


def flops_per_sample(model, cfg) -> dict:
    m = cfg.model
    seq_len = m.text_seq_len + model.image_seq_len  # <bos> + text + image - the last token
    p_matmul, p_total = matmul_flops(model)
    pairs = attention_pairs(model, seq_len)
    d_attn = m.heads * m.dim_head
    dense = 6 * p_matmul * seq_len
    attn = 12 * d_attn * sum(pairs)
    return {"params_matmul": p_matmul, "params_total": p_total, "seq_len": seq_len,
            "attention_pairs": sum(pairs), "flops_matmul": dense, "flops_attention": attn,
            "flops_per_sample": dense + attn}


def matmul_peak(dtype_name: str, sizes=(2048, 3072), reps: int = 5, device: str = "cpu") -> tuple[float, int, str]:
    """Best measured FLOP/s of a square matrix product over ``sizes`` and over the two CPU
    matmul libraries PyTorch carries: ``torch.mm`` (MKL for fp32, oneDNN for bf16) and
    oneDNN's linear (what the model's fp32 layers use, ``minidalle.model.linear``).
    On a CUDA ``device``: ``torch.mm`` (cuBLAS; fp32 honours the backend's TF32 setting).
    Returns (FLOP/s, size, library)."""
    import time

    import torch

    from minidalle.model.linear import onednn_available, onednn_product

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    if torch.device(device).type == "cuda":
        return _cuda_matmul_peak(dtype, sizes, reps, torch.device(device))
    products = {"torch.mm": torch.mm}
    if onednn_available(dtype):  # the probe tried it: oneDNN's bf16 product fails without AVX-512
        products["oneDNN linear"] = onednn_product  # a @ b.T: b as the [out, in] weight of a linear layer
    best, best_n, best_lib = 0.0, 0, ""
    for n in sizes:
        a = torch.randn(n, n).to(dtype)
        b = torch.randn(n, n).to(dtype)
        for product in products.values():
            product(a, b)  # warm-up
        for _ in range(reps):  # libraries interleaved, so a slow spell hits both
            for lib, product in products.items():
                t = time.perf_counter()
                product(a, b)
                rate = 2 * n**3 / (time.perf_counter() - t)
                if rate > best:
                    best, best_n, best_lib = rate, n, lib
    return best, best_n, best_lib


def _cuda_matmul_peak(dtype, sizes, reps: int, device) -> tuple[float, int, str]:
    """``torch.mm`` on the GPU: each timing is 10 back-to-back products between two
    synchronisations (one product of 8192 takes about a millisecond)."""
    import time

    import torch

    best, best_n = 0.0, 0
    for n in sizes:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        torch.mm(a, b)  # warm-up (cuBLAS picks its kernel)
        torch.cuda.synchronize(device)
        for _ in range(reps):
            t = time.perf_counter()
            for _ in range(10):
                torch.mm(a, b)
            torch.cuda.synchronize(device)
            best, best_n = max((best, best_n), (20 * n**3 / (time.perf_counter() - t), n))
        del a, b
    return best, best_n, "torch.mm (cuBLAS)"


def _reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (Linux), so the peak is the benchmark's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _loadavg() -> float | None:
    """The 1-minute load average: other processes on the machine skew every timing."""
    try:
        import os

        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def peak_rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# --------------------------------------------------------------------------- command


def _with_precision(cfg, precision: str):
    """``cfg`` with ``[backend] precision`` set (the cpu backend's params are an attrs class)."""
    import attrs

    return attrs.evolve(cfg, backend=attrs.evolve(
        cfg.backend, params=attrs.evolve(cfg.backend.params, precision=precision)))


def _fast_enough(name: str) -> bool:
    """Whether products of this precision run at full speed here (bf16 may be ~50x slower)."""
    from minidalle import hardware

    return name == "fp32" or hardware.bf16_verdict()[0]


def _compare_precision(cfg, other: str, first: dict, args) -> dict:
    """Time ``other`` (the precision auto did not pick) and print auto's standing against it.
    A precision that runs far slower here gets one untimed-warm-up-free step only."""
    slow = not _fast_enough(other)
    steps, warmup = (1, 0) if slow else (min(args.steps, 3), min(args.warmup, 1))
    r = bench_training(_with_precision(cfg, other), steps=steps, warmup=warmup)
    ratio = first["samples_per_sec"] / r["samples_per_sec"]
    print(f"Compare: {other} {r['samples_per_sec']:.3f} samples/sec ({steps} step{'s' * (steps > 1)}); "
          f"auto's choice is {ratio:.2f}x {other}", flush=True)
    return {"precision": other, "samples_per_sec": r["samples_per_sec"], "steps": steps,
            "auto_over_other": ratio}


def bench_training(cfg, *, steps: int, warmup: int, registry=None, probe=None) -> dict:
    """Time ``steps`` training steps (after ``warmup``) of cfg's model on its backend.

    ``probe``, when given, is called (untimed) after every timed step; its results are
    returned as ``probes``. The bench passes a short matmul-peak measurement, so that each
    step's share of the peak is taken at the machine's speed of that moment."""
    import time

    import torch

    from minidalle.bench.settings import bench_geometry
    from minidalle.train.pipeline import build_model
    from minidalle.train.trainer import seed_everything

    registry = registry or cfg.registry
    geo = bench_geometry(cfg)
    backend = registry.build("backend", cfg.backend.name, cfg.backend.params)
    seed_everything(cfg.run.seed)
    backend.seed(cfg.run.seed)
    model = build_model(cfg, text_vocab=geo["text_vocab"], num_image_tokens=geo["num_image_tokens"],
                        fmap_size=geo["fmap_size"], registry=registry)
    flops = flops_per_sample(model, cfg)
    t = cfg.training
    is_cuda = backend.device.type == "cuda"
    if is_cuda:
        torch.cuda.reset_peak_memory_stats(backend.device)
    rss_reset = _reset_peak_rss()
    model = backend.setup_model(model)
    runner = backend.prepare(model, backend.build_optimizer(model, t), t)
    n = backend.samples_per_step(t)
    g = torch.Generator().manual_seed(0)

    def batch():
        text = torch.randint(1, geo["text_vocab"], (n, cfg.model.text_seq_len), generator=g)
        text[:, -cfg.model.text_seq_len // 4:] = 0  # some padding, as real captions have
        image = torch.randint(0, geo["num_image_tokens"], (n, geo["fmap_size"] ** 2), generator=g)
        return {"text": text, "image": image}

    batches = [batch() for _ in range(2)]
    compile_s = runner.compile(batches[0])
    losses = []
    for i in range(warmup):
        losses.append(runner.train_step(batches[i % 2]).loss)
    if is_cuda:
        torch.cuda.synchronize(backend.device)
    times, probes, cpu_seconds = [], [], 0.0
    load_before = _loadavg()
    for i in range(steps):
        cpu_start = time.process_time()
        start = time.perf_counter()
        losses.append(runner.train_step(batches[i % 2]).loss)
        if is_cuda:
            torch.cuda.synchronize(backend.device)
        times.append(time.perf_counter() - start)
        cpu_seconds += time.process_time() - cpu_start
        if probe is not None:
            probes.append(probe())
    runner.close()
    total = sum(times)
    result = {
        "load_average_before": load_before, "load_average_after": _loadavg(),
        "threads": torch.get_num_threads(), "cpu_seconds_per_step": cpu_seconds / steps,
        "backend": backend.describe(), "device": str(backend.device), "samples_per_step": n, "steps": steps, "warmup": warmup,
        "step_seconds_mean": total / max(steps, 1), "step_seconds_min": min(times) if times else None,
        "step_seconds": times, "probes": probes,
        "samples_per_sec": n * steps / total if total else None,
        "loss_last": losses[-1] if losses else None, "compile_seconds": compile_s,
        "peak_rss_bytes": peak_rss_bytes(), "peak_rss_is_benchmark_only": rss_reset, **flops,
    }
    if is_cuda:
        result["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(backend.device)
    return result


def run(args) -> int:
    import json

    from minidalle.commands.run import load_run_config
    from minidalle.errors import ConfigError

    after = ["training.gradient_accumulation=1", "training.device_iterations=1",
             "training.replication_factor=1"]
    if args.batch_size is not None:
        after.append(f"training.batch_size={args.batch_size}")
    if args.precision is not None:
        after.append(f"backend.precision={args.precision}")
    if args.steps < 1 or args.warmup < 0:
        raise ConfigError("--steps must be >= 1 and --warmup >= 0")
    cfg = load_run_config(args.config, args.overrides, args.backend, after=after)
    on_cuda = cfg.backend.name == "cuda"
    peak_sizes = args.peak_sizes or ("4096,8192" if on_cuda else "2048,3072")
    try:
        sizes = tuple(int(s) for s in peak_sizes.split(","))
        assert sizes and min(sizes) > 0
    except (ValueError, AssertionError):
        raise ConfigError(f"--peak-sizes: expected positive integers like 2048,3072, got {peak_sizes!r}") from None
    requested = getattr(cfg.backend.params, "precision", "fp32")
    precision, other = requested, None
    if cfg.backend.name == "cpu":
        from minidalle import hardware

        precision = hardware.resolve_precision(requested, what="bench precision")
        if requested == "auto":
            cfg = _with_precision(cfg, precision)
            other = "bf16" if precision == "fp32" else "fp32"
    print(f"Bench: {args.config}, backend {cfg.backend.name} {precision}, batch "
          f"{cfg.training.batch_size}, {args.warmup} warm-up + {args.steps} timed steps", flush=True)

    peak_name = "fp32" if precision == "fp32" else "bf16"  # bf16 and bf16-master
    probe = None
    if not args.no_peak and cfg.backend.name == "cpu":
        probe_size = min(sizes) if _fast_enough(peak_name) else 256
        probe = lambda: matmul_peak(peak_name, (probe_size,), reps=2)[0]  # noqa: E731
    import torch

    try:
        r = bench_training(cfg, steps=args.steps, warmup=args.warmup, probe=probe)
    except (torch.OutOfMemoryError, MemoryError) as e:  # the GPU's (or the host's) memory
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"--batch-size {cfg.training.batch_size}: does not fit in memory "
                          f"({first})") from None
    gib = 1024**3
    print(f"Model: {r['params_total'] / 1e6:.1f}M parameters, {r['params_matmul'] / 1e6:.1f}M in matmuls, "
          f"sequence {r['seq_len']}, {r['flops_per_sample'] / 1e9:.1f} GFLOP per sample "
          f"(6 x P_matmul x T = {r['flops_matmul'] / 1e9:.1f} + attention {r['flops_attention'] / 1e9:.1f})")
    print(f"Device: {r['backend']}")
    if r["compile_seconds"] is not None:
        print(f"Compiled model in {r['compile_seconds']:.1f} secs")
    print(f"Step: {r['step_seconds_mean']:.3f} s mean, {r['step_seconds_min']:.3f} s best, "
          f"{r['cpu_seconds_per_step']:.3f} CPU-s ({r['threads']} threads)")
    print(f"Throughput: {r['samples_per_sec']:.3f} samples/sec")
    print(f"Loss: {r['loss_last']:.6f} ")
    achieved = r["samples_per_sec"] * r["flops_per_sample"]
    print(f"Model FLOP/s: {achieved / 1e9:.1f} GFLOP/s")
    if not args.no_peak and cfg.backend.name in ("cpu", "cuda"):
        from minidalle import hardware

        for name in ("fp32", "bf16"):
            if not on_cuda and not _fast_enough(name) and name != peak_name:
                print(f"Matmul peak {name}: not measured ({hardware.bf16_verdict()[1]})")
                continue
            name_sizes = sizes if on_cuda or _fast_enough(name) else (256,)
            peak, size, lib = matmul_peak(name, name_sizes, reps=20 if on_cuda else 5, device=r["device"])
            r[f"matmul_peak_{name}"] = peak
            r[f"matmul_peak_{name}_library"] = lib
            where = r["device"] if on_cuda else f"{torch.get_num_threads()} threads; best of torch.mm and oneDNN"
            print(f"Matmul peak {name}: {peak / 1e9:.1f} GFLOP/s ({lib} {size}x{size}, {where})")
        r["mfu"] = achieved / r[f"matmul_peak_{peak_name}"]
        print(f"MFU: {100 * r['mfu']:.1f}% of the measured {peak_name} matmul peak")
    if not args.no_peak and cfg.backend.name == "cpu":
        # The clock of a shared or virtual machine drifts by 10-20% over a minute: each
        # step against the peak measured right after it tells the drift from the code.
        flops_step = r["samples_per_step"] * r["flops_per_sample"]
        per_step = sorted(flops_step / (t * p) for t, p in zip(r["step_seconds"], r["probes"]))
        r["mfu_per_step_median"] = per_step[len(per_step) // 2]
        print(f"MFU per step against the {peak_name} peak re-measured after it ({probe_size}x{probe_size}): "
              f"median {100 * r['mfu_per_step_median']:.1f}%, range {100 * per_step[0]:.1f}-{100 * per_step[-1]:.1f}%")
    peak_line = f"Peak memory: {r['peak_rss_bytes'] / gib:.2f} GiB RSS"
    if not r["peak_rss_is_benchmark_only"]:
        peak_line += " (process lifetime)"
    if "cuda_max_allocated_bytes" in r:
        peak_line += f", {r['cuda_max_allocated_bytes'] / gib:.2f} GiB CUDA max allocated"
    print(peak_line, flush=True)
    load = r["load_average_before"]
    if load is not None:
        busy = load > r["threads"] + 0.5
        print(f"Load average: {load:.1f} before the timed steps, {r['load_average_after']:.1f} after"
              + (f" (busy machine: the figures above are skewed by other processes)" if busy else ""))
    if other is not None and args.compare:
        r["compare"] = _compare_precision(cfg, other, r, args)
    if args.generate:
        from minidalle.plugin.registry import resolve

        gen = resolve("minidalle.bench.generate:run_generate_bench")(cfg, args)
        if isinstance(gen, dict):
            r["generate"] = gen
    if args.json_out:
        from minidalle.fileio import atomic_write

        text = json.dumps({"config": str(args.config), "precision": precision,
                           "batch_size": cfg.training.batch_size, **r}, indent=1, default=str)
        atomic_write(args.json_out, lambda f: f.write(text.encode("utf-8")))
    return 0
