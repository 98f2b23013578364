"""The one CPU capability probe that every fast path asks.

Nothing here assumes an instruction set. It answers:

- :func:`cpu_level`: the ISA level minidalle may use, one of :data:`LEVELS`
  (``generic`` < ``avx2`` < ``avx512`` < ``avx512_bf16``), read from the CPU's flags
  (``/proc/cpuinfo``, else PyTorch's own checks) and capped by ``MINIDALLE_CPU``;
- :func:`has`: whether one feature (``avx2``, ``fma``, ``avx512f``, ``avx512_bf16``, ...) may
  be used;
- :func:`onednn_works`: whether a oneDNN op the code calls (``linear``, ``reorder``,
  ``linear_add``) really runs for a dtype, found by trying it once on a tiny tensor;
- :func:`bf16_speed`: how fast bf16 matrix products run against fp32 here, measured once per
  process on small products;
- :func:`resolve_precision`: ``precision = "auto"`` made concrete (bf16 only where it is native
  and measured faster), printing the choice and the reason once; an explicit bf16 on a CPU
  where it is slow warns once with the measured factor;
- :func:`huge_pages`: whether the kernel backs memory with 2 MB pages on request (Linux
  transparent huge pages), and :func:`huge_page_buffer`, memory asked for that way: the
  decoder's weights live there, as streaming them through 4 KB pages reads 10-40% slower
  on the machines measured (a TLB miss, and a stop for the prefetchers, every 4 KB).

``MINIDALLE_CPU=generic|avx2|avx512|avx512_bf16`` makes the probe report at most that level,
so every fallback can be tested on any machine. Set before PyTorch is imported (the CLI and
``import minidalle`` do it), it also caps PyTorch's kernels (``ATEN_CPU_CAPABILITY``) and
oneDNN's (``ONEDNN_MAX_CPU_ISA``), unless those are set already, so the libraries behave as
on such a CPU (bf16 oneDNN primitives then fail as they do on an AVX2-only CPU).
``minidalle env`` prints what the probe found.
"""
from __future__ import annotations

import functools
import os
import platform
import sys
import time

from minidalle.errors import MinidalleError

ENV_VAR = "MINIDALLE_CPU"
LEVELS = ("generic", "avx2", "avx512", "avx512_bf16")

# The features each level adds (x86 /proc/cpuinfo flag names).
_LEVEL_FEATURES = {
    "generic": set(),
    "avx2": {"avx", "avx2", "fma", "f16c"},
    "avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq"},
    "avx512_bf16": {"avx512_bf16"},
}
# What a forced level tells the libraries (only when they are not set already).
_LIBRARY_CAPS = {
    "generic": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "avx512": {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE"},
    "avx512_bf16": {},
}
# auto picks bf16 only when bf16 products are at least this much faster than fp32.
BF16_MIN_SPEEDUP = 1.15


class HardwareError(MinidalleError):
    """A bad ``MINIDALLE_CPU`` value."""


def forced_level() -> str | None:
    """The level ``MINIDALLE_CPU`` caps the probe at, or None."""
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if value in ("", "native", "auto"):
        return None
    if value not in LEVELS:
        raise HardwareError(f"{ENV_VAR}={value!r}: expected one of {', '.join(LEVELS)} (or unset)")
    return value


def apply_forced_level() -> None:
    """Cap PyTorch's and oneDNN's ISA to ``MINIDALLE_CPU`` (effective only before torch loads)."""
    try:
        level = forced_level()
    except HardwareError:
        return  # reported by the first caller of the probe
    if level is None or "torch" in sys.modules:
        return
    for name, value in _LIBRARY_CAPS[level].items():
        os.environ.setdefault(name, value)


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset:
    """The CPU's feature flags as the OS reports them (empty where it cannot tell)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    flags = set()
    try:  # macOS, Windows: PyTorch's own checks
        import torch

        checks = {"avx2": "_is_avx2_supported", "avx512f": "_is_avx512_supported",
                  "avx512_bf16": "_is_avx512_bf16_supported"}
        for flag, name in checks.items():
            check = getattr(torch.cpu, name, None)
            if check is not None and check():
                flags.add(flag)
        if "avx2" in flags:
            flags.update({"avx", "fma"})
        if "avx512f" in flags:
            flags.update({"avx512bw", "avx512vl", "avx512dq"})
    except Exception:
        pass
    return frozenset(flags)


def machine() -> str:
    return platform.machine().lower()


def is_x86() -> bool:
    return machine() in ("x86_64", "amd64", "i686", "i386")


@functools.lru_cache(maxsize=None)
def detected_level() -> str:
    """The highest level the CPU itself offers."""
    if not is_x86():
        return "generic"
    flags = cpu_flags()
    best = "generic"
    for level in LEVELS[1:]:
        if not _LEVEL_FEATURES[level] <= flags:
            break
        best = level
    return best


def cpu_level() -> str:
    """The level fast paths may use: the CPU's, capped by ``MINIDALLE_CPU``."""
    level, forced = detected_level(), forced_level()
    if forced is not None and LEVELS.index(forced) < LEVELS.index(level):
        return forced
    return level


def has(feature: str) -> bool:
    """Whether ``feature`` (an x86 flag name) may be used: the CPU has it and the level allows it."""
    if feature not in cpu_flags():
        return False
    allowed = set()
    for level in LEVELS[: LEVELS.index(cpu_level()) + 1]:
        allowed |= _LEVEL_FEATURES[level]
    known = set().union(*_LEVEL_FEATURES.values())
    return feature in allowed or feature not in known and cpu_level() == detected_level()


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


@functools.lru_cache(maxsize=None)
def _try_onednn(op: str, dtype_name: str) -> str | None:
    """None if oneDNN's ``op`` runs for the dtype here, else why not (tried on tiny tensors)."""
    try:
        import torch
    except ImportError:
        return "PyTorch is not installed"
    if not torch.backends.mkldnn.is_available():
        return "this PyTorch has no oneDNN"
    ops = torch.ops.mkldnn
    if not hasattr(ops, "_linear_pointwise") or not hasattr(ops, "_reorder_linear_weight"):
        return "this PyTorch lacks oneDNN's linear ops"
    dtype = getattr(torch, dtype_name)
    x = torch.ones(2, 32, dtype=dtype)
    w = torch.ones(16, 32, dtype=dtype)
    try:
        with torch.no_grad():
            if op == "linear":
                y = ops._linear_pointwise(x, w, None, "none", [], "")
            elif op == "reorder":
                y = ops._linear_pointwise(x, ops._reorder_linear_weight(w, 2), None, "none", [], "")
            elif op == "linear_add":
                y = ops._linear_pointwise.binary(x, torch.ones(2, 16, dtype=dtype), w, None, "add")
                y = y - 1
            else:
                raise ValueError(f"unknown oneDNN op {op!r}")
        if not bool((y.float() == 32).all()):
            return f"oneDNN {op} gave a wrong result"
    except (RuntimeError, TypeError) as e:
        return f"oneDNN {op} fails for {dtype_name}: {str(e).splitlines()[0][:120]}"
    if dtype_name == "bfloat16" and LEVELS.index(cpu_level()) < LEVELS.index("avx512"):
        # It ran only because the libraries were not capped (torch was loaded first).
        return f"{ENV_VAR}={cpu_level()}: oneDNN has no bf16 kernels below AVX-512"
    return None


def onednn_works(op: str, dtype) -> bool:
    """Whether oneDNN's ``op`` (``linear``, ``reorder``, ``linear_add``) runs for ``dtype`` here."""
    return _try_onednn(op, _dtype_name(dtype)) is None


def onednn_reason(op: str, dtype) -> str | None:
    """Why oneDNN's ``op`` cannot be used for ``dtype`` (None when it can)."""
    return _try_onednn(op, _dtype_name(dtype))


@functools.lru_cache(maxsize=None)
def bf16_speed() -> float:
    """fp32 time / bf16 time of the same small matrix products (> 1: bf16 is faster).

    Measured once per process (~10-100 ms): a 128 x 512 by 512 x 512 product, the best of a
    few repeats of each, through ``torch.mm`` (what autocast and bf16 weights call)."""
    import torch

    a = torch.randn(128, 512)
    b = torch.randn(512, 512)
    best = {}
    for dtype in (torch.float32, torch.bfloat16):
        x, y = a.to(dtype), b.to(dtype)
        torch.mm(x, y)  # warm-up: library initialisation, packing
        times = []
        deadline = time.perf_counter() + 0.3
        for i in range(5):
            t = time.perf_counter()
            torch.mm(x, y)
            times.append(time.perf_counter() - t)
            if i >= 1 and time.perf_counter() > deadline:  # a very slow path: two tries are enough
                break
        best[dtype] = min(times)
    return best[torch.float32] / best[torch.bfloat16]


def bf16_native() -> bool:
    """bf16 dot products in hardware (AVX512-BF16 / AMX on x86, the BF16 extension on Arm)."""
    if is_x86():
        return has("avx512_bf16") or has("amx_bf16")
    return forced_level() is None and "bf16" in cpu_flags()


def bf16_verdict() -> tuple[bool, str]:
    """(whether bf16 should be used for speed, the reason in words)."""
    ratio = bf16_speed()
    speed = f"bf16 products run at {ratio:.2f}x fp32" if ratio >= 0.1 else f"bf16 products run at {ratio:.3f}x fp32"
    if not bf16_native():
        return False, f"{speed} on this CPU (no native bf16: {cpu_level()})"
    if ratio < BF16_MIN_SPEEDUP:
        return False, f"{speed} on this CPU"
    return True, f"{speed} on this CPU (native bf16: {cpu_level()})"


_said: set = set()


def _say_once(message: str, log) -> None:
    if message not in _said:
        _said.add(message)
        (log or (lambda m: print(m, file=sys.stderr, flush=True)))(message)


def say_once(message: str, log=None) -> None:
    """Print ``message`` (to stderr, or call ``log`` with it) the first time this process
    says it: a choice made from the probe, reported once however often it is made."""
    _say_once(message, log)


def resolve_precision(requested: str, *, what: str = "precision", bf16: str = "bf16",
                      log=None) -> str:
    """``requested`` made concrete for the CPU: ``"auto"`` becomes ``bf16`` (the caller's bf16
    flavour) where :func:`bf16_verdict` says so, else ``"fp32"``, and the choice is printed once;
    an explicit bf16 flavour where bf16 is slow is kept and warned about once."""
    if requested == "auto":
        fast, reason = bf16_verdict()
        choice = bf16 if fast else "fp32"
        _say_once(f"{what} auto -> {choice}: {reason}", log)
        return choice
    if requested.startswith("bf16"):
        fast, reason = bf16_verdict()
        if not fast:
            _say_once(f"warning: {what} = {requested!r} is slow here: {reason}; "
                      f"\"fp32\" or \"auto\" is faster", log)
    return requested


HUGE_PAGE = 2 * 2**20
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


@functools.lru_cache(maxsize=None)
def huge_pages() -> str:
    """Linux transparent huge pages: ``"always"`` or ``"madvise"`` (memory asked for with
    ``madvise(MADV_HUGEPAGE)`` gets 2 MB pages), ``"never"``, or ``"unavailable"`` (another
    OS, no such file, or a Python without ``mmap.MADV_HUGEPAGE``)."""
    import mmap

    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return "unavailable"
    try:
        text = open(_THP_MODE).read()
    except OSError:
        return "unavailable"
    chosen = [w[1:-1] for w in text.split() if w.startswith("[")]
    return chosen[0] if chosen else "unavailable"


def huge_page_buffer(nbytes: int):
    """A uint8 tensor of ``nbytes`` on memory the kernel is asked to back with 2 MB pages
    (anonymous ``mmap``, ``madvise(MADV_HUGEPAGE)``, the start aligned to 2 MB), where
    :func:`huge_pages` allows it; else an ordinary ``torch.empty``. Its memory is returned
    to the system when the tensor and every view of it are gone."""
    import mmap

    import torch

    if nbytes <= 0 or huge_pages() not in ("always", "madvise"):
        return torch.empty(max(nbytes, 0), dtype=torch.uint8)
    try:
        region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        region.madvise(mmap.MADV_HUGEPAGE)
    except (OSError, ValueError):
        return torch.empty(nbytes, dtype=torch.uint8)
    raw = torch.frombuffer(region, dtype=torch.uint8)  # holds the mapping while in use
    start = -raw.data_ptr() % HUGE_PAGE
    return raw[start : start + nbytes]


def report() -> dict:
    """What the probe found (``minidalle env`` adds which decoding kernel is used)."""
    out = {"machine": machine(), "detected_level": detected_level(), "level": cpu_level(),
           "forced": forced_level(), "flags": sorted(f for f in cpu_flags() if f.startswith(("avx", "fma", "amx", "bf16", "sve", "asimd")))}
    try:
        import torch
    except ImportError:
        return out
    out["torch"] = torch.__version__
    out["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    out["onednn_max_isa"] = os.environ.get("ONEDNN_MAX_CPU_ISA", "(library default)")
    out["onednn"] = {f"{op}/{dt}": _try_onednn(op, dt) or "ok"
                     for op in ("linear", "reorder", "linear_add") for dt in ("float32", "bfloat16")}
    out["bf16_native"] = bf16_native()
    out["bf16_speed_vs_fp32"] = round(bf16_speed(), 3)
    out["precision_auto"] = "bf16" if bf16_verdict()[0] else "fp32"
    out["huge_pages"] = huge_pages()
    return out
