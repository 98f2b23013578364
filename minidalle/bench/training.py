"""What ``minidalle bench CONFIG`` measures: training steps on synthetic token data.

Prints samples/sec, this machine's measured matmul peak (fp32 and bf16; the best square
product of torch.mm and of oneDNN), the model FLOPs utilisation (MFU) against the peak of
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


def matmul_peak(dtype_name: str, sizes=(2048, 3072), reps: int = 5) -> tuple[float, int, str]:
    """Best measured FLOP/s of a square matrix product over ``sizes`` and over the two CPU
    matmul libraries PyTorch carries: ``torch.mm`` (MKL for fp32, oneDNN for bf16) and
    oneDNN's linear (what the model's fp32 layers use, ``minidalle.model.linear``).
    Returns (FLOP/s, size, library)."""
    import time

    import torch

    from minidalle.model.linear import onednn_available, onednn_product

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
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
        "backend": backend.describe(), "samples_per_step": n, "steps": steps, "warmup": warmup,
        "step_seconds_mean": total / max(steps, 1), "step_seconds_min": min(times) if times else None,
        "step_seconds": times, "probes": probes,
        "samples_per_sec": n * steps / total if total else None,
        "loss_last": losses[-1] if losses else None, "compile_seconds": compile_s,
        "peak_rss_bytes": peak_rss_bytes(), "peak_rss_is_benchmark_only": rss_reset, **flops,
    }
    if is_cuda:
        result["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(backend.device)
    return result
