"""Attention patterns against brute-force definitions, and the conformance checks."""
import pytest
import torch
from torch import nn

from minidalle.model.attention_api import AttentionModule, AttentionPattern, AttentionSpec, pattern_mask
from minidalle.plugin.discovery import get_registry
from minidalle.testing.attention import build_for_test, check_attention, make_spec


# The recipe's definitions, one (query i, key j) pair at a time.
def _rc(p, text_len, f):
    k = p - text_len
    return k // f, k % f


def ref_full(i, j, t, f):
    return j <= i


def ref_axial(axis):
    def ref(i, j, t, f):
        if j > i:
            return False
        if i < t or j < t:  # text query, or a text key
            return True
        return _rc(i, t, f)[axis] == _rc(j, t, f)[axis]

    return ref


def ref_conv(kernel, dilation):
    def ref(i, j, t, f):
        if j > i:
            return False
        if i < t or j < t:
            return True
        (ri, ci), (rj, cj) = _rc(i, t, f), _rc(j, t, f)
        reach = (kernel // 2) * dilation
        return (abs(ri - rj) <= reach and abs(ci - cj) <= reach
                and (ri - rj) % dilation == 0 and (ci - cj) % dilation == 0)

    return ref


BUILTINS = [
    ("full", None, ref_full),
    ("axial_row", None, ref_axial(0)),
    ("axial_col", None, ref_axial(1)),
    ("conv_like", None, ref_conv(5, 1)),
    ("conv_like", {"kernel_size": 3, "dilation": 2}, ref_conv(3, 2)),
]


@pytest.mark.parametrize("name,config,ref", BUILTINS, ids=lambda v: str(v) if not callable(v) else "")
def test_builtin_conformance(name, config, ref):
    check_attention(name, config, reference=ref)


def test_recipe_geometry_axial_row():
    """The recipe's example: image input k at row k // 16 sees all 81 text positions."""
    spec = make_spec(text_len=81, fmap_size=16)
    mask = build_for_test("axial_row", spec=spec).mask
    q = 81 + 16 * 3 + 5  # image input 53: row 3, column 5
    assert mask[q, :81].all()
    assert mask[q, 81 + 48 : 81 + 54].all() and not mask[q, 81 + 54 :].any()
    assert not mask[q, 81 : 81 + 48].any()
    assert mask[40, :41].all() and not mask[40, 41:].any()


def test_every_registered_attention_is_causal():
    registry = get_registry()
    for name in registry.names("attention"):
        from minidalle.testing.attention import check_causal

        check_causal(build_for_test(name, registry=registry))


def test_pattern_validation():
    class NotCausal(AttentionPattern):
        def mask(self, t, f):
            return torch.ones(t + f * f, t + f * f, dtype=torch.bool)

    with pytest.raises(ValueError, match="not causal"):
        pattern_mask(NotCausal(), 3, 2)
    with pytest.raises(ValueError, match="shape"):
        pattern_mask(lambda t, f: torch.ones(2, 2, dtype=torch.bool), 3, 2)


def test_pattern_only_plugin_gets_cache_for_free():
    """A function-only pattern (sliding window over image tokens) passes every check."""

    def sliding(t, f):
        n = t + f * f
        i = torch.arange(n)
        causal = i[:, None] >= i[None, :]
        near = (i[:, None] - i[None, :]) < 3
        return causal & ((i[None, :] < t) | near)

    check_attention(lambda config, spec: sliding)


class _NoCache(AttentionModule):
    supports_cache = False

    def __init__(self, spec: AttentionSpec):
        super().__init__(spec)
        self.proj = nn.Linear(spec.dim, spec.dim)

    def forward(self, x, *, offset=0, cache=None):
        return self.proj(x).cumsum(dim=1)  # causal: a running sum


def test_module_plugin_without_cache():
    check_attention(_NoCache)


def test_broken_module_is_caught():
    class Peeks(_NoCache):
        def forward(self, x, *, offset=0, cache=None):
            return self.proj(x).flip(1).cumsum(1).flip(1)  # sees the future

    with pytest.raises(AssertionError, match="not causal"):
        check_attention(Peeks)


@pytest.mark.parametrize("name", ["axial_row", "axial_col"])
def test_axial_fast_path_matches_masked_attention_at_recipe_size(name):
    """The per-row/column computation equals dense masked attention (336 positions)."""
    import torch.nn.functional as F

    spec = make_spec(text_len=81, fmap_size=16, dim=64, heads=2, dim_head=32)
    module = build_for_test(name, spec=spec)
    x = torch.randn(2, 336, 64, dtype=torch.float64, requires_grad=True)
    fast = module(x)
    q, k, v = module.to_qkv(x).view(2, 336, 3, 2, 32).permute(2, 0, 3, 1, 4)
    mask = module.mask[:336, :336]
    ref = module.to_out(F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(2, 336, 64))
    torch.testing.assert_close(fast, ref, atol=1e-10, rtol=1e-10)
    g_fast, = torch.autograd.grad(fast.square().sum(), x)
    g_ref, = torch.autograd.grad(ref.square().sum(), x)
    torch.testing.assert_close(g_fast, g_ref, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("name", ["axial_row", "axial_col"])
def test_axial_fast_path_gradients_reach_qkv_in_fp32_at_recipe_size(name):
    """fp32, recipe sizes: the per-row/column path (split + baddbmm) matches dense masked
    attention forward and backward, including the padded last image position."""
    import torch.nn.functional as F

    spec = make_spec(text_len=81, fmap_size=16, dim=64, heads=2, dim_head=64)
    module = build_for_test(name, spec=spec)
    q, k, v = (torch.randn(2, 2, 336, 64, requires_grad=True) for _ in range(3))
    fast = module.attend(q, k, v, 0)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=module.mask[:336, :336])
    torch.testing.assert_close(fast, ref, atol=2e-6, rtol=1e-5)
    grad = torch.randn_like(ref)
    g_fast = torch.autograd.grad(fast, (q, k, v), grad)
    g_ref = torch.autograd.grad(ref, (q, k, v), grad)
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["axial_row", "axial_col"])
@pytest.mark.parametrize("n", [336, 200, 82])
def test_axial_hand_written_backward_matches_masked_attention(name, n):
    """_AxialCore (fp32 training's axial path, own backward) against dense masked attention
    under autograd, in fp64: output and the gradients of the input and every weight, for
    the whole sequence and for shorter ones (padded image positions)."""
    import torch.nn.functional as F

    from minidalle.components.attention import _AxialCore

    spec = make_spec(text_len=81, fmap_size=16, dim=64, heads=2, dim_head=32)
    module = build_for_test(name, spec=spec)  # fp64
    x = torch.randn(2, n, 64, dtype=torch.float64)
    grad = torch.randn(2, n, 64, dtype=torch.float64)

    def run(core):
        module.zero_grad()
        xi = x.clone().requires_grad_()
        out = module.to_out(core(module.to_qkv(xi).view(2, n, 3, 2, 32)))
        out.backward(grad)
        return [out.detach(), xi.grad] + [p.grad.clone() for p in module.parameters()]

    def dense(qkv):
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=module.mask[:n, :n])
        return out.transpose(1, 2).reshape(2, n, 64)

    ours = run(lambda qkv: _AxialCore.apply(qkv, module.axis, 81, 16))
    for a, b in zip(ours, run(dense)):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("name", ["axial_row", "axial_col"])
def test_axial_module_uses_the_hand_written_path_in_fp32_only(name):
    spec = make_spec(text_len=81, fmap_size=16, dim=64, heads=2, dim_head=32)
    module = build_for_test(name, spec=spec).float()  # build_for_test gives fp64
    x = torch.randn(1, 300, 64, requires_grad=True)
    out = module(x)
    # fp32: the hand-written core sits between to_qkv and to_out
    node, names = out.grad_fn, set()
    while node is not None and len(names) < 20:
        names.add(type(node).__name__)
        node = node.next_functions[0][0] if node.next_functions else None
    assert any("AxialCore" in n for n in names), names
    ref = module.double()(x.double().detach())  # fp64 takes the generic path
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)  # fp32 rounding
