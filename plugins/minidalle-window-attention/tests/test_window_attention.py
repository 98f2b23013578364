"""Tests for the window attention plugin: the pattern, the conformance kit, a model."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import minidalle_window_attention
from minidalle.api import AttentionSpec, ConfigError, config_from_dict, load_registry, pattern_mask
from minidalle.model import build_model
from minidalle_window_attention.attention import WindowConfig, WindowPattern, build

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture
def registry():
    """Built-ins plus this plugin, whether or not it is pip-installed."""
    return load_registry(autoload="none", extra_plugins=(minidalle_window_attention,))


def spec(text_len=3, fmap_size=4):
    return AttentionSpec(dim=16, heads=2, dim_head=8, dropout=0.0, text_len=text_len,
                         fmap_size=fmap_size)


def reference(size):
    """The definition, one (query i, key j) pair at a time."""

    def allowed(i, j, text_len, fmap_size):
        if j > i:
            return False
        if i < text_len or j < text_len:
            return True  # text sees earlier text; image sees all text
        return (i - text_len) - (j - text_len) < size

    return allowed


@pytest.mark.parametrize("size", [1, 3, 4, 7, 100])
def test_mask_matches_brute_force(size):
    text_len, fmap = 3, 4
    mask = pattern_mask(build(WindowConfig(size=size), spec=spec(text_len, fmap)), text_len, fmap)
    n = text_len + fmap * fmap
    want = reference(size)
    for i in range(n):
        for j in range(n):
            assert bool(mask[i, j]) == want(i, j, text_len, fmap), (size, i, j)


def test_window_covering_the_image_is_full_causal():
    from minidalle.api import causal_mask

    assert torch.equal(WindowPattern(16).mask(3, 4), causal_mask(3, 4))
    assert not torch.equal(WindowPattern(15).mask(3, 4), causal_mask(3, 4))


def test_config_is_validated_with_its_own_class(registry):
    component = registry.get("attention", "window")
    assert component.make_config({"size": 5}).size == 5
    with pytest.raises(ConfigError, match=r"attention.window.size: expected a positive number"):
        component.make_config({"size": 0}, where="attention.window")
    with pytest.raises(ConfigError, match="attention.window.width: unknown key"):
        component.make_config({"width": 5}, where="attention.window")
    with pytest.raises(ConfigError, match="size: expected an integer"):
        component.make_config({"size": "big"}, where="attention.window")


@pytest.mark.parametrize("size", [1, 3])
def test_conformance_kit(registry, size):
    """minidalle's attention checks: shapes, causality, mask and output vs brute force,
    cache vs no cache, gradients."""
    from minidalle.testing.attention import check_attention

    check_attention("window", {"size": size}, reference=reference(size), registry=registry)


def tiny_model(registry, attn_types=("window", "full"), size=3):
    cfg = config_from_dict({
        "model": {"dim": 32, "depth": 2, "heads": 2, "dim_head": 16, "text_seq_len": 6,
                  "attn_types": list(attn_types)},
        "attention": {"window": {"size": size}},
    }, registry=registry)
    torch.manual_seed(0)
    return build_model(cfg, text_vocab=20, num_image_tokens=12, fmap_size=3, registry=registry)


def test_trains_in_a_model(registry):
    model = tiny_model(registry)
    assert "WindowPattern" in repr(model)
    text = torch.randint(1, 20, (2, 6))
    codes = torch.randint(0, 12, (2, 9))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(text, codes, return_loss=True)
        opt.zero_grad()
        loss.backward()
        window_layer = model.transformer.layers[0].attn
        assert window_layer.to_qkv.weight.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_window_changes_what_an_image_token_sees(registry):
    """The last image token's output must not depend on image tokens outside its window."""
    model = tiny_model(registry, attn_types=("window",), size=2).eval()
    text = torch.randint(1, 20, (1, 6))
    codes = torch.randint(0, 12, (1, 9))
    other = codes.clone()
    other[0, 0] = (other[0, 0] + 1) % 12  # far outside a window of 2 for the last inputs
    with torch.no_grad():
        a, b = model(text, codes), model(text, other)
    # Two window layers of size 2: position p sees p-1 directly and p-2 through the layer
    # below, so outputs from text_len + 3 on never see image input 0 (at text_len).
    text_len = 7
    assert torch.equal(a[:, text_len + 3 :], b[:, text_len + 3 :])
    assert not torch.allclose(a[:, text_len + 2], b[:, text_len + 2])
    assert not torch.allclose(a[:, text_len], b[:, text_len])


def test_cached_sampling_matches_uncached(registry):
    model = tiny_model(registry).eval()
    assert model.supports_cache
    text = torch.randint(1, 20, (2, 6))
    codes = torch.randint(0, 12, (2, 9))
    seq = torch.cat([model.prepare_text(text), codes], dim=1)[:, :-1]
    with torch.no_grad():
        full = model.logits(model.hidden(seq))
        cache = model.new_cache()
        steps = [model.logits(model.hidden(seq[:, :7], cache=cache), 0)]
        for pos in range(7, seq.shape[1]):
            steps.append(model.logits(model.hidden(seq[:, pos : pos + 1], cache=cache), pos))
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)


def test_sampling_with_and_without_cache_agree(registry):
    """minidalle's sampler: the same seed gives the same codes and per-step logits with
    the key/value cache as with full recomputation."""
    from minidalle.inference.sampling import generate_image_codes

    model = tiny_model(registry)
    text = torch.randint(1, 20, (2, 6))
    runs = {}
    for use_cache in (True, False):
        logits = []
        codes = generate_image_codes(model, text, seed=3, use_cache=use_cache,
                                     on_logits=lambda step, lg: logits.append(lg.clone()))
        runs[use_cache] = (codes, torch.stack(logits))
    assert runs[True][0].shape == (2, 9)
    assert torch.equal(runs[True][0], runs[False][0])
    assert torch.allclose(runs[True][1], runs[False][1], atol=1e-5)


def test_listed_by_minidalle_when_installed():
    from importlib.metadata import PackageNotFoundError, version

    try:
        version("minidalle-window-attention")
    except PackageNotFoundError:
        pytest.skip("needs minidalle-window-attention installed (make venv)")
    env = dict(os.environ, MINIDALLE_PLUGINS="minidalle-window-attention")
    proc = subprocess.run([sys.executable, "-m", "minidalle", "list", "attention", "--json"],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    rows = {c["name"]: c for c in json.loads(proc.stdout)["components"]}
    assert (rows["window"]["provider"], rows["window"]["version"]) == (
        "minidalle-window-attention", minidalle_window_attention.__version__)


def test_config_in_configs_resolves():
    config = REPO / "configs" / "window_attention.toml"
    if not config.exists():
        pytest.skip("needs configs/window_attention.toml (minidalle checkout)")
    from importlib.metadata import PackageNotFoundError, version

    try:
        version("minidalle-window-attention")
    except PackageNotFoundError:
        pytest.skip("needs minidalle-window-attention installed (make venv)")
    proc = subprocess.run([sys.executable, "-m", "minidalle", "config", "show", str(config)],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert '"window"' in proc.stdout and "[attention.window]" in proc.stdout
