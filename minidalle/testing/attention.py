"""Conformance checks for attention plugins.

Run them from a plugin's tests::

    from minidalle.testing.attention import check_attention

    def test_my_attention():
        check_attention("sliding", config={"window": 3})          # a registered name
        # or: check_attention(my_factory, config=MyConfig(window=3))

Each check raises ``AssertionError`` with a message saying what is wrong. The checks:
shapes, causality (a later input never changes an earlier output), the pattern against a
brute-force attention (for patterns; a ``reference(i, j, text_len, fmap_size) -> bool``
function may be given to check the mask itself), cache vs no-cache equality (when the
module declares ``supports_cache``) and gradient flow.
"""
from __future__ import annotations

from typing import Callable

import torch

from minidalle.model.attention_api import AttentionSpec, PatternAttention, as_attention_module


def make_spec(text_len: int = 5, fmap_size: int = 4, dim: int = 32, heads: int = 2,
              dim_head: int = 8) -> AttentionSpec:
    return AttentionSpec(dim=dim, heads=heads, dim_head=dim_head, dropout=0.0,
                         text_len=text_len, fmap_size=fmap_size)


def build_for_test(attention, config=None, spec: AttentionSpec | None = None, registry=None):
    """A module from a registered name, a factory, a pattern or a module class."""
    spec = spec or make_spec()
    if isinstance(attention, str):
        from minidalle.plugin.discovery import get_registry

        registry = registry or get_registry()
        obj = registry.get("attention", attention).build(config, spec=spec)
    elif isinstance(attention, type):
        obj = attention(spec)
    elif hasattr(attention, "mask") or isinstance(attention, torch.nn.Module):
        obj = attention
    else:
        obj = attention(config, spec=spec)
    module = as_attention_module(obj, spec, str(attention))
    torch.manual_seed(0)
    for p in module.parameters():  # not the default init: make mistakes visible
        torch.nn.init.normal_(p, std=0.3)
    return module.double().eval()


def _inputs(spec: AttentionSpec, batch: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = spec.max_len - 1  # what the model feeds in training
    return torch.randn(batch, n, spec.dim, generator=g, dtype=torch.float64)


def check_shapes(module) -> None:
    spec = module.spec
    x = _inputs(spec)
    for n in (x.shape[1], spec.text_len, spec.text_len + 3):
        out = module(x[:, :n])
        assert out.shape == (x.shape[0], n, spec.dim), f"output shape {tuple(out.shape)} for input {tuple(x[:, :n].shape)}"
        assert torch.isfinite(out).all(), f"non-finite output for {n} positions"


def check_causal(module) -> None:
    x = _inputs(module.spec)
    base = module(x)
    n = x.shape[1]
    for j in sorted({1, module.spec.text_len - 1, module.spec.text_len, n // 2 + 1, n - 1}):
        x2 = x.clone()
        x2[:, j] += torch.randn_like(x2[:, j])
        out = module(x2)
        changed = (out[:, :j] - base[:, :j]).abs().max().item()
        assert changed < 1e-9, f"changing position {j} changed earlier outputs (by {changed:g}): not causal"


def brute_force(module: PatternAttention, x: torch.Tensor) -> torch.Tensor:
    """Attention of a pattern module computed one query at a time over its allowed keys."""
    spec = module.spec
    b, n, _ = x.shape
    h, d = spec.heads, spec.dim_head
    q, k, v = module.to_qkv(x).view(b, n, 3, h, d).permute(2, 0, 3, 1, 4)
    out = torch.zeros(b, h, n, d, dtype=x.dtype)
    for i in range(n):
        allowed = [j for j in range(i + 1) if bool(module.mask[i, j])]
        scores = q[:, :, i : i + 1] @ k[:, :, allowed].transpose(-1, -2) / d**0.5
        out[:, :, i] = (scores.softmax(-1) @ v[:, :, allowed])[:, :, 0]
    return module.to_out(out.transpose(1, 2).reshape(b, n, h * d))


def check_pattern(module, reference: Callable | None = None) -> None:
    if not isinstance(module, PatternAttention):
        return
    spec = module.spec
    if reference is not None:
        for i in range(spec.max_len):
            for j in range(spec.max_len):
                want = bool(reference(i, j, spec.text_len, spec.fmap_size))
                assert bool(module.mask[i, j]) == want, (
                    f"mask[{i}, {j}] is {bool(module.mask[i, j])}, the reference says {want}")
    x = _inputs(module.spec, batch=1)
    diff = (module(x) - brute_force(module, x)).abs().max().item()
    assert diff < 1e-9, f"output differs from brute-force masked attention by {diff:g}"


def check_cache(module, chunks=None) -> None:
    if not getattr(module, "supports_cache", False):
        return
    spec = module.spec
    x = _inputs(spec)
    n = x.shape[1]
    full = module(x)
    # the prefix in one call, then single positions, then a chunk of 3, then the rest
    chunks = chunks or [spec.text_len] + [1] * 4 + [3]
    bounds, start = [], 0
    for c in chunks:
        if start + c >= n:
            break
        bounds.append((start, start + c))
        start += c
    bounds += [(i, i + 1) for i in range(start, n)]
    cache: dict = {}
    for a, b in bounds:
        out = module(x[:, a:b], offset=a, cache=cache)
        diff = (out - full[:, a:b]).abs().max().item()
        assert diff < 1e-9, f"cached output for positions {a}..{b - 1} differs from uncached by {diff:g}"


def check_gradients(module) -> None:
    module.train()
    x = _inputs(module.spec).requires_grad_(True)
    module(x).square().sum().backward()
    module.eval()
    assert x.grad is not None and x.grad.abs().sum() > 0, "no gradient reaches the input"
    for name, p in module.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, (
                f"parameter {name} gets no (finite) gradient")
        p.grad = None


def check_attention(attention, config=None, *, reference: Callable | None = None,
                    specs: list[AttentionSpec] | None = None, registry=None) -> None:
    """Run every check on ``attention`` (a registered name, a factory, a pattern, or an
    AttentionModule subclass) for a few small geometries."""
    for spec in specs or [make_spec(), make_spec(text_len=3, fmap_size=5, heads=1, dim_head=16)]:
        module = build_for_test(attention, config, spec, registry)
        check_shapes(module)
        check_causal(module)
        check_pattern(module, reference)
        check_cache(module)
        check_gradients(module)
