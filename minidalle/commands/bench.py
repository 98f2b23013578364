"""``minidalle bench CONFIG``: time training steps on synthetic token data.

Prints samples/sec, this machine's measured matmul peak (fp32 and bf16; on cuda, torch.mm on the GPU), the model FLOPs
utilisation (MFU) against the peak of the precision used, and peak memory. The
measurements, and how FLOPs are counted, are in :mod:`minidalle.bench.training`.
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
    p.add_argument("--repeats", type=int, default=1, metavar="N",
                   help="with --generate: time each cached run N times and keep the best (guided "
                        "and unguided are drawn in turn, at least 3 times each)")
    p.add_argument("--json", dest="json_out", metavar="FILE", help="also write the figures as JSON")
    p.set_defaults(func=run)


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
    from minidalle.bench.training import bench_training

    r = bench_training(_with_precision(cfg, other), steps=steps, warmup=warmup)
    ratio = first["samples_per_sec"] / r["samples_per_sec"]
    print(f"Compare: {other} {r['samples_per_sec']:.3f} samples/sec ({steps} step{'s' * (steps > 1)}); "
          f"auto's choice is {ratio:.2f}x {other}", flush=True)
    return {"precision": other, "samples_per_sec": r["samples_per_sec"], "steps": steps,
            "auto_over_other": ratio}


def run(args) -> int:
    import json

    from minidalle.bench.training import bench_training, matmul_peak
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
