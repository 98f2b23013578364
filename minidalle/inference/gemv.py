"""Matrix products for 1-8 rows that stream the weights at the memory rate (CPU, x86).

A cached sampling step multiplies one row per image by every weight matrix, so it is bound
by how fast the weights are read. One C++ source (``gemv.cpp`` beside this module), compiled
at first use, holds a variant per instruction set (each function names its own with
``__attribute__((target(...)))``), picked at run time from :mod:`minidalle.hardware`
(:func:`variant`):

- **native bf16** (AVX512-BF16): the weight packed so that one 64-byte load holds two
  k-values of 16 output rows (:func:`pack_pairs`); ``_mm512_dpbf16_ps`` multiplies them by
  a broadcast pair of inputs and accumulates 16 outputs in fp32, with no horizontal sums;
  bias and residual are added in fp32 before one rounding to bf16 (oneDNN's results differ
  by at most one bf16 step).
- **fp32 arithmetic** on weights packed ``[N/16, K, 16]`` (one k-value of 16 output rows per
  64 bytes in fp32, 32 in bf16; :func:`pack_rows`) times a broadcast input, fp32 FMA:
  AVX512F (16 outputs a vector) or AVX2 + FMA (8 outputs a vector, a 16-row block being
  two). The weights are fp32, or **bf16-stored** (:func:`pack` with ``store="bf16"``, or bf16
  weights on a CPU without native bf16): widened by a 16-bit shift as they are loaded, so a
  step reads half the bytes and the results differ from fp32 weights' only by the weight
  rounding. Inputs come in fp32 (or bf16, widened), the output in the input's dtype (bf16:
  rounded to nearest even, as PyTorch). The sums run in chunks of 64 products, in another
  order than ``F.linear``'s: results differ from it by fp32 rounding only.

The blocks of 16 rows are interleaved in groups of 4, k-major, so that the products of a
group (and a thread's share of a matrix) read one contiguous stream. The AVX2 variant reads
that layout for bf16-stored weights (since session 11: one cached image 20% faster than
with one block after another; 8 rows together 3-5% slower) and keeps one block after another
for fp32 weights (grouped, 2 and 8 fp32 rows took 35-40% longer: RESULTS).

Measured with ``benchmarks/gemv_ab.py`` (L16 shapes, 16 weights a pass): the fp32 variants
read 1.5-3x faster than oneDNN's prepacked fp32 product, AVX2 against oneDNN capped at AVX2
(``ONEDNN_MAX_CPU_ISA=AVX2``) as well as AVX-512 against oneDNN at AVX-512, for 1 and 8 rows;
so the kernel is kept for fp32 weights on both (``_FP32_VARIANTS``), and oneDNN serves only
what the kernel does not (more than 8 rows, other shapes and dtypes).

Beside the products, the same source holds the rest of a decoding step for
:mod:`minidalle.inference.decode` (AVX2 + FMA, so every variant has them): ``attend_step``
(write a position's key/value into the cache, softmax attention over the pattern's keys
given as (start, stop, step) slices, a vectorised exp; :func:`attention_step`) and
``Stack`` (:func:`new_stack`): a whole stack of pre-norm blocks for one position in one
parallel region. Each thread takes one share of every block: its heads (their q/k/v rows,
their attention, with their cached keys and values prefetched into L2 during the q/k/v
product), its GEGLU columns (their rows of the feed-forward input; a vectorised erf), and
the part of the output projection and of the second feed-forward product that reads those
(the weights split by input columns, one matrix a share, :func:`split_columns`), as partial
sums that every thread adds up itself after a barrier: two barriers a block. A share done
early takes what is left of another's part (units claimed from a counter), so the threads
reach each barrier together. That replaced a Python call and five parallel loops a layer:
at L16 a bf16 step went from 2.35x to 1.4-1.6x its bandwidth floor when the machine reads
fast (RESULTS, session 10). With the image head (``Stack.set_head``) it also gives the
logits (``Stack.logits``) and runs whole stretches of the sampling loop (``Stack.generate``:
the top-k draw of :func:`sampler`, the embedding, the step and the next logits in the same
region). :func:`one_buffer` lays the packed matrices end to end on 2 MB pages
(:func:`minidalle.hardware.huge_page_buffer`).

The kernel is compiled with ``torch.utils.cpp_extension`` (~20-35 s, needs g++ and ninja)
and cached in torch's extension directory (``$TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``); later processes only load it. :func:`pack` returns None,
and callers keep their own path, on a CPU level without AVX2 + FMA (aarch64,
``MINIDALLE_CPU=generic``), when the build or the load fails (logged once at debug level),
or with ``MINIDALLE_GEMV=0``.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import warnings
from pathlib import Path

import torch

from minidalle import hardware

log = logging.getLogger("minidalle.inference.gemv")

MAX_ROWS = 8  # more rows: more accumulators than registers; oneDNN then

_SOURCE = (Path(__file__).parent / "gemv.cpp").read_text()

_module = None
_tried = False


def variant() -> str | None:
    """The kernel variant the CPU level allows (the probe's answer): ``"avx512"`` where
    AVX512F may be used, ``"avx2"`` where AVX2 and FMA may, else None (other CPUs, aarch64,
    ``MINIDALLE_CPU=generic``: the callers' PyTorch paths)."""
    if hardware.has("avx512f"):
        return "avx512"
    if hardware.has("avx2") and hardware.has("fma"):
        return "avx2"
    return None


def _cpu_ok() -> bool:
    """Some variant of the kernel runs on this CPU level."""
    return variant() is not None


def _cpu_bf16() -> bool:
    """The native bf16 kernel runs too (AVX512-BF16)."""
    return variant() == "avx512" and hardware.has("avx512_bf16")


@contextlib.contextmanager
def _quiet():
    """torch's extension builder warns on stderr (no CUDA runtime, an unknown compiler): the
    kernel is optional, so its build stays silent; a failure is logged once by the caller."""
    ext_log = logging.getLogger("torch.utils.cpp_extension")
    level = ext_log.level
    ext_log.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        ext_log.setLevel(level)


def _build():
    from torch.utils import cpp_extension

    # Torch's version in the name: a cached build never meets another torch's ABI.
    tag = hashlib.sha1((_SOURCE + torch.__version__).encode()).hexdigest()[:10]
    name = f"minidalle_gemv_{tag}"
    build_dir = cpp_extension._get_build_directory(name, verbose=False)  # private: may raise
    src = Path(build_dir) / "gemv.cpp"
    if not src.exists() or src.read_text() != _SOURCE:  # an unchanged file: no rebuild
        src.write_text(_SOURCE)
    # -fopenmp: at::parallel_for's OpenMP loop; the libgomp torch loaded serves it. No -march:
    # each function names its instruction set, the variant is chosen at run time.
    return cpp_extension.load(name, [str(src)], extra_cflags=["-O3", "-fopenmp"],
                              extra_ldflags=["-fopenmp"], build_directory=build_dir, verbose=False)


def kernel():
    """The compiled module, or None where it cannot be used (tried once per process)."""
    global _module, _tried
    if not _tried:
        _tried = True
        if os.environ.get("MINIDALLE_GEMV", "1") == "0":
            log.debug("GEMV kernel off (MINIDALLE_GEMV=0)")
        elif not _cpu_ok():
            log.debug("GEMV kernel off: the CPU level is %s (needs AVX2 + FMA)", hardware.cpu_level())
        else:
            try:
                with _quiet():
                    _module = _build()
            except Exception as e:  # no compiler, no ninja, a failed build or load
                log.debug("GEMV kernel unavailable, using oneDNN: %s", e)
    return _module


def function():
    """The kernel's product for this CPU level (``linear``'s signature), or None."""
    module = kernel()
    if module is None or not _cpu_ok():
        return None
    return module.linear if variant() == "avx512" else module.linear_avx2


def new_stack(heads: int, dim_head: int, splits: int | None = None):
    """An empty ``Stack`` of the kernel for this CPU level, or None where the kernel is not
    used. Its ``step(x, k_caches, v_caches, offset)`` runs one decoding position through every
    block in one parallel region of ``splits`` threads (default: torch's thread count), each
    thread taking one share of every block: its heads, its GEGLU columns (``shares(F)`` says
    which), the q/k/v and feed-forward input rows those need, and the part of the output
    projection and of the second feed-forward product that reads them. ``add(ln1_w, ln1_b,
    ln1_eps, qkv, out_parts, out_b, ln2_w, ln2_b, ln2_eps, ff_in, ff_in_b, ff_out_parts,
    ff_out_b, slices)`` takes one pre-norm block's packed weights, ``out`` and ``ff_out`` as one
    packed matrix of its input columns a share (:func:`split_columns`), and per position its
    attention's key slices."""
    module = kernel()
    if module is None or not _cpu_ok():
        return None
    return module.Stack(variant() == "avx512", heads, dim_head, splits or torch.get_num_threads())


def split_columns(packed: torch.Tensor, bounds: list) -> list[torch.Tensor]:
    """The packed weight's input columns ``[a, b)`` for each ``(a, b)`` in ``bounds``, each
    packed on its own in the same layout and dtype (exactly the stored values)."""
    w = unpack(packed)
    return [pack_like(w[:, a:b].contiguous(), packed) for a, b in bounds]


def pack_like(w: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """``w`` (in ``packed``'s stored dtype) packed in ``packed``'s layout."""
    return pack_pairs(w) if packed.dim() == 4 else pack_rows(w)


def attention_step():
    """The kernel's one-position attention step (``attend_step(qkv, k_cache, v_cache,
    offset, slices)``: writes the position's key/value into the fp32 caches and attends over
    the keys in the flat (start, stop, step) ``slices``), or None where the kernel is not
    used (any AVX2 + FMA CPU has it)."""
    module = kernel()
    return None if module is None or not _cpu_ok() else module.attend_step


def sampler():
    """The kernel's draw (``sample_top_k(logits, k, temperature, u, top_p)``: one id per row of
    fp32 ``logits``, as :func:`minidalle.inference.sampling.sample_logits` draws it (top-k,
    then the nucleus filter where ``top_p`` < 1), from the uniform numbers ``u``), or None
    where the kernel is not used."""
    module = kernel()
    return None if module is None or not _cpu_ok() else module.sample_top_k


# Where the kernel's fp32-stored product beats oneDNN's (benchmarks/gemv_ab.py, see above).
_FP32_VARIANTS = ("avx512", "avx2")


def _fp32_stored() -> bool:
    """fp32-stored weights go through the kernel (else oneDNN's fp32 product serves them)."""
    return variant() in _FP32_VARIANTS


def status() -> str:
    """Which kernel serves cached decoding here, in words (for ``minidalle env``)."""
    if os.environ.get("MINIDALLE_GEMV", "1") == "0":
        return "off (MINIDALLE_GEMV=0)"
    if not _cpu_ok():
        return f"not used: the CPU level is {hardware.cpu_level()} (needs AVX2 + FMA)"
    if kernel() is None:
        return "not built (no compiler or a failed build: see debug log minidalle.inference.gemv)"
    parts = ([f"{variant()} fp32"] if _fp32_stored() else []) + [f"{variant()} bf16-stored/fp32-arithmetic"]
    if _cpu_bf16():
        parts.append("avx512_bf16 bf16")
    return " + ".join(parts)


def pack(weight: torch.Tensor, bias: torch.Tensor | None = None,
         store: str | None = None) -> torch.Tensor | None:
    """``weight`` packed for :func:`linear`, or None where the kernel does not apply.

    ``store`` is the dtype the packed weight keeps: ``"fp32"`` or ``"bf16"`` (default: the
    weight's). An fp32 weight stored in bf16 is rounded once and multiplied in fp32 (x, bias,
    residual and y stay fp32): half the bytes read, results differing from fp32 only by the
    weight rounding. A bf16 weight takes the native bf16 product (AVX512-BF16) where the CPU
    has it, else the same bf16-stored fp32 arithmetic (bf16 inputs widened, y rounded)."""
    if store not in (None, "fp32", "bf16"):
        raise ValueError(f"gemv.pack: store must be 'fp32' or 'bf16', not {store!r}")
    if (weight.device.type != "cpu" or weight.dtype not in (torch.bfloat16, torch.float32)
            or weight.dim() != 2 or weight.shape[0] % 16
            or (bias is not None and (bias.dtype != weight.dtype or bias.device.type != "cpu"))):
        return None
    if store == "fp32" and weight.dtype != torch.float32:
        return None  # widening stored bf16 weights gains nothing
    module = kernel()
    if module is None or not _cpu_ok():
        return None
    w = weight.detach()
    if weight.dtype == torch.bfloat16 and _cpu_bf16():
        return None if weight.shape[1] % 2 else pack_pairs(w)
    if store == "bf16" or weight.dtype == torch.bfloat16:
        return pack_rows(w.to(torch.bfloat16))
    return pack_rows(w) if _fp32_stored() else None


# Blocks of 16 rows interleaved k-major in pack_rows' layout (gemv.cpp's GROUP), per kernel
# variant and stored dtype (1: one block after another)
GROUPS = {("avx512", torch.float32): 4, ("avx512", torch.bfloat16): 4,
          ("avx2", torch.float32): 1, ("avx2", torch.bfloat16): 4}


def _group(group: int | None, dtype: torch.dtype) -> int:
    return group or GROUPS.get((variant() or "avx2", dtype), 1)


def pack_rows(w: torch.Tensor, group: int | None = None) -> torch.Tensor:
    """[N, K] -> the fp32-arithmetic layout (fp32 or bf16): blocks of 16 rows in groups of
    ``group`` (default: this CPU's variant's, :data:`GROUPS`), each group ``[K, group, 16]``
    (one contiguous stream for the kernel); shaped ``[N/16, K, 16]``."""
    n, k = w.shape
    parts = [g.permute(2, 0, 1).reshape(-1) for g in w.view(n // 16, 16, k).split(_group(group, w.dtype))]
    return torch.cat(parts).view(n // 16, k, 16)


def one_buffer(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of ``tensors`` laid end to end, in order, in one buffer on 2 MB pages where the
    OS grants them (:func:`minidalle.hardware.huge_page_buffer`), each start 64-byte aligned:
    the packed matrices of a decoding step in the order the step reads them, so the step
    streams one region instead of scattered 4 KB pages."""
    sizes = [-(-t.numel() * t.element_size() // 64) * 64 for t in tensors]
    buffer = hardware.huge_page_buffer(sum(sizes))
    out, start = [], 0
    for t, size in zip(tensors, sizes):
        view = buffer[start : start + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
        out.append(view.copy_(t))
        start += size
    return out


def pack_pairs(w: torch.Tensor) -> torch.Tensor:
    """bf16 [N, K] -> the native bf16 layout: k-pairs of 16 rows, blocks in groups of 4, each
    group ``[K/2, size, 16, 2]`` (one contiguous stream); shaped ``[N/16, K/2, 16, 2]``."""
    n, k = w.shape
    parts = [g.permute(2, 0, 1, 3).reshape(-1) for g in w.view(n // 16, 16, k // 2, 2).split(PAIR_GROUP)]
    return torch.cat(parts).view(n // 16, k // 2, 16, 2)


PAIR_GROUP = 4  # the native bf16 layout's blocks per group (gemv.cpp's GROUP)


def unpack(packed: torch.Tensor, group: int | None = None) -> torch.Tensor:
    """The weight that :func:`pack` packed (exactly; in the stored dtype); ``group`` as for
    :func:`pack_rows`."""
    nb, k = packed.shape[:2]
    pairs = packed.dim() == 4  # [N/16, K/2, 16, 2], groups [K/2, size, 16, 2]
    flat = packed.reshape(-1)
    group = PAIR_GROUP if pairs else _group(group, packed.dtype)
    inner = 32 if pairs else 16

    def rows(g, count, size):  # `count` groups of `size` blocks [K, size, 16(, 2)], k-major
        if pairs:
            return g.view(count, k, size, 16, 2).permute(0, 2, 3, 1, 4).reshape(count * size * 16, 2 * k)
        return g.view(count, k, size, 16).permute(0, 2, 3, 1).reshape(count * size * 16, k)

    full, last = divmod(nb, group)  # whole groups in one copy, then the smaller last group
    cut = full * group * k * inner
    out = [rows(flat[:cut], full, group)] if full else []
    if last:
        out.append(rows(flat[cut:], 1, last))
    w = torch.cat(out) if len(out) > 1 else out[0]
    return w.clone() if w.data_ptr() == packed.data_ptr() else w  # never a view of packed


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None,
           residual: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias (+ residual)`` for ``x`` ``[..., K]`` of at most ``MAX_ROWS`` rows and
    ``packed = pack(W, bias, store)``: fp32-stored W takes fp32 x, bias, residual; bf16-stored
    W (fp32 arithmetic) takes each of them in fp32 or bf16 and returns x's dtype; the native
    bf16 layout takes bf16 (callers in a hurry call :func:`function`'s result directly)."""
    return function()(x, packed, bias, residual)
