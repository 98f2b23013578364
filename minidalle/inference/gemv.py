"""Matrix products for 1-8 rows that stream the weights at the memory rate (CPU, x86).

A cached sampling step multiplies one row per image by every weight matrix, so it is bound
by how fast the weights are read. One C++ source, compiled at first use, holds a variant per
instruction set (each function names its own with ``__attribute__((target(...)))``), picked
at run time from :mod:`minidalle.hardware` (:func:`variant`):

- **native bf16** (AVX512-BF16): the weight packed so that one 64-byte load holds two
  k-values of 16 output rows; ``_mm512_dpbf16_ps`` multiplies them by a broadcast pair of
  inputs and accumulates 16 outputs in fp32, with no horizontal sums; bias and residual are
  added in fp32 before one rounding to bf16 (oneDNN's results differ by at most one bf16
  step). On AMD Zen 4 oneDNN's bf16 product reads ~13-16 GB/s with 1-8 rows, this 25-30 GB/s
  for one row (a plain ``W.sum()`` streams ~26 GB/s on one core).
- **fp32 arithmetic** on weights packed ``[N/16, K, 16]`` (one k-value of 16 output rows per
  64 bytes in fp32, 32 in bf16; for AVX-512 the blocks of 16 rows interleaved in groups of
  4, k-major, so that the products of a group read one stream: :func:`pack_rows`) times a
  broadcast input,
  fp32 FMA: AVX512F (16 outputs a
  vector) or AVX2 + FMA (8 outputs a vector, a 16-row block being two). The weights are fp32,
  or **bf16-stored** (:func:`pack` with ``store="bf16"``, or bf16 weights on a CPU without
  native bf16): widened by a 16-bit shift as they are loaded, so a step reads half the bytes
  and the results differ from fp32 weights' only by the weight rounding. Inputs come in fp32
  (or bf16, widened), the output in the input's dtype (bf16: rounded to nearest even, as
  PyTorch). The sums run in chunks of 64 products, in another order than ``F.linear``'s:
  results differ from it by fp32 rounding only.

Measured with ``benchmarks/gemv_ab.py`` (L16 shapes, 16 weights a pass): the fp32 variants
read 1.5-3x faster than oneDNN's prepacked fp32 product, AVX2 against oneDNN capped at AVX2
(``ONEDNN_MAX_CPU_ISA=AVX2``) as well as AVX-512 against oneDNN at AVX-512, for 1 and 8 rows;
so the kernel is kept for fp32 weights on both (``_FP32_VARIANTS``), and oneDNN serves only
what the kernel does not (more than 8 rows, other shapes and dtypes).

Beside the products, the same source holds the rest of a decoding step for
:mod:`minidalle.inference.decode` (AVX2 + FMA, so every variant has them): ``attend_step``
(write a position's key/value into the fp32 cache, softmax attention over the pattern's
keys given as (start, stop, step) slices, a vectorised exp) and ``block_step`` (a whole
pre-norm block: LayerNorm, the four products, that attention, GEGLU with a vectorised erf),
one call a layer in place of about twenty Python-level ops (:func:`attention_step`,
:func:`block_step`).

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

_SOURCE = r"""
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/csrc/utils/pybind.h>
#include <immintrin.h>
#include <algorithm>
#include <optional>
#include <type_traits>
#include <cmath>
#include <vector>
#include <c10/util/BFloat16.h>

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

// The AVX-512 fp32-arithmetic kernel's packed weights are group-interleaved: blocks of 16
// output rows in groups of GROUP (the last may be smaller), each group stored k-major
// ([K, group size, 16]), so the products of one group read one contiguous stream: with
// K = 512 four 16-KB streams at once read 10-15% slower from DRAM on Zen 4 (RESULTS,
// session 9). The AVX2 kernel (which takes 1-4 blocks at a time, depending on the rows)
// and the native bf16 one keep one block after another: grouped, they read slower.
constexpr int64_t GROUP = 4;

// Calls f(group's first block, its size, its weights' offset) for each group, in parallel.
template <typename F>
static void by_groups(int64_t NB, int64_t K, int64_t per_k, F&& f) {
  at::parallel_for(0, (NB + GROUP - 1) / GROUP, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) f(g * GROUP, std::min(GROUP, NB - g * GROUP), g * GROUP * K * per_k);
  });
}

// fp32 arithmetic on fp32 or bf16-stored weights, packed [N/16, K, 16] in groups (GROUP): one k-value of 16
// output rows per 64 (fp32) or 32 (bf16) bytes, times a broadcast x[k] (FMA). bf16 weights
// are widened by a 16-bit shift. Bias and residual come in fp32 or bf16 (widened), y in fp32
// or bf16 (rounded to nearest even, as PyTorch's conversion). Two variants: AVX-512 (16-wide)
// and AVX2 + FMA (8-wide: a 16-row block is two vectors).
struct Epilogue {
  const void* bias; bool bias16;
  const void* res; bool res16;
  void* y; bool y16;
  int64_t N;
};

#define KERNEL512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
#define KERNEL256 __attribute__((target("avx2,fma")))

KERNEL512 static inline __m512 load512(const float* p) { return _mm512_loadu_ps(p); }
KERNEL512 static inline __m512 load512(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(
      _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
KERNEL512 static inline __m512 load512(const void* p, bool bf16, int64_t i) {
  return bf16 ? load512((const uint16_t*)p + i) : load512((const float*)p + i);
}
KERNEL512 static inline void store512(void* p, bool bf16, int64_t i, __m512 v) {
  if (!bf16) { _mm512_storeu_ps((float*)p + i, v); return; }
  __m512i u = _mm512_castps_si512(v);  // round to nearest even; NaN -> 0x7fc0
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  u = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  u = _mm512_mask_mov_epi32(u, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc00000));
  _mm256_storeu_si256((__m256i*)((uint16_t*)p + i), _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
}

KERNEL256 static inline __m256 load256(const float* p) { return _mm256_loadu_ps(p); }
KERNEL256 static inline __m256 load256(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(
      _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
KERNEL256 static inline __m256 load256(const void* p, bool bf16, int64_t i) {
  return bf16 ? load256((const uint16_t*)p + i) : load256((const float*)p + i);
}
KERNEL256 static inline void store256(void* p, bool bf16, int64_t i, __m256 v) {
  if (!bf16) { _mm256_storeu_ps((float*)p + i, v); return; }
  __m256i u = _mm256_castps_si256(v);
  __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  u = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
  u = _mm256_blendv_epi8(u, _mm256_set1_epi32(0x7fc00000),
                         _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
  u = _mm256_srli_epi32(u, 16);  // 8 values < 65536: packing does not saturate
  _mm_storeu_si128((__m128i*)((uint16_t*)p + i),
                   _mm_packus_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1)));
}

// Sums of CHUNK products at a time, then added up: a rounding error growing with CHUNK +
// K / CHUNK rather than K (as close to F.linear as its own blocked sums; the totals are
// touched once per chunk, so they may live in memory at no cost).
constexpr int64_t CHUNK = 64;

// AVX-512: y[m, n0:n0+16*RB] for RB blocks of 16 output rows starting at block nb0.
template <typename W, int M, int RB>
KERNEL512 static void blocks512(const float* x, int64_t K, const W* w, int64_t stride,
                                int64_t nb0, const Epilogue& e) {
  __m512 acc[M][RB];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < RB; ++r) acc[m][r] = _mm512_setzero_ps();
  for (int64_t k0 = 0; k0 < K; k0 += CHUNK) {
    __m512 part[M][RB];
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < RB; ++r) part[m][r] = _mm512_setzero_ps();
    for (int64_t k = k0; k < std::min(K, k0 + CHUNK); ++k) {
      __m512 wv[RB];
      for (int r = 0; r < RB; ++r) wv[r] = load512(w + k * stride + r * 16);
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
    __m512 b = e.bias ? load512(e.bias, e.bias16, n0) : _mm512_setzero_ps();
    for (int m = 0; m < M; ++m) {
      __m512 v = _mm512_add_ps(acc[m][r], b);
      if (e.res) v = _mm512_add_ps(v, load512(e.res, e.res16, m * e.N + n0));
      store512(e.y, e.y16, m * e.N + n0, v);
    }
  }
}

// The epilogue of rows m0.. (for the second half of more than 4 rows).
static Epilogue rows_from(const Epilogue& e, int64_t m0) {
  Epilogue s = e;
  if (s.res) s.res = (const char*)s.res + m0 * s.N * (s.res16 ? 2 : 4);
  s.y = (char*)s.y + m0 * s.N * (s.y16 ? 2 : 4);
  return s;
}

// More than 4 rows: rows 0-3 then the rest, group by group (the second pass reads the
// group's weights from L2), as the kernels keep at most 4 rows x 4 blocks of sums.
template <int M, typename G>
static void in_row_halves(const float* x, int64_t K, const Epilogue& e, G&& group) {
  if constexpr (M <= 4) {
    group(std::integral_constant<int, M>{}, x, e);
  } else {
    group(std::integral_constant<int, 4>{}, x, e);
    group(std::integral_constant<int, M - 4>{}, x + 4 * K, rows_from(e, 4));
  }
}

template <typename W, int M>
static void run512(const float* x, int64_t K, const W* wp, int64_t NB, const Epilogue& e) {
  by_groups(NB, K, 16, [&](int64_t b0, int64_t size, int64_t offset) {
    const W* w = wp + offset;
    int64_t stride = size * 16;
    in_row_halves<M>(x, K, e, [&](auto m, const float* xm, const Epilogue& em) {
      constexpr int R = decltype(m)::value;
      if (size == GROUP) blocks512<W, R, GROUP>(xm, K, w, stride, b0, em);
      else for (int64_t r = 0; r < size; ++r) blocks512<W, R, 1>(xm, K, w + r * 16, stride, b0 + r, em);
    });
  });
}

// AVX2: y[m, 8v:8v+8] for V vectors of 8 output rows from vector v0 (vector v: half v % 2
// of block v / 2). 16 registers: M x V accumulators + V weights + one x stay below 16.
template <typename W, int M, int V>
KERNEL256 static void vectors256(const float* x, int64_t K, const W* wp, int64_t v0,
                                 const Epilogue& e) {
  const W* w[V];
  for (int j = 0; j < V; ++j) w[j] = wp + ((v0 + j) >> 1) * K * 16 + ((v0 + j) & 1) * 8;
  __m256 acc[M][V];
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < V; ++j) acc[m][j] = _mm256_setzero_ps();
  for (int64_t k0 = 0; k0 < K; k0 += CHUNK) {
    __m256 part[M][V];
    for (int m = 0; m < M; ++m)
      for (int j = 0; j < V; ++j) part[m][j] = _mm256_setzero_ps();
    for (int64_t k = k0; k < std::min(K, k0 + CHUNK); ++k) {
      __m256 wv[V];
      for (int j = 0; j < V; ++j) wv[j] = load256(w[j] + k * 16);
      for (int m = 0; m < M; ++m) {
        __m256 xv = _mm256_broadcast_ss(x + m * K + k);
        for (int j = 0; j < V; ++j) part[m][j] = _mm256_fmadd_ps(xv, wv[j], part[m][j]);
      }
    }
    for (int m = 0; m < M; ++m)
      for (int j = 0; j < V; ++j) acc[m][j] = _mm256_add_ps(acc[m][j], part[m][j]);
  }
  for (int j = 0; j < V; ++j) {
    int64_t n0 = (v0 + j) * 8;
    __m256 b = e.bias ? load256(e.bias, e.bias16, n0) : _mm256_setzero_ps();
    for (int m = 0; m < M; ++m) {
      __m256 v = _mm256_add_ps(acc[m][j], b);
      if (e.res) v = _mm256_add_ps(v, load256(e.res, e.res16, m * e.N + n0));
      store256(e.y, e.y16, m * e.N + n0, v);
    }
  }
}

template <typename W, int M>
static void run256(const float* x, int64_t K, const W* wp, int64_t NB, const Epilogue& e) {
  constexpr int V = M == 1 ? 8 : M == 2 ? 4 : M <= 4 ? 2 : 1;
  int64_t NV = 2 * NB;
  at::parallel_for(0, (NV + V - 1) / V, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      if ((g + 1) * V <= NV) vectors256<W, M, V>(x, K, wp, g * V, e);
      else for (int64_t v = g * V; v < NV; ++v) vectors256<W, M, 1>(x, K, wp, v, e);
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

// The native bf16 product (AVX512-BF16): weight packed [N/16, K/2, 16, 2]; x, bias,
// residual and y in bf16.
static at::Tensor linear_bf16(const at::Tensor& x_, const at::Tensor& wp,
                              const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& residual) {
  auto x = x_.reshape({-1, x_.size(-1)}).contiguous();
  int64_t M = x.size(0), K2 = wp.size(1), NB = wp.size(0), N = NB * 16;
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.size(1) == 2 * K2 && M <= 8,
              "linear: bad input");
  at::Tensor b, res;
  if (bias) {
    b = bias->contiguous();
    TORCH_CHECK(b.scalar_type() == at::kBFloat16 && b.numel() == N, "linear: bad bias");
  }
  if (residual) {
    res = residual->contiguous();
    TORCH_CHECK(res.scalar_type() == at::kBFloat16 && res.numel() == M * N, "linear: bad residual");
  }
  auto sizes = x_.sizes().vec();
  sizes.back() = N;
  auto y = at::empty(sizes, x.options());
  if (M == 0) return y;
  auto px = (const uint32_t*)x.data_ptr();
  auto pw = (const uint16_t*)wp.data_ptr();
  auto pb = bias ? (const uint16_t*)b.data_ptr() : nullptr;
  auto pr = residual ? (const uint16_t*)res.data_ptr() : nullptr;
  auto py = (uint16_t*)y.data_ptr();
  by_rows(M, [&](auto m) { run<decltype(m)::value>(px, K2, pw, NB, pb, pr, py, N); });
  return y;
}

// fp32 arithmetic: weight packed [N/16, K, 16] in fp32 (x, bias, residual, y in fp32) or in
// bf16 (each of x, bias, residual in fp32 or bf16; y in x's dtype).
static at::Tensor linear_fp32(const at::Tensor& x_, const at::Tensor& wp,
                              const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& residual, bool avx512) {
  bool w16 = wp.scalar_type() == at::kBFloat16;
  auto ok = [&](const at::Tensor& t) {
    return t.scalar_type() == at::kFloat || (w16 && t.scalar_type() == at::kBFloat16);
  };
  int64_t K = wp.size(1), NB = wp.size(0), N = NB * 16;
  TORCH_CHECK(ok(x_) && x_.dim() >= 1 && x_.size(-1) == K && x_.numel() <= 8 * K,
              "linear: bad input");
  auto x = x_.reshape({-1, K}).to(at::kFloat).contiguous();
  int64_t M = x.size(0);
  Epilogue e{nullptr, false, nullptr, false, nullptr, x_.scalar_type() == at::kBFloat16, N};
  at::Tensor b, res;
  if (bias) {
    b = bias->contiguous();
    TORCH_CHECK(ok(b) && b.numel() == N, "linear: bad bias");
    e.bias = b.data_ptr();
    e.bias16 = b.scalar_type() == at::kBFloat16;
  }
  if (residual) {
    res = residual->contiguous();
    TORCH_CHECK(ok(res) && res.numel() == M * N, "linear: bad residual");
    e.res = res.data_ptr();
    e.res16 = res.scalar_type() == at::kBFloat16;
  }
  auto sizes = x_.sizes().vec();
  sizes.back() = N;
  auto y = at::empty(sizes, x_.options());
  if (M == 0) return y;
  e.y = y.data_ptr();
  auto px = (const float*)x.data_ptr();
  auto go = [&](auto* pw) {
    using W = std::remove_const_t<std::remove_pointer_t<decltype(pw)>>;
    by_rows(M, [&](auto m) {
      if (avx512) run512<W, decltype(m)::value>(px, K, pw, NB, e);
      else run256<W, decltype(m)::value>(px, K, pw, NB, e);
    });
  };
  if (w16) go((const uint16_t*)wp.data_ptr());
  else go((const float*)wp.data_ptr());
  return y;
}

static void check_packed(const at::Tensor& wp) {
  TORCH_CHECK(wp.is_contiguous() && ((wp.dim() == 3 && wp.size(2) == 16
              && (wp.scalar_type() == at::kFloat || wp.scalar_type() == at::kBFloat16))
              || (wp.dim() == 4 && wp.size(2) == 16 && wp.size(3) == 2
                  && wp.scalar_type() == at::kBFloat16)), "linear: bad packed weight");
}

// x [..., K] (at most 8 rows), residual with x's rows -> y [..., N]: the AVX-512 variants.
at::Tensor linear(const at::Tensor& x, const at::Tensor& wp, const std::optional<at::Tensor>& bias,
                  const std::optional<at::Tensor>& residual) {
  check_packed(wp);
  if (wp.dim() == 4) return linear_bf16(x, wp, bias, residual);
  return linear_fp32(x, wp, bias, residual, true);
}

// The same with AVX2 + FMA ([N/16, K, 16] weights only).
at::Tensor linear_avx2(const at::Tensor& x, const at::Tensor& wp,
                       const std::optional<at::Tensor>& bias,
                       const std::optional<at::Tensor>& residual) {
  check_packed(wp);
  TORCH_CHECK(wp.dim() == 3, "linear: bad packed weight (the bf16-dot layout needs AVX512-BF16)");
  return linear_fp32(x, wp, bias, residual, false);
}

// One cached decoding step of attention for every (sequence, head): write the position's
// key and value (from the q/k/v projection qkv [B, 3*H*d], fp32 or bf16) into the fp32
// caches [B, H, L, d] at `offset`, then attend the query over the keys the pattern allows,
// given as (start, stop, step) triples; out [B, H*d] in qkv's dtype. In place of slicing the
// keys out of the cache, concatenating them and calling SDPA: three ops and two copies of
// the keys a layer (the most time of a bf16 L16 step after the weight reads).
#define AVX2 __attribute__((target("avx2,fma")))

// e^x for 8 floats (Cephes' expf: x = n ln2 + r, a degree-6 polynomial in r, times 2^n);
// within 2 ulp of expf over the range where the result is a normal float.
AVX2 static inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// gelu(g) = g/2 (1 + erf(g/sqrt 2)) for 8 floats. erfc(|z|) from Abramowitz & Stegun 7.1.26
// (absolute error < 1.5e-7), so 1 + erf(z) is erfc(|z|) for z < 0 (no cancellation where
// gelu is tiny) and 2 - erfc(z) for z >= 0.
AVX2 static inline __m256 gelu8(__m256 g) {
  __m256 z = _mm256_mul_ps(g, _mm256_set1_ps(0.70710678f));
  __m256 a = _mm256_andnot_ps(_mm256_set1_ps(-0.f), z);
  __m256 t = _mm256_div_ps(_mm256_set1_ps(1.f), _mm256_fmadd_ps(a, _mm256_set1_ps(0.3275911f), _mm256_set1_ps(1.f)));
  __m256 p = _mm256_set1_ps(1.061405429f);
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-1.453152027f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.421413741f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-0.284496736f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(0.254829592f));
  __m256 erfc = _mm256_mul_ps(_mm256_mul_ps(p, t), exp8(_mm256_mul_ps(_mm256_sub_ps(_mm256_setzero_ps(), a), a)));
  __m256 one_plus = _mm256_blendv_ps(_mm256_sub_ps(_mm256_set1_ps(2.f), erfc), erfc, z);  // sign of z
  return _mm256_mul_ps(_mm256_mul_ps(g, _mm256_set1_ps(0.5f)), one_plus);
}

template <typename T> AVX2 static inline __m256 load8(const T* p) {
  if constexpr (std::is_same_v<T, float>) return _mm256_loadu_ps(p);
  else return _mm256_castsi256_ps(_mm256_slli_epi32(
      _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}

template <typename T> AVX2 static inline void store8(T* p, __m256 v) {
  if constexpr (std::is_same_v<T, float>) {
    _mm256_storeu_ps(p, v);
  } else {
    alignas(32) float tmp[8];
    _mm256_store_ps(tmp, v);
    for (int i = 0; i < 8; ++i) p[i] = (T)tmp[i];  // round to nearest even, as PyTorch
  }
}

// y = x[:, :F] * gelu(x[:, F:]) for rows of 2F (GEGLU), in fp32, one rounding to T.
template <typename T>
AVX2 static void geglu_rows(const T* x, T* y, int64_t rows, int64_t F) {
  for (int64_t m = 0; m < rows; ++m) {
    const T* v = x + m * 2 * F;
    const T* g = v + F;
    T* out = y + m * F;
    int64_t j = 0;
    for (; j + 8 <= F; j += 8) store8(out + j, _mm256_mul_ps(load8(v + j), gelu8(load8(g + j))));
    for (; j < F; ++j) {
      float gj = (float)g[j];
      out[j] = (T)((float)v[j] * 0.5f * gj * (1.f + std::erf(gj * 0.70710678f)));
    }
  }
}

// LayerNorm of rows of D in fp32 (two passes), weight and bias in T, out in T.
template <typename T>
AVX2 static void layer_norm_rows(const T* x, const T* w, const T* b, float eps, T* y,
                                 int64_t rows, int64_t D) {
  for (int64_t m = 0; m < rows; ++m) {
    const T* r = x + m * D;
    float mean = 0.f, var = 0.f;
    for (int64_t j = 0; j < D; ++j) mean += (float)r[j];
    mean /= D;
    for (int64_t j = 0; j < D; ++j) { float c = (float)r[j] - mean; var += c * c; }
    float rstd = 1.f / std::sqrt(var / D + eps);
    for (int64_t j = 0; j < D; ++j) y[m * D + j] = (T)(((float)r[j] - mean) * rstd * (float)w[j] + (float)b[j]);
  }
}

__attribute__((target("avx2,fma"))) static inline float dot_avx2(const float* a, const float* b, int64_t d) {
  int64_t j = 0;
  __m256 s = _mm256_setzero_ps();
  for (; j + 8 <= d; j += 8) s = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), s);
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_movehdup_ps(h));
  float out = _mm_cvtss_f32(h);
  for (; j < d; ++j) out += a[j] * b[j];
  return out;
}

// One (sequence, head): the query against the keys of `slices`, softmax, the values' sum.
template <typename T>
AVX2 static void attend_head(const T* row, float* K, float* V, T* out, int64_t H, int64_t h,
                             int64_t d, int64_t offset, const std::vector<int64_t>& slices,
                             float* q, float* acc, float* score, int64_t count) {
  const float scale = 1.0f / std::sqrt((float)d);
  for (int64_t j = 0; j < d; ++j) {
    q[j] = (float)row[h * d + j] * scale;
    K[offset * d + j] = (float)row[(H + h) * d + j];
    V[offset * d + j] = (float)row[(2 * H + h) * d + j];
  }
  int64_t n = 0;
  float top = -INFINITY;
  for (size_t s = 0; s < slices.size(); s += 3)
    for (int64_t p = slices[s]; p < slices[s + 1]; p += slices[s + 2]) {
      float dot = dot_avx2(q, K + p * d, d);
      score[n++] = dot;
      top = std::max(top, dot);
    }
  __m256 shift = _mm256_set1_ps(top), sum8 = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + 8 <= count; c += 8) {
    __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(score + c), shift));
    _mm256_storeu_ps(score + c, e);
    sum8 = _mm256_add_ps(sum8, e);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, sum8);
  float total = 0.f;
  for (int l = 0; l < 8; ++l) total += lanes[l];
  for (; c < count; ++c) total += (score[c] = std::exp(score[c] - top));
  std::fill(acc, acc + d, 0.f);
  n = 0;
  for (size_t s = 0; s < slices.size(); s += 3)
    for (int64_t p = slices[s]; p < slices[s + 1]; p += slices[s + 2]) {
      float w = score[n++];
      const float* v = V + p * d;
      for (int64_t j = 0; j < d; ++j) acc[j] += w * v[j];
    }
  for (int64_t j = 0; j < d; ++j) out[h * d + j] = (T)(acc[j] / total);
}

template <typename T>
static void attend_rows(const T* qkv, float* kc, float* vc, T* out, int64_t B, int64_t H, int64_t L,
                        int64_t d, int64_t offset, const std::vector<int64_t>& slices, int64_t count) {
  at::parallel_for(0, B * H, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> q(d), acc(d), score(count);
    for (int64_t i = i0; i < i1; ++i) {
      int64_t b = i / H;
      attend_head<T>(qkv + b * 3 * H * d, kc + i * L * d, vc + i * L * d, out + b * H * d, H, i % H,
                     d, offset, slices, q.data(), acc.data(), score.data(), count);
    }
  });
}

at::Tensor attend_step(const at::Tensor& qkv, at::Tensor& k_cache, at::Tensor& v_cache,
                       int64_t offset, const std::vector<int64_t>& slices) {
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.scalar_type() == at::kFloat && k_cache.is_contiguous()
              && v_cache.sizes() == k_cache.sizes() && v_cache.scalar_type() == at::kFloat
              && v_cache.is_contiguous(), "attend_step: bad cache");
  int64_t B = k_cache.size(0), H = k_cache.size(1), L = k_cache.size(2), d = k_cache.size(3);
  TORCH_CHECK(qkv.is_contiguous() && qkv.numel() == B * 3 * H * d
              && (qkv.scalar_type() == at::kFloat || qkv.scalar_type() == at::kBFloat16),
              "attend_step: bad qkv");
  TORCH_CHECK(0 <= offset && offset < L && slices.size() % 3 == 0, "attend_step: bad position");
  int64_t count = 0;
  for (size_t s = 0; s < slices.size(); s += 3) {
    TORCH_CHECK(slices[s] >= 0 && slices[s + 1] <= offset + 1 && slices[s + 2] > 0,
                "attend_step: a key slice past the position");
    if (slices[s + 1] > slices[s]) count += (slices[s + 1] - slices[s] + slices[s + 2] - 1) / slices[s + 2];
  }
  TORCH_CHECK(count > 0, "attend_step: no keys");
  auto out = at::empty({B, H * d}, qkv.options());
  if (qkv.scalar_type() == at::kFloat)
    attend_rows<float>((const float*)qkv.data_ptr(), (float*)k_cache.data_ptr(), (float*)v_cache.data_ptr(),
                       (float*)out.data_ptr(), B, H, L, d, offset, slices, count);
  else
    attend_rows<c10::BFloat16>((const c10::BFloat16*)qkv.data_ptr(), (float*)k_cache.data_ptr(),
                               (float*)v_cache.data_ptr(), (c10::BFloat16*)out.data_ptr(), B, H, L,
                               d, offset, slices, count);
  return out;
}

// A whole pre-norm block for one decoding position, LayerScale folded into the output
// projections (no sandwich norm): x + out(attn(LN1 x)), then + ff_out(geglu(ff_in(LN2 x))).
// The same ops as the Python step, called from here: one call a layer instead of about
// twenty Python-level ones.
at::Tensor block_step(bool avx512, const at::Tensor& x, const at::Tensor& ln1_w, const at::Tensor& ln1_b,
                      double ln1_eps, const at::Tensor& qkv_w, at::Tensor& k_cache,
                      at::Tensor& v_cache, int64_t offset, const std::vector<int64_t>& slices,
                      const at::Tensor& out_w, const std::optional<at::Tensor>& out_b,
                      const at::Tensor& ln2_w, const at::Tensor& ln2_b, double ln2_eps,
                      const at::Tensor& ff_in_w, const std::optional<at::Tensor>& ff_in_b,
                      const at::Tensor& ff_out_w, const std::optional<at::Tensor>& ff_out_b) {
  auto lin = [&](const at::Tensor& a, const at::Tensor& w, const std::optional<at::Tensor>& b,
                 const std::optional<at::Tensor>& res) {
    return avx512 ? linear(a, w, b, res) : linear_avx2(a, w, b, res);
  };
  const std::optional<at::Tensor> none;
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && (x.scalar_type() == at::kFloat
              || x.scalar_type() == at::kBFloat16), "block_step: bad input");
  for (const at::Tensor* t : {&ln1_w, &ln1_b, &ln2_w, &ln2_b})
    TORCH_CHECK(t->is_contiguous() && t->scalar_type() == x.scalar_type() && t->numel() == x.size(1),
                "block_step: bad norm");
  bool bf16 = x.scalar_type() == at::kBFloat16;
  auto norm = [&](const at::Tensor& in, const at::Tensor& w, const at::Tensor& b, double eps) {
    auto out = at::empty_like(in);
    if (bf16)
      layer_norm_rows<c10::BFloat16>((const c10::BFloat16*)in.data_ptr(), (const c10::BFloat16*)w.data_ptr(),
                                     (const c10::BFloat16*)b.data_ptr(), (float)eps,
                                     (c10::BFloat16*)out.data_ptr(), in.size(0), in.size(1));
    else
      layer_norm_rows<float>((const float*)in.data_ptr(), (const float*)w.data_ptr(),
                             (const float*)b.data_ptr(), (float)eps, (float*)out.data_ptr(),
                             in.size(0), in.size(1));
    return out;
  };
  auto a = attend_step(lin(norm(x, ln1_w, ln1_b, ln1_eps), qkv_w, none, none), k_cache, v_cache,
                       offset, slices);
  auto y = lin(a, out_w, out_b, x);
  auto f = lin(norm(y, ln2_w, ln2_b, ln2_eps), ff_in_w, ff_in_b, none);
  int64_t F = f.size(1) / 2;
  auto g = at::empty({f.size(0), F}, f.options());
  if (bf16)
    geglu_rows<c10::BFloat16>((const c10::BFloat16*)f.data_ptr(), (c10::BFloat16*)g.data_ptr(), f.size(0), F);
  else
    geglu_rows<float>((const float*)f.data_ptr(), (float*)g.data_ptr(), f.size(0), F);
  return lin(g, ff_out_w, ff_out_b, y);
}

// GEGLU of rows [M, 2F] -> [M, F] as block_step computes it (for the tests)
at::Tensor geglu(const at::Tensor& h_) {
  auto h = h_.contiguous();
  TORCH_CHECK(h.dim() == 2 && h.size(1) % 2 == 0 && (h.scalar_type() == at::kFloat
              || h.scalar_type() == at::kBFloat16), "geglu: bad input");
  auto y = at::empty({h.size(0), h.size(1) / 2}, h.options());
  if (h.scalar_type() == at::kFloat)
    geglu_rows<float>((const float*)h.data_ptr(), (float*)y.data_ptr(), h.size(0), h.size(1) / 2);
  else
    geglu_rows<c10::BFloat16>((const c10::BFloat16*)h.data_ptr(), (c10::BFloat16*)y.data_ptr(),
                              h.size(0), h.size(1) / 2);
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("geglu", &geglu);
  m.def("block_step", &block_step);
  m.def("linear", &linear);
  m.def("linear_avx2", &linear_avx2);
  m.def("attend_step", &attend_step);
}
"""

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


def block_step():
    """The kernel's whole block step for one position (:func:`attention_step` between the
    block's norms and products; ``block_step(x, ln1_w, ln1_b, ln1_eps, qkv_w, k_cache,
    v_cache, offset, slices, out_w, out_b, ln2_w, ln2_b, ln2_eps, ff_in_w, ff_in_b,
    ff_out_w, ff_out_b)`` with packed weights), or None where the kernel is not used."""
    module = kernel()
    if module is None or not _cpu_ok():
        return None
    return functools.partial(module.block_step, variant() == "avx512")


def attention_step():
    """The kernel's one-position attention step (``attend_step(qkv, k_cache, v_cache,
    offset, slices)``: writes the position's key/value into the fp32 caches and attends over
    the keys in the flat (start, stop, step) ``slices``), or None where the kernel is not
    used (any AVX2 + FMA CPU has it)."""
    module = kernel()
    return None if module is None or not _cpu_ok() else module.attend_step


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


# Blocks of 16 rows interleaved k-major in pack_rows' layout, per kernel variant (the AVX-512
# kernel's GROUP; 1: one block after another)
GROUPS = {"avx512": 4, "avx2": 1}


def _group(group: int | None) -> int:
    return group or GROUPS.get(variant() or "avx2", 1)


def pack_rows(w: torch.Tensor, group: int | None = None) -> torch.Tensor:
    """[N, K] -> the fp32-arithmetic layout (fp32 or bf16): blocks of 16 rows in groups of
    ``group`` (default: this CPU's variant's, :data:`GROUPS`), each group ``[K, group, 16]``
    (one contiguous stream for the kernel); shaped ``[N/16, K, 16]``."""
    n, k = w.shape
    parts = [g.permute(2, 0, 1).reshape(-1) for g in w.view(n // 16, 16, k).split(_group(group))]
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
    """bf16 [N, K] -> [N/16, K/2, 16, 2] (the native bf16 layout: k-pairs of 16 rows, one
    block after another)."""
    n, k = w.shape
    return w.view(n // 16, 16, k // 2, 2).permute(0, 2, 1, 3).contiguous()


def unpack(packed: torch.Tensor, group: int | None = None) -> torch.Tensor:
    """The weight that :func:`pack` packed (exactly; in the stored dtype); ``group`` as for
    :func:`pack_rows`."""
    nb, k = packed.shape[:2]
    if packed.dim() == 4:  # [N/16, K/2, 16, 2]
        return packed.permute(0, 2, 1, 3).reshape(nb * 16, k * 2)
    flat, out, start, group = packed.reshape(-1), [], 0, _group(group)
    for b0 in range(0, nb, group):  # groups [K, size, 16], k-major
        size = min(group, nb - b0)
        out.append(flat[start : start + size * k * 16].view(k, size, 16).permute(1, 2, 0))
        start += size * k * 16
    return torch.cat(out).reshape(nb * 16, k)


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None,
           residual: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias (+ residual)`` for ``x`` ``[..., K]`` of at most ``MAX_ROWS`` rows and
    ``packed = pack(W, bias, store)``: fp32-stored W takes fp32 x, bias, residual; bf16-stored
    W (fp32 arithmetic) takes each of them in fp32 or bf16 and returns x's dtype; the native
    bf16 layout takes bf16 (callers in a hurry call :func:`function`'s result directly)."""
    return function()(x, packed, bias, residual)
