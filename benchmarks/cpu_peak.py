"""The CPU's arithmetic peak in fp32 and bf16, measured at the instruction level.

    python benchmarks/cpu_peak.py [--threads N]

Compiles (gcc, OpenMP) and runs a loop of independent AVX-512 instructions with no memory
traffic: ``vfmadd231ps`` (16 fp32 multiply-adds = 32 FLOP) and ``vdpbf16ps`` (32 bf16
products summed into 16 fp32 lanes = 64 FLOP), 12 accumulators each so that latency never
stalls them. What it prints is the most any fp32 or bf16 matrix product can reach on this
CPU, whatever the library: issue 3's "bf16 >= 3x fp32" needs the bf16 peak to be well
above 3x the fp32 one (the issue assumed 4.8x, an AMX CPU). Needs a CPU with AVX512F and
AVX512-BF16; says so and exits 2 otherwise.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

SOURCE = r"""
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define ACC 12
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }

__attribute__((target("avx512f"))) static float fp32_loop(long iters) {
  __m512 acc[ACC], a = _mm512_set1_ps(1.0001f), b = _mm512_set1_ps(0.9999f);
  for (int i = 0; i < ACC; i++) acc[i] = _mm512_set1_ps((float)i);
  for (long k = 0; k < iters; k++)
#pragma GCC unroll 12
    for (int i = 0; i < ACC; i++) acc[i] = _mm512_fmadd_ps(a, acc[i], b);
  float s = 0; for (int i = 0; i < ACC; i++) s += _mm512_reduce_add_ps(acc[i]);
  return s;
}

__attribute__((target("avx512f,avx512bf16"))) static float bf16_loop(long iters) {
  __m512 acc[ACC];
  __m512bh a = (__m512bh)_mm512_set1_epi16(0x3f80), b = (__m512bh)_mm512_set1_epi16(0x3f80);
  for (int i = 0; i < ACC; i++) acc[i] = _mm512_set1_ps((float)i);
  for (long k = 0; k < iters; k++)
#pragma GCC unroll 12
    for (int i = 0; i < ACC; i++) acc[i] = _mm512_dpbf16_ps(acc[i], a, b);
  float s = 0; for (int i = 0; i < ACC; i++) s += _mm512_reduce_add_ps(acc[i]);
  return s;
}

int main(int argc, char** argv) {
  int threads = atoi(argv[1]);
  long iters = 200000000L / ACC;
  for (int rep = 0; rep < 3; rep++) {
    volatile float sink = 0;
    double t = now();
#pragma omp parallel num_threads(threads)
    { float s = fp32_loop(iters);
#pragma omp atomic
      sink += s; }
    double fp32 = threads * (double)iters * ACC * 32 / (now() - t);
    t = now();
#pragma omp parallel num_threads(threads)
    { float s = bf16_loop(iters);
#pragma omp atomic
      sink += s; }
    double bf16 = threads * (double)iters * ACC * 64 / (now() - t);
    printf("%.1f %.1f\n", fp32 / 1e9, bf16 / 1e9);
  }
  return 0;
}
"""


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    missing = {"avx512f", "avx512_bf16"} - cpu_flags()
    if missing:
        print(f"cpu_peak: this CPU lacks {', '.join(sorted(missing))}; nothing to measure", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = os.path.join(tmp, "peak.c"), os.path.join(tmp, "peak")
        with open(src, "w", encoding="ascii") as f:
            f.write(SOURCE)
        subprocess.run(["gcc", "-O2", "-fopenmp", src, "-o", exe], check=True)
        runs = [tuple(map(float, line.split())) for line in
                subprocess.run([exe, str(args.threads)], check=True, capture_output=True,
                               text=True).stdout.split("\n") if line.strip()]
    fp32, bf16 = max(r[0] for r in runs), max(r[1] for r in runs)
    print(f"Instruction peak, {args.threads} threads (best of {len(runs)}): "
          f"fp32 FMA {fp32:.1f} GFLOP/s, bf16 dot-product {bf16:.1f} GFLOP/s, bf16 / fp32 = {bf16 / fp32:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
