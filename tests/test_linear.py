"""minidalle.model.linear: fp32 CPU linear layers on oneDNN, F.linear everywhere else."""
import pytest
import torch
import torch.nn.functional as F

from minidalle.model import linear as onednn_linear
from minidalle.model.linear import Linear, linear, use_onednn, use_plain_linear

pytestmark = pytest.mark.cpu_paths  # `make test` reruns it with MINIDALLE_CPU forced down

needs_onednn = pytest.mark.skipif(
    not onednn_linear.ENABLED,
    reason="needs PyTorch built with oneDNN (torch.ops.mkldnn._linear_pointwise) and "
           "MINIDALLE_ONEDNN_LINEAR unset")


def _grads(fn, x, w, b, grad_out):
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    b = None if b is None else b.detach().clone().requires_grad_()
    y = fn(x, w, b)
    y.backward(grad_out)
    return y, x.grad, w.grad, None if b is None else b.grad


@needs_onednn
@pytest.mark.parametrize("shape_in, out", [((7, 32), 96), ((2, 9, 64), 16), ((3, 5, 48), 48)])
@pytest.mark.parametrize("bias", [True, False])
def test_values_and_gradients_equal_f_linear(shape_in, out, bias):
    torch.manual_seed(0)
    x = torch.randn(*shape_in)
    w = torch.randn(out, shape_in[-1])
    b = torch.randn(out) if bias else None
    g = torch.randn(*shape_in[:-1], out)
    ours = _grads(linear, x, w, b, g)
    ref = _grads(F.linear, x, w, b, g)
    for a, r in zip(ours, ref):
        if r is None:
            assert a is None
            continue
        assert a.shape == r.shape and a.dtype == r.dtype
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-4)  # fp32 rounding only
    assert use_onednn(x, w)


@needs_onednn
def test_deterministic_and_takes_strided_inputs():
    torch.manual_seed(0)
    x = torch.randn(4, 10, 64)[:, 2:8]  # not contiguous
    w = torch.randn(32, 64)
    assert torch.equal(linear(x, w), linear(x, w))
    torch.testing.assert_close(linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-4)


@needs_onednn
def test_frozen_weight_gets_no_gradient():
    x = torch.randn(5, 8, requires_grad=True)
    w, b = torch.randn(4, 8), torch.randn(4)
    linear(x, w, b).sum().backward()
    torch.testing.assert_close(x.grad, w.sum(0).expand(5, 8))


def test_falls_back_to_f_linear_exactly():
    torch.manual_seed(0)
    x, w, b = torch.randn(6, 16), torch.randn(8, 16), torch.randn(8)
    # switched off per call, or for a module marked plain
    assert torch.equal(linear(x, w, b, onednn=False), F.linear(x, w, b))
    layer = use_plain_linear(torch.nn.Sequential(Linear(16, 8)))[0]
    assert layer.onednn is False
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    # other dtypes and autocast go to F.linear (autocast must see it to cast it)
    assert not use_onednn(x.bfloat16(), w.bfloat16())
    assert torch.equal(linear(x.bfloat16(), w.bfloat16()), F.linear(x.bfloat16(), w.bfloat16()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not use_onednn(x, w)
        y = linear(x, w, b)
    assert y.dtype == torch.bfloat16
    assert not use_onednn(x[0], w)  # 1-d input


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("MINIDALLE_ONEDNN_LINEAR", "0")
    assert onednn_linear._available() is False
    monkeypatch.setattr(onednn_linear, "ENABLED", False)
    x, w = torch.randn(3, 4), torch.randn(2, 4)
    assert not use_onednn(x, w)
    assert torch.equal(linear(x, w), F.linear(x, w))


def test_model_layers_use_it_and_keep_state_dict_names():
    from minidalle.model import build_model
    from minidalle.testing.backend import unit_test_config

    model = build_model(unit_test_config(), text_vocab=50, num_image_tokens=16, fmap_size=4)
    layers = [m for m in model.modules() if isinstance(m, Linear)]
    # q/k/v, output, feed-forward in and out per block, and the logits
    assert len(layers) == 4 * len(model.transformer.layers) + 1
    assert all(isinstance(m, torch.nn.Linear) for m in layers)  # bench counts them as matmuls
    assert "to_logits.weight" in model.state_dict()
    use_plain_linear(model)
    assert not any(m.onednn for m in layers)

