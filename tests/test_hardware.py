"""The CPU capability probe (minidalle/hardware.py): levels, the MINIDALLE_CPU cap, oneDNN
op tries, precision "auto". Each forced level runs in a fresh process, as a user would set it."""
import json
import os
import subprocess
import sys

import pytest

from minidalle import hardware

pytestmark = pytest.mark.cpu_paths


def _python(code: str, **env) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items()
            if k not in ("MINIDALLE_CPU", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")}
    full.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=120)


def test_level_is_one_of_the_known_ones_and_capped_by_the_env(monkeypatch):
    assert hardware.detected_level() in hardware.LEVELS
    monkeypatch.setenv("MINIDALLE_CPU", "generic")
    assert hardware.cpu_level() == "generic"
    assert not hardware.has("avx2") and not hardware.has("avx512f") and not hardware.bf16_native()
    monkeypatch.setenv("MINIDALLE_CPU", "avx2")
    assert hardware.cpu_level() in ("generic", "avx2")  # never more than the CPU has
    assert not hardware.has("avx512f") and not hardware.has("avx512_bf16")
    assert hardware.has("avx2") == ("avx2" in hardware.cpu_flags() and hardware.is_x86())
    monkeypatch.delenv("MINIDALLE_CPU")
    assert hardware.cpu_level() == hardware.detected_level()


def test_a_bad_value_is_one_line_naming_the_variable():
    proc = subprocess.run([sys.executable, "-m", "minidalle", "env"], capture_output=True, text=True,
                          env={**os.environ, "MINIDALLE_CPU": "avx9000"}, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "minidalle: error: MINIDALLE_CPU='avx9000': expected one of generic, avx2, avx512, avx512_bf16 (or unset)"]


def test_forcing_caps_the_libraries_too_when_set_before_torch():
    code = ("import os, minidalle, torch; print(os.environ['ONEDNN_MAX_CPU_ISA'], "
            "torch.backends.cpu.get_cpu_capability())")
    proc = _python(code, MINIDALLE_CPU="avx2")
    assert proc.returncode == 0, proc.stderr
    isa, capability = proc.stdout.split()
    assert isa == "AVX2"
    assert capability in ("AVX2", "DEFAULT", "NO AVX")  # x86 with AVX2, or a lesser CPU


@pytest.mark.skipif(not hardware.is_x86(), reason="needs an x86 CPU (oneDNN's ISA cap)")
def test_bf16_onednn_ops_are_tried_not_assumed():
    code = ("import json, torch, minidalle; from minidalle import hardware as h; print(json.dumps("
            "{op: [h.onednn_works(op, torch.float32), h.onednn_reason(op, torch.bfloat16)] "
            "for op in ('linear', 'reorder', 'linear_add')}))")
    proc = _python(code, MINIDALLE_CPU="avx2")
    assert proc.returncode == 0, proc.stderr
    for op, (fp32_works, bf16_reason) in json.loads(proc.stdout).items():
        assert fp32_works, op  # oneDNN's fp32 kernels need no AVX-512
        assert bf16_reason and "bf16" in bf16_reason.lower() or "bfloat16" in bf16_reason, (op, bf16_reason)


def test_auto_precision_picks_fp32_without_native_bf16_and_says_why():
    code = ("from minidalle import hardware as h; print(h.resolve_precision('auto', what='backend.precision')); "
            "print(h.resolve_precision('auto', what='backend.precision'))")
    proc = _python(code, MINIDALLE_CPU="avx2")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["fp32", "fp32"]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, lines  # printed once
    assert lines[0].startswith("backend.precision auto -> fp32: bf16 products run at ")
    assert "x fp32 on this CPU (no native bf16: " in lines[0]


def test_explicit_bf16_where_slow_is_kept_and_warned_once():
    code = ("from minidalle import hardware as h; print(h.resolve_precision('bf16', what='generate precision')); "
            "h.resolve_precision('bf16', what='generate precision')")
    proc = _python(code, MINIDALLE_CPU="generic")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "bf16"
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: generate precision = 'bf16' is slow here: bf16 products run at ")


def test_auto_agrees_with_the_measurement_here():
    fast, reason = hardware.bf16_verdict()
    assert hardware.bf16_speed() > 0
    choice = hardware.resolve_precision("auto", what="test", log=lambda m: None)
    assert choice == ("bf16" if fast else "fp32")
    assert "x fp32 on this CPU" in reason
    if not hardware.bf16_native():
        assert not fast


def test_cpu_backend_resolves_auto_once(capsys):
    from minidalle.components.backends.cpu import CpuConfig, build

    backend = build(CpuConfig())  # precision "auto" is the default
    assert CpuConfig().precision == "auto"
    assert backend.precision in ("fp32", "bf16")
    assert backend.precision == ("bf16" if hardware.bf16_verdict()[0] else "fp32")
    assert f"cpu {backend.precision}," in backend.describe()


@pytest.mark.parametrize("forced", [None, "avx2", "generic"])
def test_env_command_reports_the_probe(forced):
    env = {"MINIDALLE_CPU": forced} if forced else {}
    full = {k: v for k, v in os.environ.items() if k != "MINIDALLE_CPU"}
    proc = subprocess.run([sys.executable, "-m", "minidalle", "env", "--json"], capture_output=True,
                          text=True, env={**full, **env}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout)
    assert found["level"] in hardware.LEVELS and found["forced"] == forced
    assert found["precision_auto"] in ("fp32", "bf16")
    assert found["huge_pages"] in ("always", "madvise", "never", "unavailable")
    assert set(found["onednn"]) == {f"{op}/{dt}" for op in ("linear", "reorder", "linear_add")
                                    for dt in ("float32", "bfloat16")}
    if forced:
        assert hardware.LEVELS.index(found["level"]) <= hardware.LEVELS.index(forced)
        assert found["precision_auto"] == "fp32" and not found["bf16_native"]
        assert found["gemv_kernel"].startswith(("not used", "off"))  or "avx2" in found["gemv_kernel"]


def test_huge_page_buffer_is_aligned_where_granted_and_ordinary_elsewhere(monkeypatch):
    import torch

    from minidalle.inference import gemv

    mode = hardware.huge_pages()
    assert mode in ("always", "madvise", "never", "unavailable")
    buf = hardware.huge_page_buffer(3 * hardware.HUGE_PAGE + 100)
    assert buf.dtype == torch.uint8 and buf.numel() == 3 * hardware.HUGE_PAGE + 100
    if mode in ("always", "madvise"):
        assert buf.data_ptr() % hardware.HUGE_PAGE == 0
    buf.fill_(7)
    assert int(buf[-1]) == 7
    # where the OS has no huge pages: an ordinary tensor
    hardware.huge_pages.cache_clear()
    monkeypatch.setattr(hardware, "_THP_MODE", "/nonexistent/thp")
    try:
        assert hardware.huge_pages() == "unavailable"
        assert hardware.huge_page_buffer(1000).numel() == 1000
    finally:
        hardware.huge_pages.cache_clear()
    # the decoder's buffer: copies end to end, in order, each start 64-byte aligned
    parts = [torch.randn(5, 3), torch.randn(16, 8).bfloat16(), torch.arange(7)]
    moved = gemv.one_buffer(parts)
    assert [m.dtype for m in moved] == [p.dtype for p in parts]
    assert all(torch.equal(m, p) and m.data_ptr() % 64 == 0 for m, p in zip(moved, parts))
    assert moved[0].data_ptr() < moved[1].data_ptr() < moved[2].data_ptr()
