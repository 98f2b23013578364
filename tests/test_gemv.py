"""The matrix-vector kernels of the lean decode step (AVX-512: fp32, bf16-stored, native bf16;
AVX2 + FMA: fp32, bf16-stored), the variant each CPU level gets, and the fallback to oneDNN."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from minidalle import hardware
from minidalle.inference import decode, gemv

pytestmark = pytest.mark.cpu_paths  # `make test` reruns it with MINIDALLE_CPU forced down

needs_kernel = pytest.mark.skipif(gemv.kernel() is None or not gemv._cpu_bf16(),
                                  reason="bf16 gemv kernel not here (no AVX512-BF16/compiler)")
needs_fp32 = pytest.mark.skipif(gemv.kernel() is None,
                                reason="gemv kernel not here (CPU level below AVX2 + FMA, or no compiler)")


def _reference(x, w, b, r):
    y = F.linear(x.float(), w.float(), None if b is None else b.float())
    return y if r is None else y + r.float()


def _each_thread_count(check):
    """Run ``check()`` with 1 and then 2 torch threads (the kernel splits rows over them)."""
    threads = torch.get_num_threads()
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            check()
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def fresh_gemv(monkeypatch):
    """gemv as in a new process: the kernel not tried yet (the real state comes back after)."""
    monkeypatch.setattr(gemv, "_tried", False)
    monkeypatch.setattr(gemv, "_module", None)


@needs_kernel
@pytest.mark.parametrize("n,k", [(3072, 512), (512, 2048), (512, 512), (48, 32)])
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("bias,residual", [(False, False), (True, False), (True, True), (False, True)])
def test_kernel_equals_linear_in_bf16(n, k, rows, bias, residual):
    g = torch.Generator().manual_seed(n + k + rows)
    w = (torch.randn(n, k, generator=g) / k**0.5).bfloat16()
    b = torch.randn(n, generator=g).bfloat16() if bias else None
    x = torch.randn(rows, k, generator=g).bfloat16()
    r = torch.randn(rows, n, generator=g).bfloat16() if residual else None
    y = gemv.linear(x, gemv.pack(w, b), b, r)
    assert y.dtype == torch.bfloat16 and y.shape == (rows, n)
    # fp32 accumulation, one rounding to bf16: within a bf16 ulp or two of the exact result
    torch.testing.assert_close(y.float(), _reference(x, w, b, r), atol=2e-2, rtol=1.6e-2)


def _variant(name):
    """The product of kernel variant ``name`` ("avx512", "avx2"), where the probe allows it."""
    allowed = hardware.has("avx512f") if name == "avx512" else hardware.has("avx2") and hardware.has("fma")
    if gemv.kernel() is None or not allowed:
        pytest.skip(f"needs the gemv kernel and {name} (CPU level {hardware.cpu_level()})")
    return gemv.kernel().linear if name == "avx512" else gemv.kernel().linear_avx2


@pytest.mark.parametrize("variant", ["avx512", "avx2"])
@pytest.mark.parametrize("n,k", [(3072, 512), (4096, 512), (512, 2048), (512, 512), (48, 30), (80, 24)])
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("bias,residual", [(False, False), (True, False), (True, True), (False, True)])
def test_kernel_equals_linear_in_fp32(variant, n, k, rows, bias, residual):
    fn = _variant(variant)
    g = torch.Generator().manual_seed(n + k + rows)
    w = torch.randn(n, k, generator=g) / k**0.5
    b = torch.randn(n, generator=g) if bias else None
    x = torch.randn(rows, k, generator=g)
    r = torch.randn(rows, n, generator=g) if residual else None
    group = gemv.GROUPS[variant, torch.float32]
    packed = gemv.pack_rows(w, group)
    assert packed.dtype == torch.float32 and torch.equal(gemv.unpack(packed, group), w)
    y = fn(x, packed, b, r)
    assert y.dtype == torch.float32 and y.shape == (rows, n)
    # Only the summation order differs from F.linear: the error against an fp64 product is
    # of the size of F.linear's own (a few fp32 ulps of the sum of |terms|).
    exact = F.linear(x.double(), w.double(), None if b is None else b.double())
    exact = exact if r is None else exact + r.double()
    ours = (y.double() - exact).abs().max()
    theirs = (_reference(x, w, b, r).double() - exact).abs().max()
    assert ours <= 4 * theirs + 1e-6, (ours, theirs)
    torch.testing.assert_close(y, _reference(x, w, b, r), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["avx512", "avx2"])
@pytest.mark.parametrize("n,k", [(3072, 512), (512, 2048), (48, 30), (16, 1), (80, 24)])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8])
def test_bf16_stored_weights_fp32_arithmetic(variant, n, k, rows):
    """bf16 copies of the weights, x, bias, residual and y in fp32: F.linear on the rounded
    weights up to fp32 summation order; bf16 inputs give that result rounded to bf16."""
    fn = _variant(variant)
    g = torch.Generator().manual_seed(n + k + rows)
    w = (torch.randn(n, k, generator=g) / k**0.5).bfloat16()
    b, x, r = torch.randn(n, generator=g), torch.randn(rows, k, generator=g), torch.randn(rows, n, generator=g)
    group = gemv.GROUPS[variant, torch.bfloat16]
    packed = gemv.pack_rows(w, group)
    assert packed.dtype == torch.bfloat16 and torch.equal(gemv.unpack(packed, group), w)
    exact = F.linear(x.double(), w.double(), b.double()) + r.double()
    y = fn(x, packed, b, r)
    assert y.dtype == torch.float32 and y.shape == (rows, n)
    torch.testing.assert_close(y.double(), exact, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fn(x, packed, None, None).double(), F.linear(x.double(), w.double()),
                               atol=1e-5, rtol=1e-5)
    # bf16 x, bias, residual (a bf16 model on a CPU without native bf16): widened exactly, y
    # rounded once to bf16
    xb, bb, rb = x.bfloat16(), b.bfloat16(), r.bfloat16()
    y16 = fn(xb, packed, bb, rb)
    assert y16.dtype == torch.bfloat16 and y16.shape == (rows, n)
    assert torch.equal(y16, fn(xb.float(), packed, bb.float(), rb.float()).bfloat16())
    assert torch.equal(fn(x, packed, bb, rb), fn(x, packed, bb.float(), rb.float()))  # fp32 x: fp32 y


@pytest.mark.parametrize("variant", ["avx512", "avx2"])
def test_bf16_output_rounds_like_pytorch(variant):
    fn = _variant(variant)
    eye = gemv.pack_rows(torch.eye(16).bfloat16(), gemv.GROUPS[variant, torch.bfloat16])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 16, generator=g).bfloat16()
    r = (torch.randn(8, 16, generator=g) * 2**-9).bfloat16()  # x + r falls between bf16 values
    # ties (to even), overflow to inf, inf and NaN (in the residual: x's would spread over y)
    x[0, :7] = torch.tensor([1.0, 1 + 2**-7, -1.0, 3.3e38, 1.0, 1.0, -3.3e38])
    r[0, :7] = torch.tensor([2**-8, 2**-8, -(2**-8), 3.3e38, float("-inf"), float("nan"), -3.3e38])
    y = fn(x, eye, None, r)  # x @ I exactly, + r in fp32, then one rounding
    want = (x.float() + r.float()).bfloat16()
    assert y.dtype == torch.bfloat16
    assert torch.equal(y.isnan(), want.isnan()) and y[0, 5].isnan()
    assert torch.equal(y.float().nan_to_num(0.0), want.float().nan_to_num(0.0))
    assert y[0, 3] == float("inf") and y[0, 4] == y[0, 6] == float("-inf")
    assert y[0, 0] == 1 and y[0, 1] == 1 + 2**-6


@needs_fp32
def test_fp32_kernel_threads_and_checks_dtypes():
    w, b = torch.randn(256, 64), torch.randn(256)
    x, r = torch.randn(2, 1, 64), torch.randn(2, 1, 256)
    packed = gemv.pack(w, b)
    want = _reference(x, w, b, r)
    _each_thread_count(lambda: torch.testing.assert_close(gemv.linear(x, packed, b, r), want,
                                                          atol=1e-5, rtol=1e-5))
    for bad in (dict(x=x.bfloat16()), dict(bias=b.bfloat16()), dict(residual=r.bfloat16()),
                dict(x=torch.randn(9, 64))):
        args = {"x": x, "bias": b, "residual": r, **bad}
        with pytest.raises(RuntimeError, match="linear: bad"):
            gemv.linear(args["x"], packed, args["bias"], args["residual"])


@needs_fp32
def test_decode_linear_uses_the_fp32_kernel_for_fp32_inputs():
    w, b = torch.randn(64, 32), torch.randn(64)
    lin = decode._Linear(w, b)
    assert lin.packed is not None and lin.packed.dtype == torch.float32
    x, r = torch.randn(3, 32), torch.randn(3, 64)
    torch.testing.assert_close(lin(x, residual=r), _reference(x, w, b, r), atol=1e-5, rtol=1e-5)
    assert lin.weight is None
    x = torch.randn(gemv.MAX_ROWS + 1, 32)  # more rows: oneDNN on the unpacked weight
    torch.testing.assert_close(lin(x), _reference(x, w, b, None), atol=1e-5, rtol=1e-5)
    assert lin.weight is not None


@needs_kernel
def test_kernel_takes_leading_dims_and_threads():
    w, b = torch.randn(64, 32).bfloat16(), torch.randn(64).bfloat16()
    x, r = torch.randn(2, 1, 32).bfloat16(), torch.randn(2, 1, 64).bfloat16()
    packed = gemv.pack(w, b)
    want = _reference(x, w, b, r)

    def check():
        y = gemv.linear(x, packed, b, r)
        assert y.shape == (2, 1, 64)
        torch.testing.assert_close(y.float(), want, atol=2e-2, rtol=1.6e-2)

    _each_thread_count(check)


@needs_kernel
def test_kernel_checks_its_inputs():
    w = torch.randn(64, 32).bfloat16()
    packed = gemv.pack(w)
    b = torch.randn(64, 2).bfloat16()[:, 0]  # not contiguous: fine
    x = torch.randn(2, 32).bfloat16()
    torch.testing.assert_close(gemv.linear(x, packed, b).float(), _reference(x, w, b, None),
                               atol=2e-2, rtol=1.6e-2)
    assert gemv.linear(x[:0], packed).shape == (0, 64)
    for bad in (dict(x=torch.randn(9, 32).bfloat16()), dict(x=x.float()),
                dict(x=torch.randn(2, 30).bfloat16()), dict(bias=torch.randn(63).bfloat16()),
                dict(residual=torch.randn(2, 32).bfloat16())):
        args = {"x": x, "bias": None, "residual": None, **bad}
        with pytest.raises(RuntimeError, match="linear: bad"):
            gemv.linear(args["x"], packed, args["bias"], args["residual"])


@needs_kernel
def test_decode_linear_uses_the_kernel_up_to_max_rows_then_onednn():
    w, b = torch.randn(64, 32).bfloat16(), torch.randn(64).bfloat16()
    lin = decode._Linear(w, b)
    assert lin.packed is not None
    small = lin(torch.randn(gemv.MAX_ROWS, 32).bfloat16())
    assert lin.weight is None  # oneDNN's weight not made while the kernel serves
    x = torch.randn(gemv.MAX_ROWS + 1, 32).bfloat16()
    torch.testing.assert_close(lin(x).float(), _reference(x, w, b, None), atol=2e-2, rtol=1.6e-2)
    assert lin.weight is not None and small.shape == (gemv.MAX_ROWS, 64)
    assert torch.equal(gemv.unpack(lin.packed), w)


def test_kernel_not_used_for_odd_shapes_or_dtypes():
    assert gemv.pack(torch.randn(40, 32).bfloat16()) is None  # rows not a multiple of 16
    assert gemv.pack(torch.randn(40, 32)) is None
    assert gemv.pack(torch.randn(40, 32), store="bf16") is None
    assert gemv.pack(torch.randn(64, 32).half()) is None
    assert gemv.pack(torch.randn(64, 32), torch.randn(64).bfloat16()) is None  # bf16 bias
    assert gemv.pack(torch.randn(64, 32).bfloat16(), torch.randn(64)) is None  # fp32 bias
    assert gemv.pack(torch.randn(64, 32).bfloat16(), store="fp32") is None
    if gemv._cpu_bf16():  # the k-pair layout needs an even K
        assert gemv.pack(torch.randn(64, 31).bfloat16()) is None
    assert decode._Linear(torch.randn(40, 32), None).packed is None
    with pytest.raises(ValueError, match="store"):
        gemv.pack(torch.randn(64, 32), store="fp16")


@needs_fp32
def test_cpu_without_avx512_bf16_takes_bf16_weights_in_fp32_arithmetic(monkeypatch):
    monkeypatch.setattr(gemv, "_cpu_bf16", lambda: False)
    w, b = torch.randn(64, 30).bfloat16(), torch.randn(64).bfloat16()
    packed = gemv.pack(w, b)
    assert packed.dim() == 3 and packed.dtype == torch.bfloat16  # not the k-pair layout
    lin = decode._Linear(w, b)
    x, r = torch.randn(2, 30).bfloat16(), torch.randn(2, 64).bfloat16()
    y = lin(x, residual=r)
    assert y.dtype == torch.bfloat16 and lin.weight is None
    torch.testing.assert_close(y.float(), _reference(x, w, b, r), atol=2e-2, rtol=1.6e-2)
    w = torch.randn(64, 32)
    lin = decode._Linear(w, None)
    assert lin.packed is not None and lin.packed.dtype == torch.float32
    x = torch.randn(1, 32)
    torch.testing.assert_close(lin(x), _reference(x, w, None, None), atol=1e-5, rtol=1e-5)


@needs_fp32
def test_decode_linear_with_bf16_stored_weights():
    """store="bf16": fp32 in and out, the weight rounded to bf16 once; more rows than the
    kernel takes go through oneDNN/F.linear on the same rounded weight."""
    w, b = torch.randn(64, 32), torch.randn(64)
    lin = decode._Linear(w, b, store="bf16")
    assert lin.packed.dtype == torch.bfloat16 and lin.bytes_read == 64 * 32 * 2
    rounded = w.bfloat16().float()
    for rows in (1, gemv.MAX_ROWS, gemv.MAX_ROWS + 1):
        x, r = torch.randn(rows, 32), torch.randn(rows, 64)
        y = lin(x, residual=r)
        assert y.dtype == torch.float32
        torch.testing.assert_close(y, _reference(x, rounded, b, r), atol=1e-5, rtol=1e-5)
    assert lin.weight is not None and lin.weight.dtype == torch.float32
    assert decode._Linear(w, b).bytes_read == 64 * 32 * 4


@pytest.mark.parametrize("why", ["env", "cpu", "build"])
def test_fallback_to_onednn(why, fresh_gemv, monkeypatch, capsys):
    if why == "env":
        monkeypatch.setenv("MINIDALLE_GEMV", "0")
    elif why == "cpu":
        monkeypatch.setattr(gemv, "_cpu_ok", lambda: False)
    else:
        def fail():
            raise RuntimeError("no compiler")
        monkeypatch.setattr(gemv, "_build", fail)
    w, b = torch.randn(64, 32).bfloat16(), torch.randn(64).bfloat16()
    lin = decode._Linear(w, b)
    assert gemv.kernel() is None and lin.packed is None
    x, r = torch.randn(1, 32).bfloat16(), torch.randn(1, 64).bfloat16()
    torch.testing.assert_close(lin(x, residual=r).float(), _reference(x, w, b, r),
                               atol=2e-2, rtol=1.6e-2)
    lin = decode._Linear(w.float(), b.float())  # fp32 likewise
    assert lin.packed is None
    torch.testing.assert_close(lin(x.float(), residual=r.float()), _reference(x, w, b, r),
                               atol=1e-5, rtol=1e-5)
    assert capsys.readouterr().out == ""


def _build_in(tmp_path, **env):
    code = ("from minidalle.inference import gemv; import sys; "
            "sys.stderr.write('BUILT' if gemv.kernel() is not None else 'NONE')")
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path), **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=300)


def test_failed_build_falls_back_silently(tmp_path):
    p = _build_in(tmp_path, CXX="/nonexistent/c++")  # torch warns about such a compiler
    assert p.returncode == 0 and p.stdout == "" and p.stderr.endswith("NONE"), p.stderr
    assert "warn" not in p.stderr.lower() and "compiler" not in p.stderr.lower(), p.stderr


@needs_kernel
def test_fresh_build_prints_nothing_to_stdout(tmp_path):
    p = _build_in(tmp_path)  # a real build into an empty cache (10-25 s)
    assert p.returncode == 0 and p.stdout == "" and p.stderr.endswith("BUILT"), p.stderr
    assert "warn" not in p.stderr.lower(), p.stderr
    assert any(name.startswith("minidalle_gemv_") for name in os.listdir(tmp_path))


def _forced_check():
    """Run in a process with a forced CPU level: report the variant and the layouts each weight
    gets, after checking every product against F.linear (see test_forced_cpu_level)."""
    out = {"variant": gemv.variant(), "level": hardware.cpu_level(), "layouts": {}}
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(48, 40, generator=g) / 7, torch.randn(48, generator=g)
    for name, weight, bias, store, x_dtype, tol in [
            ("fp32", w, b, None, torch.float32, 1e-5), ("bf16-weights", w, b, "bf16", torch.float32, 1e-5),
            ("bf16", w.bfloat16(), b.bfloat16(), None, torch.bfloat16, 2e-2)]:
        lin = decode._Linear(weight, bias, store)
        p = lin.packed
        out["layouts"][name] = None if p is None else f"{str(p.dtype)[6:]}/{p.dim()}d"
        rounded = weight.bfloat16().float() if store else weight.float()
        for rows in (1, 5, gemv.MAX_ROWS + 1):
            x, r = torch.randn(rows, 40, generator=g), torch.randn(rows, 48, generator=g)
            y = lin(x.to(x_dtype), residual=r.to(x_dtype))
            assert y.dtype == x_dtype, (name, y.dtype)
            want = _reference(x.to(x_dtype), rounded, bias, r.to(x_dtype))
            torch.testing.assert_close(y.float(), want, atol=tol, rtol=tol)
    print(json.dumps(out))


# level -> the variant and the layouts of fp32, bf16-weights and bf16 weights there
_FORCED = {
    "avx512_bf16": ("avx512", {"fp32": "float32/3d", "bf16-weights": "bfloat16/3d", "bf16": "bfloat16/4d"}),
    "avx512": ("avx512", {"fp32": "float32/3d", "bf16-weights": "bfloat16/3d", "bf16": "bfloat16/3d"}),
    "avx2": ("avx2", {"fp32": "float32/3d", "bf16-weights": "bfloat16/3d", "bf16": "bfloat16/3d"}),
    "generic": (None, {"fp32": None, "bf16-weights": None, "bf16": None}),
}


def forced_env(level):
    """The environment of a process that runs as on a CPU of ``level`` (libraries capped too)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MINIDALLE_CPU", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MINIDALLE_GEMV")}
    return {**env, "MINIDALLE_CPU": level, **hardware._LIBRARY_CAPS[level]}


@pytest.mark.parametrize("level", list(_FORCED))
def test_forced_cpu_level(level):
    """Each variant is picked from the probe and is right: AVX-512 fp32 / bf16-stored / native
    bf16, AVX2 fp32 / bf16-stored, no kernel (PyTorch's paths) at the generic level."""
    if hardware.LEVELS.index(hardware.detected_level()) < hardware.LEVELS.index(level):
        pytest.skip(f"the CPU has no {level}")
    if level != "generic" and gemv.kernel() is None:
        pytest.skip(f"gemv kernel not in this process (CPU level {hardware.cpu_level()}, or no compiler)")
    code = "import test_gemv; test_gemv._forced_check()"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**forced_env(level), "PYTHONPATH": os.pathsep.join(
                           [str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])})
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    variant, layouts = _FORCED[level]
    assert got == {"variant": variant, "level": level, "layouts": layouts}
