"""bf16 and fp32 matrix products for 1-8 rows that stream the weights at the memory rate (CPU).

A cached sampling step multiplies one row per image by every weight matrix, so it is bound
by how fast the weights are read. On an AVX512-BF16 CPU without AMX (AMD Zen 4), oneDNN's
bf16 product reads them at ~13-16 GB/s with 1-8 rows; this kernel reads 25-30 GB/s for one
row (a plain ``W.sum()`` streams ~26 GB/s on one core). The weight is packed once so that
one 64-byte load holds two k-values of 16 output rows: ``_mm512_dpbf16_ps`` then multiplies
them by a broadcast pair of inputs and accumulates 16 outputs in fp32, with no horizontal
sums; bias and residual are added in fp32 before one rounding to bf16 (oneDNN's results
differ by at most one bf16 step). fp32 weights get the same scheme with AVX512F FMA: packed
so that one 64-byte load holds one k-value of 16 output rows, times a broadcast input
(oneDNN's fp32 product reads ~13-14 GB/s here); the sums run in another order than
``F.linear``'s, so results differ from it by fp32 rounding only (a few ulps of the sums).

The kernel is compiled at first use with ``torch.utils.cpp_extension`` (~10-25 s, needs g++
and ninja) and cached in torch's extension directory (``$TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``); later processes only load it. :func:`pack` returns None,
and callers keep their own path, when the CPU lacks AVX512F (AVX512-BF16 for bf16
weights), the build or the load fails (logged once at debug level), or
``MINIDALLE_GEMV=0`` is set.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import warnings
from pathlib import Path

import torch

from minidalle import hardware

log = logging.getLogger("minidalle.inference.gemv")

MAX_ROWS = 8  # more rows: more accumulators than registers; oneDNN then

_SOURCE = r"""
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/utils/pybind.h>
#include <immintrin.h>
#include <algorithm>
#include <optional>
#include <type_traits>

#define KERNEL __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

KERNEL static inline __m512 widen(const uint16_t* p) {  // 16 bf16 -> fp32
  return _mm512_castsi512_ps(_mm512_slli_epi32(
      _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

// y[m, n0:n0+16*RB] for RB blocks of 16 output rows starting at block nb0.
template <int M, int RB>
KERNEL static void blocks(const uint32_t* x, int64_t K2, const uint16_t* wp, int64_t nb0,
                          const uint16_t* bias, const uint16_t* res, uint16_t* y, int64_t N) {
  __m512 acc[M][RB];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < RB; ++r) acc[m][r] = _mm512_setzero_ps();
  const uint16_t* w = wp + nb0 * K2 * 32;
  for (int64_t k = 0; k < K2; ++k) {
    __m512i wv[RB];
    for (int r = 0; r < RB; ++r) wv[r] = _mm512_loadu_si512(w + (r * K2 + k) * 32);
    for (int m = 0; m < M; ++m) {
      __m512bh xv = (__m512bh)_mm512_set1_epi32(x[m * K2 + k]);  // (x[2k], x[2k+1])
      for (int r = 0; r < RB; ++r) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], xv, (__m512bh)wv[r]);
    }
  }
  for (int r = 0; r < RB; ++r) {
    int64_t n0 = (nb0 + r) * 16;
    __m512 b = bias ? widen(bias + n0) : _mm512_setzero_ps();
    for (int m = 0; m < M; ++m) {
      __m512 v = _mm512_add_ps(acc[m][r], b);
      if (res) v = _mm512_add_ps(v, widen(res + m * N + n0));
      _mm256_storeu_si256((__m256i*)(y + m * N + n0), (__m256i)_mm512_cvtneps_pbh(v));
    }
  }
}

template <int M>
static void run(const uint32_t* x, int64_t K2, const uint16_t* wp, int64_t NB,
                const uint16_t* bias, const uint16_t* res, uint16_t* y, int64_t N) {
  // Row blocks per pass: enough independent accumulators (M x RB <= 24 of 32 registers).
  constexpr int RB = M <= 2 ? 4 : 3;
  at::parallel_for(0, (NB + RB - 1) / RB, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      if ((g + 1) * RB <= NB) blocks<M, RB>(x, K2, wp, g * RB, bias, res, y, N);
      else for (int64_t b = g * RB; b < NB; ++b) blocks<M, 1>(x, K2, wp, b, bias, res, y, N);
    }
  });
}

#define KERNEL32 __attribute__((target("avx512f")))

// fp32: the same scheme with one k per 64-byte load of 16 output rows (a broadcast x[k], FMA).
template <int M, int RB>
KERNEL32 static void blocks32(const float* x, int64_t K, const float* wp, int64_t nb0,
                              const float* bias, const float* res, float* y, int64_t N) {
  // Sums of CHUNK products at a time, then added up: a rounding error growing with CHUNK +
  // K / CHUNK rather than K (as close to F.linear as its own blocked sums; the totals are
  // touched once per chunk, so they may live in memory at no cost).
  constexpr int64_t CHUNK = 64;
  __m512 acc[M][RB];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < RB; ++r) acc[m][r] = _mm512_setzero_ps();
  const float* w = wp + nb0 * K * 16;
  for (int64_t k0 = 0; k0 < K; k0 += CHUNK) {
    __m512 part[M][RB];
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < RB; ++r) part[m][r] = _mm512_setzero_ps();
    for (int64_t k = k0; k < std::min(K, k0 + CHUNK); ++k) {
      __m512 wv[RB];
      for (int r = 0; r < RB; ++r) wv[r] = _mm512_loadu_ps(w + (r * K + k) * 16);
      for (int m = 0; m < M; ++m) {
        __m512 xv = _mm512_set1_ps(x[m * K + k]);
        for (int r = 0; r < RB; ++r) part[m][r] = _mm512_fmadd_ps(xv, wv[r], part[m][r]);
      }
    }
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < RB; ++r) acc[m][r] = _mm512_add_ps(acc[m][r], part[m][r]);
  }
  for (int r = 0; r < RB; ++r) {
    int64_t n0 = (nb0 + r) * 16;
    __m512 b = bias ? _mm512_loadu_ps(bias + n0) : _mm512_setzero_ps();
    for (int m = 0; m < M; ++m) {
      __m512 v = _mm512_add_ps(acc[m][r], b);
      if (res) v = _mm512_add_ps(v, _mm512_loadu_ps(res + m * N + n0));
      _mm512_storeu_ps(y + m * N + n0, v);
    }
  }
}

template <int M>
static void run32(const float* x, int64_t K, const float* wp, int64_t NB,
                  const float* bias, const float* res, float* y, int64_t N) {
  constexpr int RB = M <= 2 ? 4 : 3;  // as run<M>
  at::parallel_for(0, (NB + RB - 1) / RB, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      if ((g + 1) * RB <= NB) blocks32<M, RB>(x, K, wp, g * RB, bias, res, y, N);
      else for (int64_t b = g * RB; b < NB; ++b) blocks32<M, 1>(x, K, wp, b, bias, res, y, N);
    }
  });
}

// Calls f(std::integral_constant<int, M>) for M = rows (1..8): one instantiation per row count.
template <typename F>
static void by_rows(int64_t rows, F&& f) {
  switch (rows) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    default: f(std::integral_constant<int, 8>{}); break;
  }
}

// weight [N, K] bf16 -> [N/16, K/2, 16, 2]; fp32 -> [N/16, K, 16]
at::Tensor pack(const at::Tensor& w) {
  if (w.scalar_type() == at::kFloat) {
    TORCH_CHECK(w.dim() == 2 && w.size(0) % 16 == 0, "pack: a [16n, k] fp32 weight");
    return w.view({w.size(0) / 16, 16, w.size(1)}).permute({0, 2, 1}).contiguous();
  }
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kBFloat16 && w.size(0) % 16 == 0
              && w.size(1) % 2 == 0, "pack: a [16n, 2k] bf16 weight");
  return w.view({w.size(0) / 16, 16, w.size(1) / 2, 2}).permute({0, 2, 1, 3}).contiguous();
}

// x [..., K] (at most 8 rows), residual with x's rows -> y [..., N]; the dtype of wp (bf16
// or fp32) for x, bias, residual and y.
at::Tensor linear(const at::Tensor& x_, const at::Tensor& wp, const std::optional<at::Tensor>& bias,
                  const std::optional<at::Tensor>& residual) {
  auto x = x_.reshape({-1, x_.size(-1)}).contiguous();
  auto dt = wp.scalar_type();
  bool f32 = dt == at::kFloat;
  int64_t M = x.size(0), K = f32 ? wp.size(1) : 2 * wp.size(1), NB = wp.size(0), N = NB * 16;
  TORCH_CHECK(x.scalar_type() == dt && x.size(1) == K && (f32 || dt == at::kBFloat16) && M <= 8,
              "linear: bad input");
  at::Tensor b, res;
  if (bias) {
    b = bias->contiguous();
    TORCH_CHECK(b.scalar_type() == dt && b.numel() == N, "linear: bad bias");
  }
  if (residual) {
    res = residual->contiguous();
    TORCH_CHECK(res.scalar_type() == dt && res.numel() == M * N, "linear: bad residual");
  }
  auto sizes = x_.sizes().vec();
  sizes.back() = N;
  auto y = at::empty(sizes, x.options());
  if (M == 0) return y;
  if (f32) {
    auto px = (const float*)x.data_ptr();
    auto pw = (const float*)wp.data_ptr();
    auto pb = bias ? (const float*)b.data_ptr() : nullptr;
    auto pr = residual ? (const float*)res.data_ptr() : nullptr;
    auto py = (float*)y.data_ptr();
    by_rows(M, [&](auto m) { run32<decltype(m)::value>(px, K, pw, NB, pb, pr, py, N); });
    return y;
  }
  int64_t K2 = K / 2;
  auto px = (const uint32_t*)x.data_ptr();
  auto pw = (const uint16_t*)wp.data_ptr();
  auto pb = bias ? (const uint16_t*)b.data_ptr() : nullptr;
  auto pr = residual ? (const uint16_t*)res.data_ptr() : nullptr;
  auto py = (uint16_t*)y.data_ptr();
  by_rows(M, [&](auto m) { run<decltype(m)::value>(px, K2, pw, NB, pb, pr, py, N); });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack", &pack);
  m.def("linear", &linear);
}
"""

_module = None
_tried = False


def _cpu_ok() -> bool:
    """The fp32 kernel runs (AVX512F), as the capability probe reports it."""
    return hardware.has("avx512f")


def _cpu_bf16() -> bool:
    """The bf16 kernel runs too (AVX512-BF16)."""
    return hardware.has("avx512_bf16")


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
    # -fopenmp: at::parallel_for's OpenMP loop; the libgomp torch loaded serves it.
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
            log.debug("GEMV kernel off: the CPU lacks AVX512F")
        else:
            try:
                with _quiet():
                    _module = _build()
            except Exception as e:  # no compiler, no ninja, a failed build or load
                log.debug("GEMV kernel unavailable, using oneDNN: %s", e)
    return _module


def status() -> str:
    """Which kernel serves cached decoding here, in words (for ``minidalle env``)."""
    if os.environ.get("MINIDALLE_GEMV", "1") == "0":
        return "off (MINIDALLE_GEMV=0)"
    if not _cpu_ok():
        return f"not used: the CPU level is {hardware.cpu_level()} (needs AVX512F)"
    if kernel() is None:
        return "not built (no compiler or a failed build: see debug log minidalle.inference.gemv)"
    return "avx512f fp32" + (" + avx512_bf16 bf16" if _cpu_bf16() else "")


def pack(weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """``weight`` packed for :func:`linear`, or None where the kernel does not apply."""
    bf16 = weight.dtype == torch.bfloat16
    if (weight.device.type != "cpu" or weight.dtype not in (torch.bfloat16, torch.float32)
            or weight.dim() != 2 or weight.shape[0] % 16 or (bf16 and weight.shape[1] % 2)
            or (bias is not None and (bias.dtype != weight.dtype or bias.device.type != "cpu"))):
        return None
    module = kernel()
    if module is None or (bf16 and not _cpu_bf16()):
        return None
    return module.pack(weight.detach())


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """The weight that :func:`pack` packed (exactly)."""
    if packed.dim() == 3:  # fp32 [N/16, K, 16]
        return packed.permute(0, 2, 1).reshape(packed.shape[0] * 16, packed.shape[1])
    n16, k2 = packed.shape[:2]
    return packed.permute(0, 2, 1, 3).reshape(n16 * 16, k2 * 2)


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None,
           residual: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias (+ residual)`` for ``x`` ``[..., K]`` of at most ``MAX_ROWS`` rows in
    W's dtype (bf16 or fp32) and ``packed = pack(W)`` (callers in a hurry call
    ``kernel().linear`` directly)."""
    return _module.linear(x, packed, bias, residual)
