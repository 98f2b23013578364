"""The bf16 and fp32 matrix-vector kernels of the lean decode step, and their fallback to oneDNN."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from minidalle.inference import decode, gemv

pytestmark = pytest.mark.cpu_paths  # `make test` reruns it with MINIDALLE_CPU forced down

needs_kernel = pytest.mark.skipif(gemv.kernel() is None or not gemv._cpu_bf16(),
                                  reason="bf16 gemv kernel not here (no AVX512-BF16/compiler)")
needs_fp32 = pytest.mark.skipif(gemv.kernel() is None,
                                reason="gemv kernel not built here (no AVX512F or no compiler)")


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


@needs_fp32
@pytest.mark.parametrize("n,k", [(3072, 512), (4096, 512), (512, 2048), (512, 512), (48, 30)])
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("bias,residual", [(False, False), (True, False), (True, True), (False, True)])
def test_kernel_equals_linear_in_fp32(n, k, rows, bias, residual):
    g = torch.Generator().manual_seed(n + k + rows)
    w = torch.randn(n, k, generator=g) / k**0.5
    b = torch.randn(n, generator=g) if bias else None
    x = torch.randn(rows, k, generator=g)
    r = torch.randn(rows, n, generator=g) if residual else None
    packed = gemv.pack(w, b)
    assert packed.dtype == torch.float32 and torch.equal(gemv.unpack(packed), w)
    y = gemv.linear(x, packed, b, r)
    assert y.dtype == torch.float32 and y.shape == (rows, n)
    # Only the summation order differs from F.linear: the error against an fp64 product is
    # of the size of F.linear's own (a few fp32 ulps of the sum of |terms|).
    exact = F.linear(x.double(), w.double(), None if b is None else b.double())
    exact = exact if r is None else exact + r.double()
    ours = (y.double() - exact).abs().max()
    theirs = (_reference(x, w, b, r).double() - exact).abs().max()
    assert ours <= 4 * theirs + 1e-6, (ours, theirs)
    torch.testing.assert_close(y, _reference(x, w, b, r), atol=1e-5, rtol=1e-5)


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
    assert gemv.pack(torch.randn(64, 32).half()) is None
    assert gemv.pack(torch.randn(64, 32), torch.randn(64).bfloat16()) is None  # bf16 bias
    assert gemv.pack(torch.randn(64, 31).bfloat16()) is None  # odd K
    assert gemv.pack(torch.randn(64, 32).bfloat16(), torch.randn(64)) is None  # fp32 bias
    assert decode._Linear(torch.randn(40, 32), None).packed is None


@needs_fp32
def test_cpu_without_avx512_bf16_keeps_the_fp32_kernel(monkeypatch):
    monkeypatch.setattr(gemv, "_cpu_bf16", lambda: False)
    assert gemv.pack(torch.randn(64, 32).bfloat16()) is None  # bf16: oneDNN
    w = torch.randn(64, 32)
    lin = decode._Linear(w, None)
    assert lin.packed is not None
    x = torch.randn(1, 32)
    torch.testing.assert_close(lin(x), _reference(x, w, None, None), atol=1e-5, rtol=1e-5)


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
