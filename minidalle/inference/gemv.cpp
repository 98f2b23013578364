// Matrix products for 1-8 rows that stream the weights at the memory rate, and the rest of a
// cached decoding step, for minidalle/inference/gemv.py (which documents the layouts and
// variants; each function names its own instruction set, chosen at run time).
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/csrc/utils/pybind.h>
#include <immintrin.h>
#include <omp.h>
#include <algorithm>
#include <cstring>
#include <atomic>
#include <memory>
#include <functional>
#include <optional>
#include <type_traits>
#include <cmath>
#include <vector>
#include <c10/util/BFloat16.h>

// Packed weights hold blocks of 16 output rows in groups of GROUP blocks (the last group may
// be smaller), each group stored k-major, so that the products of a group read one
// contiguous stream: four 16-KB streams at once read 10-25% slower from DRAM on Zen 4 when
// the machine reads fast (RESULTS, sessions 9 and 10). The AVX2 kernel (1-4 blocks at a
// time, depending on the rows) reads the same layout for bf16-stored weights: for one row a
// group at a time, one stream (a cached image 20% faster than with one block after another,
// 8 rows together 3-5% slower, as each of their passes reads part of a group's lines); fp32
// weights keep one block after another (grouped, 8 fp32 rows took 40% longer, 2 rows 35%:
// RESULTS, session 11).
constexpr int64_t GROUP = 4;

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
KERNEL512 static void blocks512(const float* x, int64_t xs, int64_t K, const W* w, int64_t stride,
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
        __m512 xv = _mm512_set1_ps(x[m * xs + k]);
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


// A product y = x W^T (+ bias) (+ residual) of at most 8 rows, split into units (groups of row
// blocks, or of vectors for AVX2) that threads take in contiguous ranges: at::parallel_for
// for one product, or a share of each product inside the decoding step's parallel region.
struct Product {
  int64_t units = 0, rows = 0;  // rows: output rows per unit (the last unit may have fewer)
  std::function<void(int64_t, int64_t)> run;
};

// Thread t of n's units [first, second): the split at::parallel_for makes.
static inline std::pair<int64_t, int64_t> share(int64_t units, int t, int n) {
  int64_t chunk = (units + n - 1) / n;
  return {std::min(units, t * chunk), std::min(units, (t + 1) * chunk)};
}

// Calls f(std::integral_constant<int, S>) for S = 1..4 (a group's blocks).
template <typename F>
static void by_size(int64_t size, F&& f) {
  switch (size) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    default: f(std::integral_constant<int, 4>{}); break;
  }
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

// More than 4 rows: rows 0-3 then the rest, group by group (the second pass reads the group's
// weights from L2), as the kernels keep at most 4 rows x 4 blocks of sums. `xstep`: x's
// elements per row.
template <int M, typename X, typename G>
static void in_row_halves(const X* x, int64_t xstep, const Epilogue& e, G&& group) {
  if constexpr (M <= 4) {
    group(std::integral_constant<int, M>{}, x, e);
  } else {
    group(std::integral_constant<int, 4>{}, x, e);
    group(std::integral_constant<int, M - 4>{}, x + 4 * xstep, rows_from(e, 4));
  }
}

// ---- The native bf16 product (AVX512-BF16): groups [K/2, S, 16, 2], one 64-byte load holding
// two k-values of 16 output rows; _mm512_dpbf16_ps multiplies them by a broadcast pair of
// inputs and accumulates in fp32. x, bias, residual and y in bf16.
#define KERNEL __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

KERNEL static inline __m512 widen(const uint16_t* p) {  // 16 bf16 -> fp32
  return _mm512_castsi512_ps(_mm512_slli_epi32(
      _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

// y[m, rows of S blocks from block nb0] from the group's weights w.
template <int M, int S>
KERNEL static void group_bf16(const uint32_t* x, int64_t xs, int64_t K2, const uint16_t* w, int64_t nb0,
                              const Epilogue& e) {
  __m512 acc[M][S];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < S; ++r) acc[m][r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K2; ++k) {
    __m512i wv[S];
    for (int r = 0; r < S; ++r) wv[r] = _mm512_loadu_si512(w + (k * S + r) * 32);
    for (int m = 0; m < M; ++m) {
      __m512bh xv = (__m512bh)_mm512_set1_epi32(x[m * xs + k]);  // (x[2k], x[2k+1])
      for (int r = 0; r < S; ++r) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], xv, (__m512bh)wv[r]);
    }
  }
  auto bias = (const uint16_t*)e.bias, res = (const uint16_t*)e.res;
  for (int r = 0; r < S; ++r) {
    int64_t n0 = (nb0 + r) * 16;
    __m512 b = bias ? widen(bias + n0) : _mm512_setzero_ps();
    for (int m = 0; m < M; ++m) {
      __m512 v = _mm512_add_ps(acc[m][r], b);
      if (res) v = _mm512_add_ps(v, widen(res + m * e.N + n0));
      if (e.y16) _mm256_storeu_si256((__m256i*)((uint16_t*)e.y + m * e.N + n0), (__m256i)_mm512_cvtneps_pbh(v));
      else _mm512_storeu_ps((float*)e.y + m * e.N + n0, v);  // a partial sum
    }
  }
}

static Product product_bf16(const uint32_t* x, int64_t xs, int64_t M, int64_t K2, const uint16_t* wp,
                            int64_t NB, Epilogue e) {
  Product p;
  p.units = (NB + GROUP - 1) / GROUP;
  p.rows = GROUP * 16;
  p.run = [=](int64_t g0, int64_t g1) {
    by_rows(M, [&](auto m) {
      for (int64_t g = g0; g < g1; ++g) {
        int64_t b0 = g * GROUP;
        const uint16_t* w = wp + b0 * K2 * 32;
        by_size(std::min(GROUP, NB - b0), [&](auto s) {
          in_row_halves<decltype(m)::value>(x, xs, e, [&](auto r, const uint32_t* xr, const Epilogue& er) {
            group_bf16<decltype(r)::value, decltype(s)::value>(xr, xs, K2, w, b0, er);
          });
        });
      }
    });
  };
  return p;
}

// ---- fp32 arithmetic, AVX-512: groups [K, S, 16] of fp32 or bf16-stored weights.
template <typename W>
static Product product512(const float* x, int64_t xs, int64_t M, int64_t K, const W* wp, int64_t NB,
                          Epilogue e) {
  Product p;
  p.units = (NB + GROUP - 1) / GROUP;
  p.rows = GROUP * 16;
  p.run = [=](int64_t g0, int64_t g1) {
    by_rows(M, [&](auto m) {
      for (int64_t g = g0; g < g1; ++g) {
        int64_t b0 = g * GROUP, size = std::min(GROUP, NB - b0);
        const W* w = wp + b0 * K * 16;
        by_size(size, [&](auto s) {
          in_row_halves<decltype(m)::value>(x, xs, e, [&](auto r, const float* xr, const Epilogue& er) {
            blocks512<W, decltype(r)::value, decltype(s)::value>(xr, xs, K, w, size * 16, b0, er);
          });
        });
      }
    });
  };
  return p;
}

// AVX2: y[m, 8v:8v+8] for V vectors of 8 output rows from vector v0 (vector v: half v % 2
// of block v / 2). 16 registers: M x V accumulators + V weights + one x stay below 16.
template <typename W, int M, int V>
KERNEL256 static void vectors256(const float* x, int64_t xs, int64_t K, const W* wp, int64_t NB, int64_t G,
                                 int64_t v0, const Epilogue& e) {
  const W* w[V];
  int64_t stride[V];  // between k-values: the group's blocks x 16
  for (int j = 0; j < V; ++j) {
    int64_t b = (v0 + j) >> 1, g = b / G;
    stride[j] = std::min(G, NB - g * G) * 16;
    w[j] = wp + g * G * K * 16 + (b - g * G) * 16 + ((v0 + j) & 1) * 8;
  }
  __m256 acc[M][V];
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < V; ++j) acc[m][j] = _mm256_setzero_ps();
  for (int64_t k0 = 0; k0 < K; k0 += CHUNK) {
    __m256 part[M][V];
    for (int m = 0; m < M; ++m)
      for (int j = 0; j < V; ++j) part[m][j] = _mm256_setzero_ps();
    for (int64_t k = k0; k < std::min(K, k0 + CHUNK); ++k) {
      __m256 wv[V];
      for (int j = 0; j < V; ++j) wv[j] = load256(w[j] + k * stride[j]);
      for (int m = 0; m < M; ++m) {
        __m256 xv = _mm256_broadcast_ss(x + m * xs + k);
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


// Vectors of 8 rows per unit for AVX2: as many accumulators as 16 registers allow.
static inline int64_t vectors_per_unit(int64_t M) { return M == 1 ? 8 : M == 2 ? 4 : M <= 4 ? 2 : 1; }

// ---- fp32 arithmetic, AVX2 + FMA: blocks [K, 16] one after another, units of V vectors.
template <typename W>
static Product product256(const float* x, int64_t xs, int64_t M, int64_t K, const W* wp, int64_t NB,
                          Epilogue e) {
  Product p;
  int64_t V = vectors_per_unit(M), NV = 2 * NB;
  const int64_t G = sizeof(W) == 2 ? GROUP : 1;  // bf16-stored weights grouped, fp32 blocks one after another
  p.units = (NV + V - 1) / V;
  p.rows = V * 8;
  p.run = [=](int64_t g0, int64_t g1) {
    by_rows(M, [&](auto m) {
      constexpr int R = decltype(m)::value;
      constexpr int VV = R == 1 ? 8 : R == 2 ? 4 : R <= 4 ? 2 : 1;
      for (int64_t g = g0; g < g1; ++g) {
        if ((g + 1) * VV <= NV) vectors256<W, R, VV>(x, xs, K, wp, NB, G, g * VV, e);
        else for (int64_t v = g * VV; v < NV; ++v) vectors256<W, R, 1>(x, xs, K, wp, NB, G, v, e);
      }
    });
  };
  return p;
}

// The product of a packed weight for M rows of x (bf16 pairs for the native bf16 layout, fp32
// otherwise), with e's bias, residual and output. x's rows are `x_stride` elements apart
// (default: the weight's K; more where the weight takes a slice of x's columns).
static Product make_product(bool avx512, const at::Tensor& wp, const void* x, int64_t M, const Epilogue& e,
                            int64_t x_stride = -1) {
  int64_t NB = wp.size(0), K = wp.size(1);
  bool native = wp.dim() == 4;
  int64_t xs = x_stride < 0 ? (native ? 2 * K : K) : x_stride;
  if (native) {
    TORCH_CHECK(xs % 2 == 0, "a native bf16 product takes rows of whole pairs");
    return product_bf16((const uint32_t*)x, xs / 2, M, K, (const uint16_t*)wp.data_ptr(), NB, e);
  }
  bool w16 = wp.scalar_type() == at::kBFloat16;
  auto xf = (const float*)x;
  if (avx512) {
    if (w16) return product512<uint16_t>(xf, xs, M, K, (const uint16_t*)wp.data_ptr(), NB, e);
    return product512<float>(xf, xs, M, K, (const float*)wp.data_ptr(), NB, e);
  }
  if (w16) return product256<uint16_t>(xf, xs, M, K, (const uint16_t*)wp.data_ptr(), NB, e);
  return product256<float>(xf, xs, M, K, (const float*)wp.data_ptr(), NB, e);
}

static void run_parallel(const Product& p) {
  at::parallel_for(0, p.units, 1, [&](int64_t u0, int64_t u1) { p.run(u0, u1); });
}

static void check_packed(const at::Tensor& wp) {
  TORCH_CHECK(wp.is_contiguous() && ((wp.dim() == 3 && wp.size(2) == 16
              && (wp.scalar_type() == at::kFloat || wp.scalar_type() == at::kBFloat16))
              || (wp.dim() == 4 && wp.size(2) == 16 && wp.size(3) == 2
                  && wp.scalar_type() == at::kBFloat16)), "linear: bad packed weight");
}

static int64_t packed_k(const at::Tensor& wp) { return wp.dim() == 4 ? 2 * wp.size(1) : wp.size(1); }

// The epilogue of one product call: bias and residual in fp32 or bf16 (bf16 only for the
// native layout), y allocated in x's dtype.
static Epilogue epilogue_for(const at::Tensor& wp, bool native, const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& residual, at::Tensor& b, at::Tensor& res,
                             at::ScalarType xtype, int64_t M) {
  bool w16 = wp.scalar_type() == at::kBFloat16;
  int64_t N = wp.size(0) * 16;
  auto ok = [&](const at::Tensor& t) {
    return native ? t.scalar_type() == at::kBFloat16
                  : t.scalar_type() == at::kFloat || (w16 && t.scalar_type() == at::kBFloat16);
  };
  Epilogue e{nullptr, false, nullptr, false, nullptr, xtype == at::kBFloat16, N};
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
  return e;
}

// x [..., K] (at most 8 rows), residual with x's rows -> y [..., N]. avx512: the AVX-512
// variants (native bf16 for the 4-d layout), else AVX2 + FMA ([N/16, K, 16] weights only).
static at::Tensor linear_any(const at::Tensor& x_, const at::Tensor& wp, const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& residual, bool avx512) {
  check_packed(wp);
  bool native = wp.dim() == 4;
  TORCH_CHECK(avx512 || !native, "linear: bad packed weight (the bf16-dot layout needs AVX512-BF16)");
  bool w16 = wp.scalar_type() == at::kBFloat16;
  int64_t K = packed_k(wp), N = wp.size(0) * 16;
  TORCH_CHECK(x_.dim() >= 1 && x_.size(-1) == K && x_.numel() <= 8 * K
              && (native ? x_.scalar_type() == at::kBFloat16
                         : x_.scalar_type() == at::kFloat || (w16 && x_.scalar_type() == at::kBFloat16)),
              "linear: bad input");
  auto x = x_.reshape({-1, K});
  x = native ? x.contiguous() : x.to(at::kFloat).contiguous();
  int64_t M = x.size(0);
  at::Tensor b, res;
  Epilogue e = epilogue_for(wp, native, bias, residual, b, res, x_.scalar_type(), M);
  auto sizes = x_.sizes().vec();
  sizes.back() = N;
  auto y = at::empty(sizes, x_.options());
  if (M == 0) return y;
  e.y = y.data_ptr();
  run_parallel(make_product(avx512, wp, x.data_ptr(), M, e));
  return y;
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& wp, const std::optional<at::Tensor>& bias,
                  const std::optional<at::Tensor>& residual) {
  return linear_any(x, wp, bias, residual, true);
}

at::Tensor linear_avx2(const at::Tensor& x, const at::Tensor& wp, const std::optional<at::Tensor>& bias,
                       const std::optional<at::Tensor>& residual) {
  return linear_any(x, wp, bias, residual, false);
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

// y = x[:, :F] * gelu(x[:, F:]) for rows of 2F (GEGLU), columns [j0, j1) of each row (j0 a
// multiple of 8), in fp32, one rounding to T.
template <typename T>
AVX2 static void geglu_block(const T* v, const T* g, T* out, int64_t n) {  // out = v * gelu(g), n values
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) store8(out + j, _mm256_mul_ps(load8(v + j), gelu8(load8(g + j))));
  for (; j < n; ++j) {
    float gj = (float)g[j];
    out[j] = (T)((float)v[j] * 0.5f * gj * (1.f + std::erf(gj * 0.70710678f)));
  }
}

template <typename T>
AVX2 static void geglu_cols(const T* x, T* y, int64_t rows, int64_t F, int64_t j0, int64_t j1) {
  for (int64_t m = 0; m < rows; ++m) geglu_block(x + m * 2 * F + j0, x + m * 2 * F + F + j0, y + m * F + j0, j1 - j0);
}

AVX2 static inline float sum8(__m256 v) {  // the sum of the 8 lanes
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}

// LayerNorm of rows of D in fp32 (two passes), weight and bias in T, out in T.
template <typename T>
AVX2 static void layer_norm_rows(const T* x, const T* w, const T* b, float eps, T* y,
                                 int64_t rows, int64_t D) {
  for (int64_t m = 0; m < rows; ++m) {
    const T* r = x + m * D;
    T* out = y + m * D;
    int64_t v = D / 8 * 8;
    __m256 s = _mm256_setzero_ps();
    for (int64_t j = 0; j < v; j += 8) s = _mm256_add_ps(s, load8(r + j));
    float mean = sum8(s);
    for (int64_t j = v; j < D; ++j) mean += (float)r[j];
    mean /= D;
    __m256 mu = _mm256_set1_ps(mean);
    s = _mm256_setzero_ps();
    for (int64_t j = 0; j < v; j += 8) {
      __m256 c = _mm256_sub_ps(load8(r + j), mu);
      s = _mm256_fmadd_ps(c, c, s);
    }
    float var = sum8(s);
    for (int64_t j = v; j < D; ++j) { float c = (float)r[j] - mean; var += c * c; }
    float rstd = 1.f / std::sqrt(var / D + eps);
    __m256 rs = _mm256_set1_ps(rstd);
    for (int64_t j = 0; j < v; j += 8)
      store8(out + j, _mm256_fmadd_ps(_mm256_mul_ps(_mm256_sub_ps(load8(r + j), mu), rs), load8(w + j), load8(b + j)));
    for (int64_t j = v; j < D; ++j) out[j] = (T)(((float)r[j] - mean) * rstd * (float)w[j] + (float)b[j]);
  }
}

template <typename C>
AVX2 static inline float dot_avx2(const float* a, const C* b, int64_t d) {
  int64_t j = 0;
  __m256 s = _mm256_setzero_ps();
  for (; j + 8 <= d; j += 8) s = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), load8(b + j), s);
  float out = sum8(s);
  for (; j < d; ++j) out += a[j] * (float)b[j];
  return out;
}

// Scores of 4 keys at once (d a multiple of 8): four dot products, one reduction.
template <typename C>
AVX2 static inline void dot4(const float* q, const C* k0, const C* k1, const C* k2, const C* k3,
                             int64_t d, float* out) {
  __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
  for (int64_t j = 0; j < d; j += 8) {
    __m256 qv = _mm256_loadu_ps(q + j);
    s0 = _mm256_fmadd_ps(qv, load8(k0 + j), s0);
    s1 = _mm256_fmadd_ps(qv, load8(k1 + j), s1);
    s2 = _mm256_fmadd_ps(qv, load8(k2 + j), s2);
    s3 = _mm256_fmadd_ps(qv, load8(k3 + j), s3);
  }
  __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(s0, s1), _mm256_hadd_ps(s2, s3));
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
}

// acc[0:8W] = sum over the keys of score[c] * V[pos[c]][j0:j0+8W], the sums in registers.
template <int W, typename C>
AVX2 static inline void weigh_values(const C* V, int64_t d, int64_t j0, const int64_t* pos,
                                     const float* score, int64_t count, float* acc) {
  __m256 a[W];
  for (int u = 0; u < W; ++u) a[u] = _mm256_setzero_ps();
  for (int64_t c = 0; c < count; ++c) {
    __m256 w = _mm256_broadcast_ss(score + c);
    const C* v = V + pos[c] * d + j0;
    for (int u = 0; u < W; ++u) a[u] = _mm256_fmadd_ps(w, load8(v + 8 * u), a[u]);
  }
  for (int u = 0; u < W; ++u) _mm256_storeu_ps(acc + j0 + 8 * u, a[u]);
}

// One (sequence, head): the query against the keys of `slices`, softmax, the values' sum.
// The cache C: fp32, or bf16 for bf16 activations (whose keys and values are bf16 already,
// so it holds them exactly in half the bytes). Scratch: q, acc (d), score, pos (count).
template <typename T, typename C = float>
AVX2 static void attend_head(const T* row, C* K, C* V, T* out, int64_t H, int64_t h,
                             int64_t d, int64_t offset, const std::vector<int64_t>& slices,
                             float* q, float* acc, float* score, int64_t* pos, int64_t count) {
  const float scale = 1.0f / std::sqrt((float)d);
  for (int64_t j = 0; j < d; ++j) {
    q[j] = (float)row[h * d + j] * scale;
    K[offset * d + j] = (C)(float)row[(H + h) * d + j];
    V[offset * d + j] = (C)(float)row[(2 * H + h) * d + j];
  }
  int64_t n = 0;
  for (size_t s = 0; s < slices.size(); s += 3)
    for (int64_t p = slices[s]; p < slices[s + 1]; p += slices[s + 2]) pos[n++] = p;
  int64_t c = 0;
  if (d % 8 == 0)
    for (; c + 4 <= count; c += 4)
      dot4(q, K + pos[c] * d, K + pos[c + 1] * d, K + pos[c + 2] * d, K + pos[c + 3] * d, d, score + c);
  for (; c < count; ++c) score[c] = dot_avx2(q, K + pos[c] * d, d);
  float top = -INFINITY;
  for (c = 0; c < count; ++c) top = std::max(top, score[c]);
  __m256 shift = _mm256_set1_ps(top), sum8 = _mm256_setzero_ps();
  c = 0;
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
  if (d % 8 == 0) {
    for (int64_t j0 = 0; j0 < d; j0 += 64) {
      switch (std::min<int64_t>(64, d - j0) / 8) {
        case 1: weigh_values<1, C>(V, d, j0, pos, score, count, acc); break;
        case 2: weigh_values<2, C>(V, d, j0, pos, score, count, acc); break;
        case 3: weigh_values<3, C>(V, d, j0, pos, score, count, acc); break;
        case 4: weigh_values<4, C>(V, d, j0, pos, score, count, acc); break;
        case 5: weigh_values<5, C>(V, d, j0, pos, score, count, acc); break;
        case 6: weigh_values<6, C>(V, d, j0, pos, score, count, acc); break;
        case 7: weigh_values<7, C>(V, d, j0, pos, score, count, acc); break;
        default: weigh_values<8, C>(V, d, j0, pos, score, count, acc); break;
      }
    }
  } else {
    std::fill(acc, acc + d, 0.f);
    for (c = 0; c < count; ++c) {
      const C* v = V + pos[c] * d;
      for (int64_t j = 0; j < d; ++j) acc[j] += score[c] * (float)v[j];
    }
  }
  for (int64_t j = 0; j < d; ++j) out[h * d + j] = (T)(acc[j] / total);
}


template <typename T>
static void attend_rows(const T* qkv, float* kc, float* vc, T* out, int64_t B, int64_t H, int64_t L,
                        int64_t d, int64_t offset, const std::vector<int64_t>& slices, int64_t count) {
  at::parallel_for(0, B * H, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> q(d), acc(d), score(count);
    std::vector<int64_t> pos(count);
    for (int64_t i = i0; i < i1; ++i) {
      int64_t b = i / H;
      attend_head<T>(qkv + b * 3 * H * d, kc + i * L * d, vc + i * L * d, out + b * H * d, H, i % H,
                     d, offset, slices, q.data(), acc.data(), score.data(), pos.data(), count);
    }
  });
}

// The keys a position attends to: checks its (start, stop, step) slices, returns their count.
static int64_t count_keys(const std::vector<int64_t>& slices, int64_t offset) {
  TORCH_CHECK(slices.size() % 3 == 0, "attend_step: bad position");
  int64_t count = 0;
  for (size_t s = 0; s < slices.size(); s += 3) {
    TORCH_CHECK(slices[s] >= 0 && slices[s + 1] <= offset + 1 && slices[s + 2] > 0,
                "attend_step: a key slice past the position");
    if (slices[s + 1] > slices[s]) count += (slices[s + 1] - slices[s] + slices[s + 2] - 1) / slices[s + 2];
  }
  TORCH_CHECK(count > 0, "attend_step: no keys");
  return count;
}

static void check_cache(const at::Tensor& k, const at::Tensor& v, bool bf16_ok = false) {
  TORCH_CHECK(k.dim() == 4 && (k.scalar_type() == at::kFloat || (bf16_ok && k.scalar_type() == at::kBFloat16))
              && k.is_contiguous() && v.sizes() == k.sizes() && v.scalar_type() == k.scalar_type()
              && v.is_contiguous(), "attend_step: bad cache");
}

at::Tensor attend_step(const at::Tensor& qkv, at::Tensor& k_cache, at::Tensor& v_cache,
                       int64_t offset, const std::vector<int64_t>& slices) {
  check_cache(k_cache, v_cache);
  int64_t B = k_cache.size(0), H = k_cache.size(1), L = k_cache.size(2), d = k_cache.size(3);
  TORCH_CHECK(qkv.is_contiguous() && qkv.numel() == B * 3 * H * d
              && (qkv.scalar_type() == at::kFloat || qkv.scalar_type() == at::kBFloat16),
              "attend_step: bad qkv");
  TORCH_CHECK(0 <= offset && offset < L, "attend_step: bad position");
  int64_t count = count_keys(slices, offset);
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

// One id per row of logits [B, V] (fp32), as minidalle.inference.sampling.sample_logits
// draws it with top-k and no top-p: the logits divided by the temperature, those below the
// k-th largest dropped, softmax, then the first id whose cumulative probability passes
// u[b] x the total (u uniform in [0, 1)). The same draw up to rounding, in one call instead of
// about fifteen PyTorch ops (~0.3 ms a step when a decoding step has just streamed the
// weights through every cache).
template <typename F>
AVX2 static void exp_shifted(const float* x, float shift, float* out, int64_t n, F keep) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) _mm256_storeu_ps(out + j, exp8(_mm256_sub_ps(_mm256_loadu_ps(x + j), _mm256_set1_ps(shift))));
  for (; j < n; ++j) out[j] = std::exp(x[j] - shift);
  for (j = 0; j < n; ++j) if (!keep(x[j])) out[j] = 0.f;
}

// The draw itself on plain buffers (Stack.generate calls it a step with no tensor made):
// ids[b] for the rows of logits [B, V]; x, sorted, w: scratch of V values each, order of V
// ids. top_p < 1: then the nucleus filter of sampling.top_p_filter on the kept ids.
static void draw_top_k(const float* logits, int64_t B, int64_t V, int64_t k, float t, const float* u,
                       int64_t* ids, float* x, float* sorted, float* w, float top_p, int64_t* order) {
  for (int64_t b = 0; b < B; ++b) {
    const float* row = logits + b * V;
    for (int64_t j = 0; j < V; ++j) x[j] = t == 1.f ? row[j] : row[j] / t;
    float kth = -INFINITY;
    if (k < V) {
      std::copy(x, x + V, sorted);
      std::nth_element(sorted, sorted + (k - 1), sorted + V, std::greater<float>());
      kth = sorted[k - 1];
    }
    float top = *std::max_element(x, x + V);
    exp_shifted(x, top, w, V, [&](float v) { return v >= kth; });
    if (top_p < 1.f) {  // the kept ids, largest logit first; drop those whose preceding
                        // probability mass already reaches top_p (never the first)
      int64_t m = 0;
      float mass = 0.f;
      for (int64_t j = 0; j < V; ++j)
        if (w[j] > 0.f) { order[m++] = j; mass += w[j]; }
      std::sort(order, order + m, [&](int64_t a, int64_t c) { return x[a] > x[c] || (x[a] == x[c] && a < c); });
      double cum = 0;
      for (int64_t i = 0; i < m; ++i) {
        float p = w[order[i]] / mass;
        cum += p;
        if (i > 0 && (float)cum - p >= top_p) w[order[i]] = 0.f;
      }
    }
    double total = 0;
    for (int64_t j = 0; j < V; ++j) total += w[j];
    double target = (double)u[b] * total, run = 0;
    int64_t pick = -1, last = 0;
    for (int64_t j = 0; j < V; ++j) {
      if (w[j] <= 0.f) continue;
      last = j;
      run += w[j];
      if (run > target) { pick = j; break; }
    }
    ids[b] = pick < 0 ? last : pick;  // rounding: the last id kept
  }
}

at::Tensor sample_top_k(const at::Tensor& logits_, int64_t k, double temperature, const at::Tensor& u_,
                        double top_p) {
  auto logits = logits_.contiguous();
  auto u = u_.contiguous();
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.size(1) > 0,
              "sample_top_k: bad logits");
  int64_t B = logits.size(0), V = logits.size(1);
  TORCH_CHECK(u.scalar_type() == at::kFloat && u.numel() == B && k >= 1 && temperature > 0,
              "sample_top_k: bad arguments");
  auto ids = at::empty({B}, logits.options().dtype(at::kLong));
  std::vector<float> scratch(3 * V);
  std::vector<int64_t> order(V);
  draw_top_k((const float*)logits.data_ptr(), B, V, k, (float)temperature, (const float*)u.data_ptr(),
             (int64_t*)ids.data_ptr(), scratch.data(), scratch.data() + V, scratch.data() + 2 * V,
             (float)top_p, order.data());
  return ids;
}

// GEGLU of rows [M, 2F] -> [M, F] as the decoding step computes it (for the tests)
at::Tensor geglu(const at::Tensor& h_) {
  auto h = h_.contiguous();
  TORCH_CHECK(h.dim() == 2 && h.size(1) % 2 == 0 && (h.scalar_type() == at::kFloat
              || h.scalar_type() == at::kBFloat16), "geglu: bad input");
  int64_t F = h.size(1) / 2;
  auto y = at::empty({h.size(0), F}, h.options());
  if (h.scalar_type() == at::kFloat)
    geglu_cols<float>((const float*)h.data_ptr(), (float*)y.data_ptr(), h.size(0), F, 0, F);
  else
    geglu_cols<c10::BFloat16>((const c10::BFloat16*)h.data_ptr(), (c10::BFloat16*)y.data_ptr(),
                              h.size(0), F, 0, F);
  return y;
}

struct alignas(64) Claim {  // a share of a split product: its next unit, whether its inputs are ready
  std::atomic<int64_t> next{0};
  std::atomic<bool> ready{false};
};

// y[m] = the partial sums parts[c][m] (in order) + bias + res[m], rounded once to T: rows of D.
template <typename T>
AVX2 static void add_partials(const std::vector<const float*>& parts, const float* bias, const T* res, T* y,
                              int64_t rows, int64_t D) {
  for (int64_t m = 0; m < rows; ++m) {
    int64_t j = 0, o = m * D;
    for (; j + 8 <= D; j += 8) {
      __m256 v = _mm256_loadu_ps(parts[0] + o + j);
      for (size_t c = 1; c < parts.size(); ++c) v = _mm256_add_ps(v, _mm256_loadu_ps(parts[c] + o + j));
      if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + j));
      store8(y + o + j, _mm256_add_ps(v, load8(res + o + j)));
    }
    for (; j < D; ++j) {
      float v = parts[0][o + j];
      for (size_t c = 1; c < parts.size(); ++c) v += parts[c][o + j];
      if (bias) v += bias[j];
      y[o + j] = (T)(v + (float)res[o + j]);
    }
  }
}

// ---- A decoding step of a whole stack of pre-norm blocks, in one parallel region.
// Each block: x + out(attn(LN1 x)), then + ff_out(geglu(ff_in(LN2 x))), LayerScale folded into
// the output products. Every thread takes one share of each block (see run()): one region a
// step instead of five parallel loops and a Python call a layer (which cost 15-25% of an L16
// step's weight streaming when the machine reads fast: RESULTS, session 10), two barriers a
// block instead of six (session 11).
struct StackLayer {
  at::Tensor ln1_w, ln1_b, qkv;
  std::vector<at::Tensor> out;  // per share: the columns of its heads' inputs
  at::Tensor ln2_w, ln2_b, ff_in;
  std::vector<at::Tensor> ff_out;  // per share: the columns of its GEGLU outputs
  std::optional<at::Tensor> ff_in_b;
  float eps1, eps2;
  std::vector<std::vector<int64_t>> slices;  // per position: the keys as (start, stop, step)
  at::Tensor out_b32, ff_out_b32;  // the split products' biases in fp32 (undefined: none)
};

// The byte ranges of one head's keys and values at `slices` (for KeyPrefetch).
template <typename C>
static void key_ranges(const C* K, const C* V, int64_t d, const std::vector<int64_t>& slices,
                       std::vector<std::pair<const char*, int64_t>>& out) {
  const int64_t row = d * (int64_t)sizeof(C);
  for (size_t s = 0; s < slices.size(); s += 3) {
    if (slices[s + 1] <= slices[s]) continue;
    if (slices[s + 2] == 1) {
      out.push_back({(const char*)(K + slices[s] * d), (slices[s + 1] - slices[s]) * row});
      out.push_back({(const char*)(V + slices[s] * d), (slices[s + 1] - slices[s]) * row});
    } else {
      for (int64_t p = slices[s]; p < slices[s + 1]; p += slices[s + 2]) {
        out.push_back({(const char*)(K + p * d), row});
        out.push_back({(const char*)(V + p * d), row});
      }
    }
  }
}

// Brings a thread's heads' cached keys and values into L2 in slices, while the q/k/v product
// streams the weights: read in the attention itself, each head's keys are a few short streams
// that the hardware prefetcher barely starts, and an L16 layer's attention took 40 us from
// DRAM against 8 us from cache (RESULTS, session 10).
struct KeyPrefetch {
  std::vector<std::pair<const char*, int64_t>> ranges;
  size_t r = 0;
  int64_t done = 0, total = 0;
  void add_total() { total = 0; for (auto& x : ranges) total += x.second; }
  void next(int64_t bytes) {  // the next `bytes` of the ranges
    for (; r < ranges.size() && bytes > 0; ++r, done = 0) {
      const char* p = ranges[r].first;
      for (; done < ranges[r].second && bytes > 0; done += 64, bytes -= 64) _mm_prefetch(p + done, _MM_HINT_T1);
      if (done < ranges[r].second) return;
    }
  }
};

static void widen_rows(const c10::BFloat16* in, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = (float)in[i];
}

class Stack {
 public:
  // `splits`: the shares each block's work is cut into, one per thread (the threads a step
  // runs; fewer threads take several shares, more are left idle).
  Stack(bool avx512, int64_t heads, int64_t dim_head, int64_t splits)
      : avx512_(avx512), H_(heads), d_(dim_head), splits_(splits), team_(splits) {
    TORCH_CHECK(heads >= 1 && dim_head >= 1 && splits >= 1 && splits <= 256, "Stack: bad shape");
  }

  // The threads a step asks for (default: one a share; fewer run several shares each).
  void set_threads(int64_t n) {
    TORCH_CHECK(n >= 1, "Stack.set_threads: at least one thread");
    team_ = n;
  }

  // Share t's heads [h0, h1) and GEGLU columns [j0, j1) for a feed-forward width F. add()
  // takes the weights laid out by shares: `qkv`'s rows share by share, each share's the q,
  // then k, then v rows of its heads; `ff_in`'s rows share by share, each share's the value
  // then gate rows of its columns (so each share's rows are one stream); `out` and `ff_out`
  // one packed matrix a share, of the input columns of its heads and of its GEGLU columns.
  // Columns go by 64 (a unit's rows in every kernel) where F allows, else by 8.
  std::pair<std::vector<std::pair<int64_t, int64_t>>, std::vector<std::pair<int64_t, int64_t>>>
  shares(int64_t F) const {
    std::vector<std::pair<int64_t, int64_t>> heads, columns;
    int64_t step = F % 64 == 0 ? 64 : 8;
    for (int t = 0; t < splits_; ++t) {
      heads.push_back(share(H_, t, (int)splits_));
      auto [c0, c1] = share((F + step - 1) / step, t, (int)splits_);
      columns.push_back({std::min(F, c0 * step), std::min(F, c1 * step)});
    }
    return {heads, columns};
  }

  void add(const at::Tensor& ln1_w, const at::Tensor& ln1_b, double eps1, const at::Tensor& qkv,
           const std::vector<at::Tensor>& out, const std::optional<at::Tensor>& out_b,
           const at::Tensor& ln2_w, const at::Tensor& ln2_b, double eps2, const at::Tensor& ff_in,
           const std::optional<at::Tensor>& ff_in_b, const std::vector<at::Tensor>& ff_out,
           const std::optional<at::Tensor>& ff_out_b, std::vector<std::vector<int64_t>> slices) {
    TORCH_CHECK((int64_t)out.size() == splits_ && (int64_t)ff_out.size() == splits_,
                "Stack.add: one part of out and of ff_out a share");
    std::vector<const at::Tensor*> all = {&qkv, &ff_in};
    for (int t = 0; t < splits_; ++t) all.insert(all.end(), {&out[t], &ff_out[t]});
    for (const at::Tensor* w : all) {
      check_packed(*w);
      TORCH_CHECK(w->dim() == qkv.dim() && w->scalar_type() == qkv.scalar_type()
                  && (avx512_ || w->dim() == 3), "Stack.add: the products' layouts differ");
    }
    int64_t D = ln1_w.numel(), HD = H_ * d_, F = ff_in.size(0) * 8;
    TORCH_CHECK(layers_.empty() || (D == D_ && F == F_), "Stack.add: another width");
    D_ = D;
    F_ = F;
    TORCH_CHECK(packed_k(qkv) == D && qkv.size(0) * 16 == 3 * HD && packed_k(ff_in) == D,
                "Stack.add: the products' shapes do not chain");
    auto [heads, columns] = shares(F);
    for (int t = 0; t < splits_; ++t)
      TORCH_CHECK(packed_k(out[t]) == (heads[t].second - heads[t].first) * d_ && out[t].size(0) * 16 == D
                  && packed_k(ff_out[t]) == columns[t].second - columns[t].first && ff_out[t].size(0) * 16 == D,
                  "Stack.add: out and ff_out must be split as shares() says");
    for (const at::Tensor* t : {&ln1_w, &ln1_b, &ln2_w, &ln2_b})
      TORCH_CHECK(t->is_contiguous() && t->numel() == D && t->scalar_type() == ln1_w.scalar_type(),
                  "Stack.add: bad norm");
    TORCH_CHECK(qkv.dim() == 3 || d_ % 2 == 0, "Stack.add: the native bf16 layout needs an even dim_head");
    auto wide = [](const std::optional<at::Tensor>& b) { return b ? b->to(at::kFloat).contiguous() : at::Tensor(); };
    ws_.reset();
    layers_.push_back({ln1_w, ln1_b, qkv, out, ln2_w, ln2_b, ff_in, ff_out, ff_in_b,
                       (float)eps1, (float)eps2, std::move(slices), wide(out_b), wide(ff_out_b)});
  }

  at::Tensor step(const at::Tensor& x, const std::vector<at::Tensor>& ks,
                  const std::vector<at::Tensor>& vs, int64_t offset) {
    return std::get<0>(step_and_head(x, ks, vs, offset, false));
  }

  // The step, and with `head` the image logits of its output in the same parallel region
  // (each thread's share of the head's rows right after its last product, the weights
  // streamed on: called on its own after a step, the head's 1 MB at L16 took 130-190 us, its
  // weights cold, against 20 us warm).
  std::tuple<at::Tensor, at::Tensor> step_and_head(const at::Tensor& x, const std::vector<at::Tensor>& ks,
                                                   const std::vector<at::Tensor>& vs, int64_t offset,
                                                   bool head) {
    TORCH_CHECK(!head || head_.has_value(), "Stack.step: no head");
    TORCH_CHECK(!layers_.empty() && ks.size() == layers_.size() && vs.size() == layers_.size(),
                "Stack.step: one key and one value cache a layer");
    TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.size(0) >= 1 && x.size(0) <= 8
                && x.size(1) == D_ && x.scalar_type() == layers_[0].ln1_w.scalar_type()
                && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
                "Stack.step: bad input");
    run_any(x, ks, vs, offset, head);
    auto h = last_hidden(x);
    at::Tensor lg;
    if (head) {
      lg = at::empty(ws_->lg.sizes(), x.options().dtype(at::kFloat));
      logits_to_float((float*)lg.data_ptr());
    }
    return {h, lg};
  }

  // The image head: the final LayerNorm and the image logits' packed product (for logits()
  // and generate()).
  void set_head(const at::Tensor& norm_w, const at::Tensor& norm_b, double eps, const at::Tensor& head,
                const std::optional<at::Tensor>& head_b) {
    check_packed(head);
    TORCH_CHECK(!layers_.empty() && packed_k(head) == D_ && head.dim() == layers_[0].qkv.dim()
                && head.scalar_type() == layers_[0].qkv.scalar_type() && norm_w.numel() == D_
                && norm_b.numel() == D_ && norm_w.is_contiguous() && norm_b.is_contiguous()
                && norm_w.scalar_type() == layers_[0].ln1_w.scalar_type()
                && norm_b.scalar_type() == norm_w.scalar_type(), "Stack.set_head: bad head");
    ws_.reset();
    head_ = {norm_w, norm_b, head, head_b, (float)eps};
  }

  // Image logits [B, V] in fp32 of hidden states h [B, D] (at most 8 rows): LayerNorm, then
  // the head's product (rounded to h's dtype, as the Python step's), widened.
  at::Tensor logits(const at::Tensor& h) {
    TORCH_CHECK(head_.has_value(), "Stack.logits: no head");
    TORCH_CHECK(h.dim() == 2 && h.is_contiguous() && h.size(0) >= 1 && h.size(0) <= 8 && h.size(1) == D_
                && h.scalar_type() == head_->norm_w.scalar_type(), "Stack.logits: bad input");
    auto hn = at::empty_like(h);
    auto norm = [&](auto* out) {
      using T = std::remove_pointer_t<decltype(out)>;
      layer_norm_rows<T>((const T*)h.data_ptr(), (const T*)head_->norm_w.data_ptr(),
                         (const T*)head_->norm_b.data_ptr(), head_->eps, out, h.size(0), D_);
    };
    if (h.scalar_type() == at::kFloat) norm((float*)hn.data_ptr());
    else norm((c10::BFloat16*)hn.data_ptr());
    return linear_any(hn, head_->head, head_->head_b, std::nullopt, avx512_).to(at::kFloat);
  }

  // Image positions sampled and fed in one call, from hidden states h [B, D] at the cache's
  // `offset`: for each row s of the uniforms u [n, B], the logits of h, one id per row drawn
  // as sample_top_k(logits, k, temperature, u[s], top_p), then (except after the last, unless
  // feed_last) the ids' embedding emb[id] + pos[s] stepped through the stack at offset + s.
  // Returns (ids [B, n], the last hidden states): the Python loop's work without a Python
  // call a position (0.3-0.5 ms a step when the weights have just streamed through the caches).
  // cond_scale != 1: classifier-free guidance. The first half of the B rows has the captions,
  // the second the null captions; one id per pair is drawn from uncond + cond_scale x (cond -
  // uncond) of their logits (u [n, B/2], ids [B/2, n]) and fed to both rows.
  std::tuple<at::Tensor, at::Tensor> generate(at::Tensor h, const std::vector<at::Tensor>& ks,
                                              const std::vector<at::Tensor>& vs, int64_t offset,
                                              const at::Tensor& emb, const at::Tensor& pos, int64_t k,
                                              double temperature, const at::Tensor& u, bool feed_last,
                                              double cond_scale, double top_p) {
    const bool guided = cond_scale != 1.0;
    const int64_t B = h.size(0), R = guided ? B / 2 : B;  // R: the rows drawn
    TORCH_CHECK(!guided || B % 2 == 0, "Stack.generate: guidance needs caption and null-caption rows");
    TORCH_CHECK(u.dim() == 2 && u.size(1) == R && u.scalar_type() == at::kFloat
                && u.is_contiguous(), "Stack.generate: bad uniforms");
    const int64_t n = u.size(0);
    TORCH_CHECK(emb.dim() == 2 && emb.size(1) == D_ && emb.scalar_type() == h.scalar_type()
                && emb.is_contiguous() && pos.dim() == 2 && pos.size(0) >= n && pos.size(1) == D_
                && pos.scalar_type() == h.scalar_type() && pos.is_contiguous(),
                "Stack.generate: bad embeddings");
    auto ids = at::empty({R, n}, h.options().dtype(at::kLong));
    auto x = at::empty_like(h);
    auto first = logits(h);
    const int64_t V = first.size(1);
    const float scale = (float)cond_scale;
    // Between steps no tensor is made: the logits and the draw's scratch live here, the
    // step's outputs in its workspace (tensor ops right after a step, their code and data
    // evicted by the streamed weights, took 30-60 us a step).
    std::vector<float> lg(first.data_ptr<float>(), first.data_ptr<float>() + B * V), scratch(3 * V);
    std::vector<float> mixed(guided ? R * V : 0);
    std::vector<int64_t> id(B), order(V);
    bool stepped = false;
    for (int64_t s = 0; s < n; ++s) {
      if (guided)  // as the Python loop's fp32 ops: the difference, times the scale, plus uncond
        for (int64_t i = 0; i < R * V; ++i) {
          float diff = lg[i] - lg[R * V + i];
          float scaled = scale * diff;
          mixed[i] = lg[R * V + i] + scaled;
        }
      draw_top_k(guided ? mixed.data() : lg.data(), R, V, k, (float)temperature,
                 (const float*)u.data_ptr() + s * R, id.data(), scratch.data(), scratch.data() + V,
                 scratch.data() + 2 * V, (float)top_p, order.data());
      for (int64_t b = 0; b < R; ++b) {
        TORCH_CHECK(id[b] >= 0 && id[b] < emb.size(0), "Stack.generate: an id past the embedding");
        ((int64_t*)ids.data_ptr())[b * n + s] = id[b];
        if (guided) id[R + b] = id[b];  // the null caption's row takes the same code
      }
      if (s + 1 == n && !feed_last) break;
      for (int64_t b = 0; b < B; ++b) {
        if (h.scalar_type() == at::kFloat) {
          const float *e = (const float*)emb.data_ptr() + id[b] * D_, *p = (const float*)pos.data_ptr() + s * D_;
          float* y = (float*)x.data_ptr() + b * D_;
          for (int64_t j = 0; j < D_; ++j) y[j] = e[j] + p[j];
        } else {
          auto e = (const c10::BFloat16*)emb.data_ptr() + id[b] * D_, p = (const c10::BFloat16*)pos.data_ptr() + s * D_;
          auto y = (c10::BFloat16*)x.data_ptr() + b * D_;
          for (int64_t j = 0; j < D_; ++j) y[j] = (c10::BFloat16)((float)e[j] + (float)p[j]);
        }
      }
      const bool more = s + 1 < n;
      run_any(x, ks, vs, offset + s, more);
      if (more) logits_to_float(lg.data());
      stepped = true;
    }
    if (stepped) h = last_hidden(x);
    return {ids, h};
  }

 private:
  struct Head {
    at::Tensor norm_w, norm_b, head;
    std::optional<at::Tensor> head_b;
    float eps;
  };
  std::optional<Head> head_;

  // The step for x's dtype and the cache's, its outputs left in the workspace (xs[0]; lg with
  // `head`).
  void run_any(const at::Tensor& x, const std::vector<at::Tensor>& ks, const std::vector<at::Tensor>& vs,
               int64_t offset, bool head) {
    bool cache16 = ks[0].scalar_type() == at::kBFloat16;
    if (x.scalar_type() == at::kFloat)
      return cache16 ? run<float, c10::BFloat16>(x, ks, vs, offset, head) : run<float, float>(x, ks, vs, offset, head);
    return cache16 ? run<c10::BFloat16, c10::BFloat16>(x, ks, vs, offset, head)
                   : run<c10::BFloat16, float>(x, ks, vs, offset, head);
  }

  // The last step's hidden states (the workspace's) in a tensor of their own, shaped as x.
  at::Tensor last_hidden(const at::Tensor& x) const {
    auto h = at::empty_like(x);
    std::memcpy(h.data_ptr(), ws_->xs[0].data_ptr(), x.nbytes());
    return h;
  }

  // The last step's image logits (the workspace's, in the activations' dtype) widened into out.
  void logits_to_float(float* out) const {
    const int64_t n = ws_->lg.numel();
    if (ws_->lg.scalar_type() == at::kFloat) {
      std::memcpy(out, ws_->lg.data_ptr(), n * sizeof(float));
    } else {
      const c10::BFloat16* in = (const c10::BFloat16*)ws_->lg.data_ptr();
      for (int64_t i = 0; i < n; ++i) out[i] = (float)in[i];
    }
  }

  // Thread t of n takes heads [h0, h1) (of every row) and a share of GEGLU's columns (see
  // shares()), and computes the q/k/v rows and feed-forward input rows those need (one
  // contiguous stretch of each packed matrix); the output projection and the second
  // feed-forward product split their inputs the same way: each thread's partial sums over
  // its own heads' (columns') inputs, which every thread then adds up with the bias and
  // residual itself. Where a share's rows fall on the products' units (3 dim_head and twice
  // a share's GEGLU columns multiples of a unit's rows: 64 at L16) a block needs two
  // barriers, one after each partial sum; otherwise one more after each of the q/k/v and
  // feed-forward input products.
  template <typename T, typename C>
  void run(const at::Tensor& x, const std::vector<at::Tensor>& ks,
           const std::vector<at::Tensor>& vs, int64_t offset, bool head) {
    constexpr bool bf16 = std::is_same_v<T, c10::BFloat16>;
    const int64_t B = x.size(0), D = D_, H = H_, d = d_, HD = H * d, nl = layers_.size();
    const int64_t F = layers_[0].ff_in.size(0) * 8;
    bool native = layers_[0].qkv.dim() == 4;
    TORCH_CHECK(!native || bf16, "Stack.step: bf16 products take bf16 inputs");
    TORCH_CHECK(bf16 || layers_[0].qkv.scalar_type() == at::kFloat || !native, "Stack.step: bad input");
    // The fp32-arithmetic products take fp32 inputs: bf16 activations are widened (as the
    // single product does), after each rounding to T that the Python step makes.
    bool wide = !native && bf16;
    std::vector<int64_t> counts(nl);
    int64_t most = 1;
    for (int64_t l = 0; l < nl; ++l) {
      check_cache(ks[l], vs[l], true);
      TORCH_CHECK(ks[l].scalar_type() == ks[0].scalar_type() && ks[l].size(0) == B && ks[l].size(1) == H && ks[l].size(3) == d && offset >= 0
                  && offset < ks[l].size(2) && offset < (int64_t)layers_[l].slices.size(),
                  "Stack.step: bad cache or position");
      counts[l] = count_keys(layers_[l].slices[offset], offset);
      most = std::max(most, counts[l]);
    }
    Workspace& ws = workspace(x, wide);
    const int threads = (int)splits_;
    auto P = [](const at::Tensor& t) { return (T*)t.data_ptr(); };
    auto &xs = ws.xs, &ys = ws.ys;
    auto& products = ws.products;
    auto &qkv_units = ws.qkv_units, &ff_units = ws.ff_units;
    const at::Tensor &qkv = ws.qkv, &a = ws.a, &f = ws.f, &g = ws.g, &a_in = ws.a_in, &g_in = ws.g_in;
    auto heads = [&](int t) { return ws.heads[t]; };
    auto columns = [&](int t) { return ws.columns[t]; };
    const bool qkv_aligned = ws.qkv_aligned, ff_aligned = ws.ff_aligned;
    auto norm = [&](int t, const at::Tensor& in, const at::Tensor& nw, const at::Tensor& nb, float eps) {
      layer_norm_rows<T>(P(in), (const T*)nw.data_ptr(), (const T*)nb.data_ptr(), eps, P(ws.xn[t]), B, D);
      if constexpr (bf16) if (wide) widen_rows(P(ws.xn[t]), (float*)ws.xn_in[t].data_ptr(), B * D);
    };
    auto add_up = [&](const std::vector<const float*>& parts, const at::Tensor& bias, const at::Tensor& res,
                      const at::Tensor& y) {
      add_partials<T>(parts, bias.defined() ? (const float*)bias.data_ptr() : nullptr, P(res), P(y), B, D);
    };
    // The split products' units are claimed one at a time from a counter per share: a share
    // that is done takes what is left of another's whose inputs are ready (the same units,
    // written where its owner would), so that the threads reach the barrier together.
    Claim* claims = ws.claims.get();
    for (int64_t i = 0; i < nl * 2 * threads; ++i) {
      claims[i].next.store(0, std::memory_order_relaxed);
      claims[i].ready.store(false, std::memory_order_relaxed);
    }
    auto split_product = [&](int t, int64_t l, int which) {  // which: 0 out, 1 ff_out
      Claim* c = &claims[(l * 2 + which) * threads];
      c[t].ready.store(true, std::memory_order_release);
      for (int i = 0; i < threads; ++i) {
        int o = (t + i) % threads;
        if (!c[o].ready.load(std::memory_order_acquire)) continue;
        const Product& p = products[o][4 * l + 1 + 2 * which];
        for (int64_t u; (u = c[o].next.fetch_add(1, std::memory_order_relaxed)) < p.units;) p.run(u, u + 1);
      }
    };
#pragma omp parallel num_threads((int)std::min(team_, splits_))
    {
      // A team smaller than the shares (asked for, or nested in another parallel region)
      // runs several shares a thread, one after another between the barriers.
      const int first = omp_get_thread_num(), team = omp_get_num_threads();
      auto each = [&](auto&& part) { for (int t = first; t < threads; t += team) part(t); };
      each([&](int t) { std::memcpy(xs[t].data_ptr(), x.data_ptr(), x.nbytes()); });
      std::vector<float> q(d), acc(d), score(most);
      std::vector<int64_t> pos(most);
      KeyPrefetch keys;
      for (int64_t l = 0; l < nl; ++l) {
        const StackLayer& w = layers_[l];
        C* kc = (C*)ks[l].data_ptr();
        C* vc = (C*)vs[l].data_ptr();
        const int64_t L = ks[l].size(2);
        each([&](int t) {  // LayerNorm, then the q/k/v product unit by unit, this share's cached
                           // keys and values prefetched over its last third (earlier, the
                           // streamed weights evict them again)
          auto [h0, h1] = heads(t);
          keys.ranges.clear();
          keys.r = 0;
          keys.done = 0;
          for (int64_t b = 0; b < B; ++b)
            for (int64_t h = h0; h < h1; ++h)
              key_ranges(kc + (b * H + h) * L * d, vc + (b * H + h) * L * d, d, w.slices[offset], keys.ranges);
          keys.add_total();
          norm(t, xs[t], w.ln1_w, w.ln1_b, w.eps1);
          auto [u0, u1] = qkv_units[t];
          int64_t start = u1 - std::max<int64_t>((u1 - u0) / 3, 1);
          int64_t slice = (keys.total / std::max<int64_t>(u1 - start, 1) + 63) / 64 * 64;
          for (int64_t u = u0; u < u1; ++u) {
            if (u >= start) keys.next(slice);
            products[t][4 * l].run(u, u + 1);
          }
        });
        if (!qkv_aligned) {
#pragma omp barrier
        }
        each([&](int t) {  // attention of its heads, its partial sums of the output projection
          auto [h0, h1] = heads(t);
          for (int64_t b = 0; b < B; ++b)
            for (int64_t h = h0; h < h1; ++h) {
              int64_t i = b * H + h;
              attend_head<T, C>(P(qkv) + b * 3 * HD + 3 * h0 * d, kc + i * L * d, vc + i * L * d,
                                P(a) + b * HD + h0 * d, h1 - h0, h - h0, d, offset, w.slices[offset],
                                q.data(), acc.data(), score.data(), pos.data(), counts[l]);
              if constexpr (bf16) if (wide) widen_rows(P(a) + b * HD + h * d, (float*)a_in.data_ptr() + b * HD + h * d, d);
            }
          split_product(t, l, 0);
        });
#pragma omp barrier
        each([&](int t) {  // the sums, LayerNorm, its rows of the feed-forward input
          add_up(ws.part_out_sums, w.out_b32, xs[t], ys[t]);
          norm(t, ys[t], w.ln2_w, w.ln2_b, w.eps2);
          auto [u0, u1] = ff_units[t];
          if (u0 < u1) products[t][4 * l + 2].run(u0, u1);
        });
        if (!ff_aligned) {
#pragma omp barrier
        }
        each([&](int t) {  // GEGLU of its columns, its partial sums of the second product
          auto [j0, j1] = columns(t);
          if (j0 < j1) {
            for (int64_t m = 0; m < B; ++m)
              geglu_block(P(f) + m * 2 * F + 2 * j0, P(f) + m * 2 * F + j0 + j1, P(g) + m * F + j0, j1 - j0);
            if constexpr (bf16) if (wide)
              for (int64_t m = 0; m < B; ++m)
                widen_rows(P(g) + m * F + j0, (float*)g_in.data_ptr() + m * F + j0, j1 - j0);
          }
          split_product(t, l, 1);
        });
#pragma omp barrier
        each([&](int t) { add_up(ws.part_ff_sums, w.ff_out_b32, ys[t], xs[t]); });
      }
      if (head)
        each([&](int t) {
          norm(t, xs[t], head_->norm_w, head_->norm_b, head_->eps);
          auto [u0, u1] = share(ws.head_products[t].units, t, threads);
          if (u0 < u1) ws.head_products[t].run(u0, u1);
        });
    }
  }

  // The buffers and products of a step for x's rows and dtype (kept from the last step where
  // they match: building them took ~60 us a step at L16).
  struct Workspace {
    int64_t B = 0;
    at::ScalarType dtype;
    at::Tensor qkv, a, f, g, a_in, g_in, lg;
    // per share: the residual stream before and after the attention (every share holds the
    // same values), its LayerNorm's output (and widened), its partial sums of out and ff_out
    std::vector<at::Tensor> xs, ys, xn, xn_in, part_out, part_ff, keep;
    std::vector<const float*> part_out_sums, part_ff_sums;  // the partial sums' data
    std::unique_ptr<Claim[]> claims;  // per layer, split product and share
    std::vector<std::pair<int64_t, int64_t>> heads, columns;
    // per share: per layer q/k/v, its part of out, ff_in, its part of ff_out; the head
    std::vector<std::vector<Product>> products;
    std::vector<Product> head_products;
    // per share: the units of q/k/v and of ff_in it runs (its heads' rows of q, k and v; its
    // columns' rows of both GEGLU halves; or an even share where those do not fall on units)
    std::vector<std::pair<int64_t, int64_t>> qkv_units, ff_units;
    bool qkv_aligned = false, ff_aligned = false;
  };
  std::optional<Workspace> ws_;

  Workspace& workspace(const at::Tensor& x, bool wide) {
    const int64_t B = x.size(0), D = D_, HD = H_ * d_, F = F_;
    if (ws_ && ws_->B == B && ws_->dtype == x.scalar_type()) return *ws_;
    ws_.reset();
    Workspace w;
    w.B = B;
    w.dtype = x.scalar_type();
    const int threads = (int)splits_;
    const bool native = layers_[0].qkv.dim() == 4;
    auto opt = x.options();
    auto fopt = opt.dtype(at::kFloat);
    w.qkv = at::empty({B, 3 * HD}, opt);
    w.a = at::empty({B, HD}, opt);
    w.f = at::empty({B, 2 * F}, opt);
    w.g = at::empty({B, F}, opt);
    w.a_in = wide ? at::empty({B, HD}, fopt) : w.a;
    w.g_in = wide ? at::empty({B, F}, fopt) : w.g;
    for (int t = 0; t < threads; ++t) {
      w.xs.push_back(at::empty({B, D}, opt));
      w.ys.push_back(at::empty({B, D}, opt));
      w.xn.push_back(at::empty({B, D}, opt));
      w.xn_in.push_back(wide ? at::empty({B, D}, fopt) : w.xn.back());
      w.part_out.push_back(at::empty({B, D}, fopt));
      w.part_ff.push_back(at::empty({B, D}, fopt));
      w.part_out_sums.push_back((const float*)w.part_out.back().data_ptr());
      w.part_ff_sums.push_back((const float*)w.part_ff.back().data_ptr());
    }
    w.claims.reset(new Claim[layers_.size() * 2 * threads]);
    std::tie(w.heads, w.columns) = shares(F);
    auto make = [&](const at::Tensor& wt, const void* in, int64_t in_stride, const std::optional<at::Tensor>& bias,
                    const at::Tensor& y) {
      at::Tensor b, r;
      Epilogue e = epilogue_for(wt, native, bias, std::nullopt, b, r, x.scalar_type(), B);
      e.y = y.data_ptr();
      if (y.scalar_type() == at::kFloat) e.y16 = false;  // a partial sum
      w.keep.push_back(b);
      return make_product(avx512_, wt, in, B, e, in_stride);
    };
    const size_t in_size = wide ? 4 : x.element_size();
    w.products.resize(threads);
    for (const StackLayer& l : layers_)
      for (int t = 0; t < threads; ++t) {
        auto [h0, h1] = w.heads[t];
        auto [j0, j1] = w.columns[t];
        w.products[t].push_back(make(l.qkv, w.xn_in[t].data_ptr(), -1, std::nullopt, w.qkv));
        w.products[t].push_back(make(l.out[t], (char*)w.a_in.data_ptr() + h0 * d_ * in_size, HD, std::nullopt, w.part_out[t]));
        w.products[t].push_back(make(l.ff_in, w.xn_in[t].data_ptr(), -1, l.ff_in_b, w.f));
        w.products[t].push_back(make(l.ff_out[t], (char*)w.g_in.data_ptr() + j0 * in_size, F, std::nullopt, w.part_ff[t]));
      }
    if (head_) {
      w.lg = at::empty({B, head_->head.size(0) * 16}, opt);
      for (int t = 0; t < threads; ++t)
        w.head_products.push_back(make(head_->head, w.xn_in[t].data_ptr(), -1, head_->head_b, w.lg));
    }
    const int64_t rows = w.products[0][0].rows;
    w.qkv_aligned = 3 * d_ % rows == 0;
    w.ff_aligned = true;
    for (auto [j0, j1] : w.columns) w.ff_aligned = w.ff_aligned && 2 * j0 % rows == 0 && 2 * j1 % rows == 0;
    for (int t = 0; t < threads; ++t) {
      auto [h0, h1] = w.heads[t];
      auto [j0, j1] = w.columns[t];
      w.qkv_units.push_back(w.qkv_aligned ? std::make_pair(3 * h0 * d_ / rows, 3 * h1 * d_ / rows)
                                          : share(w.products[t][0].units, t, threads));
      w.ff_units.push_back(w.ff_aligned ? std::make_pair(2 * j0 / rows, 2 * j1 / rows)
                                        : share(w.products[t][2].units, t, threads));
    }
    ws_ = std::move(w);
    return *ws_;
  }

  bool avx512_;
  int64_t H_, d_, splits_, team_, D_ = 0, F_ = 0;
  std::vector<StackLayer> layers_;
};

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("geglu", &geglu);
  m.def("sample_top_k", &sample_top_k);
  m.def("linear", &linear);
  m.def("linear_avx2", &linear_avx2);
  m.def("attend_step", &attend_step);
  pybind11::class_<Stack>(m, "Stack", pybind11::module_local())
      .def(pybind11::init<bool, int64_t, int64_t, int64_t>())
      .def("shares", &Stack::shares)
      .def("set_threads", &Stack::set_threads)
      .def("add", &Stack::add)
      .def("step", &Stack::step)
      .def("set_head", &Stack::set_head)
      .def("logits", &Stack::logits)
      .def("generate", &Stack::generate);
}
