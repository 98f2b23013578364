"""Cached sampling: logits equal uncached forward passes, seeds, priming, filters, texts."""
import pytest
import torch

from minidalle.config import Config, ModelConfig
from minidalle.plugin.discovery import get_registry
from minidalle.model import build_model
from minidalle.model.attention_api import AttentionModule
from minidalle.inference.sampling import (
    generate_image_codes,
    generate_text_ids,
    draw_categorical,
    sample_logits,
    top_k_filter,
    top_p_filter,
)

pytestmark = pytest.mark.cpu_paths  # `make test` reruns it with MINIDALLE_CPU forced down

TEXT_VOCAB, TEXT_LEN, IMG_TOKENS, FMAP = 12, 5, 7, 3


def tiny(attn_types, dtype=torch.float32, registry=None, image_tokens=IMG_TOKENS, **attention):
    cfg = Config(registry=get_registry(), model=ModelConfig(dim=32, depth=len(attn_types), heads=2, dim_head=8,
                                   text_seq_len=TEXT_LEN, attn_types=list(attn_types)),
                 attention=attention)
    torch.manual_seed(0)
    m = build_model(cfg, text_vocab=TEXT_VOCAB, num_image_tokens=image_tokens, fmap_size=FMAP,
                    registry=registry)
    for layer in m.transformer.layers:  # LayerScale 0.1 hides mistakes: make layers count
        layer.scale_attn.data.fill_(1.0)
        layer.scale_ff.data.fill_(1.0)
    return m.to(dtype).eval()


TEXT = torch.tensor([[3, 5, 7, 0, 0], [1, 2, 0, 0, 0]])


@pytest.mark.parametrize("attn", ["full", "axial_row", "axial_col", "conv_like"])
def test_cached_logits_equal_uncached_forward(attn):
    m = tiny([attn, "full", attn])
    steps = {}
    codes = generate_image_codes(m, TEXT, seed=1, on_logits=lambda s, lg: steps.__setitem__(s, lg))
    assert codes.shape == (2, FMAP * FMAP) and sorted(steps) == list(range(FMAP * FMAP))
    ntext = TEXT_VOCAB + TEXT_LEN
    with torch.no_grad():
        for step, cached in steps.items():
            full = m(TEXT, codes[:, :step])[:, -1, ntext:]  # plain forward over the prefix
            torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)


def test_cached_and_uncached_sample_the_same():
    m = tiny(["axial_row", "conv_like"], dtype=torch.float64)
    a = generate_image_codes(m, TEXT, seed=3, use_cache=True)
    b = generate_image_codes(m, TEXT, seed=3, use_cache=False)
    assert torch.equal(a, b)


def test_same_seed_same_images():
    m = tiny(["axial_col"])
    a = generate_image_codes(m, TEXT, seed=7, filter_thres=0.0)
    b = generate_image_codes(m, TEXT, seed=7, filter_thres=0.0)
    c = generate_image_codes(m, TEXT, seed=8, filter_thres=0.0)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_priming_keeps_the_first_codes():
    m = tiny(["full"])
    prime = torch.tensor([[6, 5, 4, 3], [0, 1, 2, 3]])
    codes = generate_image_codes(m, TEXT, seed=0, prime_codes=prime)
    assert codes.shape == (2, FMAP * FMAP) and torch.equal(codes[:, :4], prime)


def test_top_k_and_top_p():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0, -2.0, -3.0]])
    kept = torch.isfinite(top_k_filter(logits, 0.5))
    assert kept.tolist() == [[True] * 4 + [False] * 4]
    assert torch.isfinite(top_k_filter(logits, 0.99)).sum() == 1  # at least one
    probs = logits.softmax(-1)  # 0.64, 0.23, 0.09, ...
    kept = torch.isfinite(top_p_filter(logits, 0.8))
    assert kept.tolist() == [[True, True, False, False, False, False, False, False]]
    assert probs[0, :1].sum() < 0.8 <= probs[0, :2].sum()
    # top-p alone (no top-k): only the two likely ids come out
    g = torch.Generator().manual_seed(0)
    out = {sample_logits(logits, filter_thres=0, top_p=0.8, generator=g).item() for _ in range(200)}
    assert out == {0, 1}
    # a near-zero temperature is greedy
    assert sample_logits(logits.repeat(5, 1), temperature=1e-4, generator=g).tolist() == [0] * 5


def test_draw_categorical_follows_the_probabilities():
    g = torch.Generator().manual_seed(0)
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2, 0.0]]).repeat(20000, 1)
    ids = draw_categorical(probs, g)
    counts = torch.bincount(ids, minlength=6).double() / len(ids)
    assert counts[[0, 2, 5]].sum() == 0  # zero probability: never drawn
    assert torch.allclose(counts, probs[0].double(), atol=0.015)
    # one id with all the mass, at either end, and rows that sum to slightly more or less than 1
    edge = torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 1.0], [0, 0.5, 0.5 + 1e-6, 0], [0.3, 0.3, 0.3, 0]])
    for _ in range(50):
        out = draw_categorical(edge, g).tolist()
        assert out[0] == 0 and out[1] == 3 and out[2] in (1, 2) and out[3] in (0, 1, 2)


def test_generate_text_ids_cached_equals_uncached():
    m = tiny(["full", "axial_row"], dtype=torch.float64)
    prefix = torch.tensor([[3, 5], [1, 2]])
    a = generate_text_ids(m, prefix, seed=4, filter_thres=0.0)
    b = generate_text_ids(m, prefix, seed=4, filter_thres=0.0, use_cache=False)
    assert torch.equal(a, b) and a.shape == (2, TEXT_LEN)
    assert torch.equal(a[:, :2], prefix)
    assert (a < TEXT_VOCAB).all()  # padding ids come back as 0
    # once a caption pads, the rest is padding
    for row in a.tolist():
        if 0 in row:
            assert all(t == 0 for t in row[row.index(0):])


class _NoCacheAttention(AttentionModule):
    supports_cache = False

    def __init__(self, spec):
        super().__init__(spec)
        self.proj = torch.nn.Linear(spec.dim, spec.dim)

    def forward(self, x, *, offset=0, cache=None):
        assert cache is None
        return self.proj(x).cumsum(1) / torch.arange(1, x.shape[1] + 1)[:, None]


class _Plugin:
    from minidalle import hookimpl

    @staticmethod
    @hookimpl
    def minidalle_attention(register):
        register("running_mean", lambda spec: _NoCacheAttention(spec), summary="test")


def test_module_without_cache_falls_back_with_a_warning():
    from minidalle.plugin.discovery import load_registry

    registry = load_registry(autoload="none", extra_plugins=[_Plugin])
    m = tiny(["full", "running_mean"], registry=registry, dtype=torch.float64)
    with pytest.warns(UserWarning, match="does not support the key/value cache"):
        a = generate_image_codes(m, TEXT, seed=2)
    b = generate_image_codes(m, TEXT, seed=2, use_cache=False)
    assert torch.equal(a, b)


def test_bf16_logits_close_to_fp32():
    m = tiny(["axial_row", "full"])
    mb = tiny(["axial_row", "full"], dtype=torch.bfloat16)
    codes = torch.tensor([[1, 2, 3], [4, 5, 6]])
    with torch.no_grad():
        a = m(TEXT, codes)[:, -1, TEXT_VOCAB + TEXT_LEN:].softmax(-1)
        b = mb(TEXT, codes)[:, -1, TEXT_VOCAB + TEXT_LEN:].float().softmax(-1)
    assert (a - b).abs().max() < 0.02


def test_bf16_cached_step_close_to_fp32():
    """bf16 weights (attention and cache kept in fp32 on CPU) stay close to fp32."""
    m = tiny(["axial_col", "full"])
    mb = tiny(["axial_col", "full"], dtype=torch.bfloat16)
    prime = torch.tensor([[1, 2, 3, 4, 5, 6], [0, 6, 5, 4, 3, 2]])
    got = {}
    for name, model in (("fp32", m), ("bf16", mb)):
        generate_image_codes(model, TEXT, seed=0, prime_codes=prime,
                             on_logits=lambda s, lg, name=name: got.setdefault(name, {}).__setitem__(s, lg))
    for step in got["fp32"]:
        diff = (got["fp32"][step].softmax(-1) - got["bf16"][step].softmax(-1)).abs().max()
        assert diff < 0.02, (step, diff)


def test_generate_texts_with_a_tokenizer():
    from _tiny import TinyTokenizer

    from minidalle.inference.sampling import generate_texts

    cfg = Config(registry=get_registry(), model=ModelConfig(dim=32, depth=1, heads=2, dim_head=8, text_seq_len=8))
    torch.manual_seed(0)
    m = build_model(cfg, text_vocab=64, num_image_tokens=IMG_TOKENS, fmap_size=FMAP).eval()
    tok = TinyTokenizer()
    out = generate_texts(m, tok, ["ab", "xyz"], seed=0, filter_thres=0.0)
    prefixes = [tok.decode(tok.encode([p], 8)[0]) for p in ("ab", "xyz")]
    assert len(out) == 2 and out[0].startswith(prefixes[0]) and out[1].startswith(prefixes[1])
    assert len(out[0]) > 2 or len(out[1]) > 3  # something was generated
    assert all(len(t) <= 8 for t in out)
    assert out == generate_texts(m, tok, ["ab", "xyz"], seed=0, filter_thres=0.0)


def test_factorised_codes_cached_logits_equal_uncached_forward():
    cfg = Config(registry=get_registry(), model=ModelConfig(dim=32, depth=2, heads=2, dim_head=8, text_seq_len=TEXT_LEN,
                                   attn_types=["axial_row", "full"]))
    torch.manual_seed(0)
    m = build_model(cfg, text_vocab=TEXT_VOCAB, num_image_tokens=6, fmap_size=FMAP,
                    image_token_factors=(3, 2)).eval()
    steps = {}
    codes = generate_image_codes(m, TEXT, seed=1, on_logits=lambda s, lg: steps.__setitem__(s, lg))
    assert codes.shape == (2, FMAP * FMAP) and codes.max() < 6
    with torch.no_grad():
        for step, cached in steps.items():
            full = m(TEXT, codes[:, :step])[:, -1, TEXT_VOCAB + TEXT_LEN:]
            torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)


@pytest.mark.cpu_paths
@pytest.mark.parametrize("top_p", [None, 0.9, 0.3, 0.0])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("filter_thres", [0.0, 0.5, 0.9, 0.999])
def test_kernel_sampler_draws_as_the_pytorch_ops(filter_thres, temperature, top_p, monkeypatch):
    """The gemv kernel's fused draw (top-k, then the nucleus filter) takes the same uniform
    numbers and picks the same ids as the PyTorch ops (up to sums rounded in another order:
    none differ here), and never an id outside the top k, nor outside the nucleus."""
    from minidalle.inference import gemv

    if gemv.sampler() is None:
        pytest.skip(f"the gemv kernel is not used here: {gemv.status()}")
    torch.manual_seed(0)
    logits = torch.randn(64, 1000) * 3
    fused = sample_logits(logits, filter_thres=filter_thres, temperature=temperature, top_p=top_p,
                          generator=torch.Generator().manual_seed(5))
    monkeypatch.setattr(gemv, "sampler", lambda: None)
    plain = sample_logits(logits, filter_thres=filter_thres, temperature=temperature, top_p=top_p,
                          generator=torch.Generator().manual_seed(5))
    assert fused.dtype == torch.long and fused.shape == (64,)
    assert torch.equal(fused, plain)
    k = max(1, int((1 - filter_thres) * 1000)) if filter_thres > 0 else 1000
    rank = (logits > logits.gather(1, fused[:, None])).sum(1)  # 0 = the largest
    assert (rank < k).all()
    if top_p == 0.0:  # a nucleus of one: the largest logit
        assert (rank == 0).all()
    elif top_p is not None:  # the mass of the larger logits kept is below top_p
        kept = top_k_filter(logits / temperature, filter_thres).softmax(-1)
        before = (kept * (kept > kept.gather(1, fused[:, None]))).sum(1)
        assert (before < top_p + 1e-6).all()


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "bf16-weights"])
def test_kernel_generation_loop_draws_as_the_python_loop(precision, rows, monkeypatch):
    """Where the kernel's stack has the image head (32 image codes: a kernel shape), the
    whole sampling loop runs in it (LeanDecoder.generate, here 4 positions a call): the same codes
    as the Python loop (same logits, same uniform numbers), primed or not, guided or not, with
    top-p or not, and progress is called once a code."""
    from minidalle.inference import decode

    m = tiny(["axial_row", "full", "axial_col"], image_tokens=32)
    if precision == "bf16":
        m = m.to(torch.bfloat16)
    store = "bf16" if precision == "bf16-weights" else None
    weights = decode.LeanDecoder(m, store).weights
    if not weights.stack_head:
        pytest.skip("the gemv kernel's stack is not used here")
    text = torch.tensor([[3, 5, 7, 0, 0], [1, 2, 0, 0, 0], [4, 0, 0, 0, 0]])[:rows]
    prime = torch.tensor([[6, 5]]).expand(rows, -1)
    calls = {"kernel": 0}
    original = decode.LeanDecoder.generate

    def counted(self, *a, **k):  # 4 positions a call: several calls an image
        codes = original(self, *a, chunk=4, **k)
        calls["kernel"] += codes is not None  # the kernel's loop drew them
        return codes

    def draw(**kw):
        ticks = []
        codes = generate_image_codes(m, text, seed=9, weight_store=store, progress=ticks.append, **kw)
        return codes, len(ticks)

    monkeypatch.setattr(decode.LeanDecoder, "generate", counted)
    kinds = [dict(filter_thres=0.5), dict(filter_thres=0.0, temperature=0.8), dict(prime_codes=prime),
             dict(cond_scale=3.0), dict(cond_scale=0.5, prime_codes=prime), dict(top_p=0.8),
             dict(top_p=0.6, cond_scale=2.0, temperature=1.3)]
    fused = [draw(**kw) for kw in kinds]
    assert calls["kernel"] == len(kinds)
    monkeypatch.setattr(decode.LeanDecoder, "generate", lambda *a, **k: None)
    plain = [draw(**kw) for kw in kinds]
    for (a, na), (b, nb) in zip(fused, plain):
        assert torch.equal(a, b) and na == nb
    assert fused[0][1] == FMAP * FMAP and fused[2][1] == FMAP * FMAP - 2
    assert torch.equal(fused[2][0][:, :2], prime) and torch.equal(fused[4][0][:, :2], prime)
    assert fused[3][0].shape == (rows, FMAP * FMAP) and not torch.equal(fused[3][0], fused[0][0])
