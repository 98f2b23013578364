"""The lean decoding step equals the module forward with a cache."""
import pytest
import torch

from minidalle.config import Config, ModelConfig
from minidalle.plugin.discovery import get_registry
from minidalle.inference.decode import LeanDecoder
from minidalle.model import build_model
from minidalle.model.attention_api import QKVAttention

pytestmark = pytest.mark.cpu_paths  # `make test` reruns it with MINIDALLE_CPU forced down

TEXT_VOCAB, TEXT_LEN, IMG_TOKENS, FMAP = 12, 5, 7, 3


def tiny(attn_types, *, sandwich_norm=False, registry=None, heads=2, dim_head=8, ff_mult=4):
    cfg = Config(registry=get_registry(), model=ModelConfig(dim=32, depth=len(attn_types), heads=heads,
                                   dim_head=dim_head, ff_mult=ff_mult, text_seq_len=TEXT_LEN,
                                   attn_types=list(attn_types), sandwich_norm=sandwich_norm))
    torch.manual_seed(0)
    m = build_model(cfg, text_vocab=TEXT_VOCAB, num_image_tokens=IMG_TOKENS, fmap_size=FMAP,
                    registry=registry)
    with torch.no_grad():  # LayerScale and norms away from their init, so folding shows
        for p in m.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.5)
    return m.eval()


# <bos>, 5 text ids (padding at text position p is id 12 + p), 8 image codes
SEQ = torch.tensor([[0, 3, 5, 7, 15, 16, 1, 2, 3, 4, 5, 6, 0, 1],
                    [0, 1, 2, 14, 15, 16, 6, 5, 4, 3, 2, 1, 0, 6]])


def steps(model, lean: bool, prompt: int = 3):
    """Hidden states and image logits of one-position steps (text and image positions)
    after a ``prompt`` prefix."""
    cache = model.new_cache()
    decoder = LeanDecoder(model) if lean else None
    out = []
    with torch.no_grad():
        model.hidden(SEQ[:, :prompt], cache=cache)
        for i in range(prompt, SEQ.shape[1]):
            tok = SEQ[:, i : i + 1]
            h = decoder.hidden(tok, cache) if lean else model.hidden(tok, cache=cache)
            logits = decoder.image_logits(h) if lean else model.image_logits(h)
            out.append((h.float(), logits.float()))
    return out


@pytest.mark.parametrize("sandwich_norm", [False, True])
@pytest.mark.parametrize("attn", ["full", "axial_row", "axial_col", "conv_like"])
def test_lean_step_equals_module_step(attn, sandwich_norm):
    m = tiny([attn, "full", attn], sandwich_norm=sandwich_norm)
    assert LeanDecoder.supports(m)
    for (h1, l1), (h2, l2) in zip(steps(m, False), steps(m, True)):
        torch.testing.assert_close(h2, h1, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(l2, l1, atol=1e-5, rtol=1e-5)


def test_lean_step_bf16_close_to_module_step():
    m = tiny(["axial_row", "full"]).to(torch.bfloat16)
    for (_, l1), (_, l2) in zip(steps(m, False), steps(m, True)):
        diff = (l1.softmax(-1) - l2.softmax(-1)).abs().max()
        assert diff < 0.01, diff


@pytest.mark.parametrize("rows", [2, 9])
def test_bf16_prompt_through_prepacked_products(rows):
    """A bf16 model's prompt through the decoder's prepacked products (LeanDecoder.prompt)
    gives the module's hidden states and keys and values, kept in bf16 where the kernel's
    stack takes the next steps (at most 8 rows) and in fp32 otherwise, and the next step
    from that cache gives the step from the module's cache."""
    m = tiny(["axial_row", "full", "axial_col"]).to(torch.bfloat16)
    decoder = LeanDecoder(m)
    if not decoder.prompts():
        pytest.skip("oneDNN's prepacked bf16 products do not run on this CPU path (the probe)")
    seq = SEQ.repeat(5, 1)[:rows]
    ref, cache = m.new_cache(), m.new_cache()
    with torch.no_grad():
        h1 = m.hidden(seq[:, :8], cache=ref)
        h2 = decoder.prompt(seq[:, :8], cache)
        assert cache.offset == ref.offset == 8
        torch.testing.assert_close(h2.float(), h1.float(), atol=2e-2, rtol=2e-2)
        stacked = decoder.weights.stack is not None and rows <= 8
        for a, b in zip(ref.layers, cache.layers):
            assert b["k"].dtype == (torch.bfloat16 if stacked else torch.float32)
            for key in ("k", "v"):
                torch.testing.assert_close(b[key][:, :, :8].float(), a[key][:, :, :8], atol=2e-2, rtol=2e-2)
        s1, s2 = decoder.hidden(seq[:, 8:9], ref), decoder.hidden(seq[:, 8:9], cache)
        torch.testing.assert_close(s2.float(), s1.float(), atol=3e-2, rtol=3e-2)


def test_weights_follow_parameter_changes():
    m = tiny(["full"])
    before = steps(m, True)[-1][1]
    with torch.no_grad():
        m.transformer.layers[0].scale_ff.mul_(3.0)  # in place, as an optimizer step
    after = steps(m, True)[-1][1]
    torch.testing.assert_close(after, steps(m, False)[-1][1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(after, before)
    m.to(torch.bfloat16)  # the same Parameters with new data
    assert LeanDecoder(m).weights.layers[0].ff_in.bias.dtype == torch.bfloat16
    diff = (steps(m, True)[-1][1].softmax(-1) - steps(m, False)[-1][1].softmax(-1)).abs().max()
    assert diff < 0.01, diff


class _OwnForward(QKVAttention):
    """A cache-capable module attention with its own forward: not for the lean step."""

    def attend(self, q, k, v, offset):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=offset == 0)

    def forward(self, x, *, offset=0, cache=None):
        return super().forward(x, offset=offset, cache=cache)


def test_only_standard_blocks_take_the_lean_step():
    from minidalle import hookimpl
    from minidalle.plugin.discovery import load_registry
    from minidalle.inference.sampling import _Decoder

    class Plugin:
        @staticmethod
        @hookimpl
        def minidalle_attention(register):
            register("own_forward", lambda spec: _OwnForward(spec), summary="test")

    m = tiny(["full", "own_forward"], registry=load_registry(autoload="none", extra_plugins=[Plugin]))
    assert not LeanDecoder.supports(m)
    assert _Decoder(m, use_cache=True).lean is None
    with pytest.raises(ValueError, match="non-standard"):
        LeanDecoder(m)
    assert _Decoder(tiny(["full"]), use_cache=True).lean is not None


def _lean_steps(model, weight_store, prompt=3):
    cache, decoder, out = model.new_cache(), LeanDecoder(model, weight_store), []
    with torch.no_grad():
        model.hidden(SEQ[:, :prompt], cache=cache)
        for i in range(prompt, SEQ.shape[1]):
            out.append(decoder.image_logits(decoder.hidden(SEQ[:, i : i + 1], cache)))
    return out


@pytest.mark.parametrize("sandwich_norm", [False, True])
def test_bf16_weights_close_to_fp32_module_step(sandwich_norm):
    """weight_store="bf16": the model stays fp32, the step's matrices are rounded to bf16."""
    m = tiny(["axial_row", "full"], sandwich_norm=sandwich_norm)
    ref = [lg for _, lg in steps(m, False)]
    got = _lean_steps(m, "bf16")
    assert all(lg.dtype == torch.float32 for lg in got)
    worst = max((a.softmax(-1) - b.softmax(-1)).abs().max() for a, b in zip(ref, got))
    assert 0 < worst < 0.01, worst  # the rounding shows, and stays small
    bf16, fp32 = LeanDecoder(m, "bf16").weights, LeanDecoder(m).weights
    linears = [lin for layer in bf16.layers for lin in layer.linears] + [bf16.image_head]
    # 2 bytes a weight where the kernel reads the bf16 copy (7 image rows: not a kernel shape)
    assert bf16.bytes_read() == sum(lin.shape[0] * lin.shape[1] * (2 if lin.stored() else 4)
                                    for lin in linears)
    assert fp32.bytes_read() == 4 * sum(lin.shape[0] * lin.shape[1] for lin in linears)
    assert LeanDecoder(m).weights is fp32 and LeanDecoder(m, "bf16").weights is not fp32


def test_bf16_weights_same_results_with_and_without_the_kernel(monkeypatch):
    """Every path (kernel, oneDNN, F.linear) multiplies the same rounded weights in fp32."""
    import weakref

    from minidalle.inference import decode, gemv

    m = tiny(["axial_col", "full"])
    with_kernel = _lean_steps(m, "bf16")
    monkeypatch.setattr(gemv, "pack", lambda *a, **k: None)
    monkeypatch.setattr(decode, "_built", weakref.WeakKeyDictionary())  # weights built anew
    without = _lean_steps(m, "bf16")
    assert all(lin.packed is None for lin in LeanDecoder(m, "bf16").weights.layers[0].linears)
    for a, b in zip(with_kernel, without):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_generation_precision(monkeypatch, capsys):
    from minidalle import hardware
    from minidalle.inference import decode, gemv

    said = []
    assert [decode.generation_precision(p, log=said.append) for p in ("fp32", "bf16", "bf16-weights")] \
        == ["fp32", "bf16", "bf16-weights"]
    kernel = gemv.pack(torch.zeros(16, 16), store="bf16") is not None
    assert len(said) == (0 if kernel else 1) and all("bf16-weights without the gemv kernel" in m for m in said)
    with pytest.raises(ValueError, match="precision"):
        decode.generation_precision("fp16")
    said = []
    monkeypatch.setattr(hardware, "bf16_verdict", lambda: (False, "slow bf16"))
    choice = decode.generation_precision("auto", log=said.append)
    assert choice == ("bf16-weights" if kernel else "fp32")
    assert len(said) == 1 and said[0].startswith(f"generate: precision auto -> {choice}: slow bf16")
    decode.generation_precision("auto", log=said.append)
    assert len(said) == 1  # said once
    monkeypatch.setattr(gemv, "pack", lambda *a, **k: None)
    assert decode.generation_precision("auto", log=said.append) == "fp32"
    monkeypatch.setattr(hardware, "bf16_verdict", lambda: (True, "fast bf16"))
    assert decode.generation_precision("auto", log=said.append) == "bf16"
    assert said[-1] == "generate: precision auto -> bf16: fast bf16"
    assert capsys.readouterr().err == ""


def _fused_or_skip():
    from minidalle.inference import gemv

    if gemv.attention_step() is None:
        pytest.skip(f"the gemv kernel's attention step is not used here: {gemv.status()}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("attn", ["full", "axial_row", "axial_col", "conv_like"])
def test_fused_attention_step_equals_the_attend_path(attn, dtype):
    """The kernel's attention step (key/value written into the cache, softmax over the
    pattern's key slices) gives the layer's own attend() results, at every position."""
    _fused_or_skip()
    m = tiny([attn, "full"]).to(dtype)
    decoder = LeanDecoder(m)
    assert all(s is not None for s in decoder.step_slices)
    fused = steps(m, True)
    original = LeanDecoder.__init__

    def unfused(self, *a, **k):
        original(self, *a, **k)
        self.step_slices = [None] * len(self.step_slices)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(LeanDecoder, "__init__", unfused)
        plain = steps(m, True)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for (h1, l1), (h2, l2) in zip(plain, fused):
        torch.testing.assert_close(h2, h1, atol=tol, rtol=tol)
        torch.testing.assert_close(l2, l1, atol=tol, rtol=tol)


def test_fused_attention_step_odd_head_size_and_bad_slices():
    """A head size that is not a multiple of 8 (the vector loop's tail), and a key slice past
    the position is refused with an error, not read."""
    _fused_or_skip()
    from minidalle.inference import gemv

    torch.manual_seed(0)
    b, h, length, d, offset = 2, 3, 10, 12, 6
    keys, values = torch.randn(b, h, length, d), torch.randn(b, h, length, d)
    qkv = torch.randn(b, 3 * h * d)
    out = gemv.attention_step()(qkv, k_cache := keys.clone(), v_cache := values.clone(), offset,
                                [0, 3, 1, 4, offset + 1, 2])  # positions 0, 1, 2, 4, 6
    q, k, v = qkv.view(b, 3, h, 1, d).unbind(1)
    keys[:, :, offset], values[:, :, offset] = k[:, :, 0], v[:, :, 0]
    torch.testing.assert_close(k_cache, keys)
    idx = torch.tensor([0, 1, 2, 4, 6])
    want = torch.nn.functional.scaled_dot_product_attention(q, keys[:, :, idx], values[:, :, idx])
    torch.testing.assert_close(out, want.view(b, h * d), atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="past the position"):
        gemv.attention_step()(qkv, k_cache, v_cache, offset, [0, offset + 2, 1])


def test_attention_that_overrides_attend_keeps_its_own_step():
    """A plugin's attention subclass with its own attend() is never replaced by the kernel's
    step; the built-in axial attention (attend only for whole sequences) is."""
    from minidalle.components.attention import AxialAttention
    from minidalle.model.attention_api import PatternAttention

    m = tiny(["axial_row", "full"])

    class Custom(PatternAttention):
        def attend(self, q, k, v, offset):
            return super().attend(q, k, v, offset) * 1.0

    class CustomAxial(AxialAttention):
        def attend(self, q, k, v, offset):
            return super().attend(q, k, v, offset)

    attn = m.transformer.layers[0].attn
    assert attn.steps_attend_key_slices() and m.transformer.layers[1].attn.steps_attend_key_slices()
    assert not Custom(attn.spec, attn.pattern).steps_attend_key_slices()
    assert not CustomAxial(attn.spec, 0).steps_attend_key_slices()
    m.transformer.layers[0].attn = Custom(attn.spec, attn.pattern)
    assert LeanDecoder(m).step_slices[0] is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_geglu_matches_pytorch(dtype):
    """The block step's GEGLU (a vectorised erf) against PyTorch's exact GELU, over the
    range where GELU is tiny (large negative gates), near zero and large, with a row length
    that leaves a tail after the 8-wide loop."""
    _fused_or_skip()
    from minidalle.inference import gemv
    from minidalle.model.transformer import geglu

    gates = torch.cat([torch.linspace(-12, 12, 4001), torch.randn(1000) * 3])
    h = torch.stack([torch.cat([torch.randn(gates.numel()), gates])]).to(dtype)
    want = geglu(h.float())
    got = gemv.kernel().geglu(h).float()
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    else:  # one rounding against PyTorch's two: within a bf16 step
        torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("rows", [1, 3, 6])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "bf16-weights"])
def test_stack_step_equals_the_per_layer_step(precision, rows):
    """The kernel's whole-stack step (one parallel region a position) gives the per-layer
    step's hidden states and logits, for 1-8 rows, in each precision and on every CPU path
    (under MINIDALLE_CPU=avx2 a bf16 model takes the fp32-arithmetic products, its
    activations widened)."""
    _fused_or_skip()
    m = tiny(["axial_row", "full", "axial_col"])
    if precision == "bf16":
        m = m.to(torch.bfloat16)
    store = "bf16" if precision == "bf16-weights" else None
    seq = SEQ.repeat(3, 1)[:rows]
    decoder = LeanDecoder(m, store)
    tol = 2e-2 if precision == "bf16" else 1e-5
    for (h1, l1), (h2, l2) in zip(_decoded(m, decoder, seq, False), _decoded(m, decoder, seq, True)):
        torch.testing.assert_close(h2, h1, atol=tol, rtol=tol)
        torch.testing.assert_close(l2, l1, atol=tol, rtol=tol)


def _decoded(m, decoder, seq, use_stack):
    """(hidden states, image logits) of the positions of ``seq`` after its first 3, by the
    decoder's stack or (``use_stack`` False) its per-layer step."""
    cache, out, stack = m.new_cache(), [], decoder.weights.stack
    assert stack is not None
    if not use_stack:
        decoder.weights.stack = None
    try:
        with torch.no_grad():
            m.hidden(seq[:, :3], cache=cache)
            for i in range(3, seq.shape[1]):
                h = decoder.hidden(seq[:, i : i + 1], cache)
                out.append((h.float(), decoder.image_logits(h).float()))
    finally:
        decoder.weights.stack = stack
    return out


def _stack_against_per_layer(m, rows_seq=(1, 3, 1)):
    """The stack's hidden states for a few positions, in turn for the row counts of
    ``rows_seq`` on one decoder (its buffers rebuilt when the rows change), against the
    per-layer step's."""
    decoder = LeanDecoder(m)
    tol = 2e-2 if m.text_emb.weight.dtype == torch.bfloat16 else 1e-5
    for rows in rows_seq:
        seq = SEQ.repeat(3, 1)[:rows]
        for (h1, l1), (h2, l2) in zip(_decoded(m, decoder, seq, False), _decoded(m, decoder, seq, True)):
            torch.testing.assert_close(h2, h1, atol=tol, rtol=tol)
            torch.testing.assert_close(l2, l1, atol=tol, rtol=tol)
    return decoder


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("heads, dim_head, ff_mult", [(3, 64, 4), (2, 8, 3)])
def test_stack_shares_for_any_thread_count_and_layout(heads, dim_head, ff_mult, threads, dtype):
    """Each thread's share of a block (its heads, its GEGLU columns, its parts of out and
    ff_out) gives the per-layer step's result for 1-3 shares, where the q/k/v and ff_in
    units fall on head and column boundaries (dim_head 64; one barrier less each) and where
    they do not (dim_head 8, a GEGLU width of 96; with 3 shares of 2 heads one has none)."""
    _fused_or_skip()
    m = tiny(["axial_row", "full"], heads=heads, dim_head=dim_head, ff_mult=ff_mult).to(dtype)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        decoder = _stack_against_per_layer(m)
        heads, columns = decoder.weights.stack.shares(32 * ff_mult)
        assert len(heads) == len(columns) == threads
        assert [len(p) for p in (decoder.weights.layers[0].out.parts, decoder.weights.layers[0].ff_out.parts)] == [threads] * 2
    finally:
        torch.set_num_threads(before)
    # other thread counts: the weights are split anew
    assert LeanDecoder(m).weights.threads == before


def test_stack_step_in_a_smaller_team():
    """With fewer threads than shares (asked for here; or a region nested in another), each
    thread runs several shares one after another between the barriers: the same result."""
    _fused_or_skip()
    m = tiny(["axial_row", "full"], heads=3, dim_head=64)
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        LeanDecoder(m).weights.stack.set_threads(1)
        _stack_against_per_layer(m)
        LeanDecoder(m).weights.stack.set_threads(2)
        _stack_against_per_layer(m)
    finally:
        torch.set_num_threads(before)


def test_stack_step_checks_its_inputs():
    _fused_or_skip()
    m = tiny(["full", "axial_row"])
    stack = LeanDecoder(m).weights.stack
    cache = m.new_cache()
    with torch.no_grad():
        m.hidden(SEQ[:, :3], cache=cache)
    ks, vs = [c["k"] for c in cache.layers], [c["v"] for c in cache.layers]
    x = torch.randn(2, 32)
    assert stack.step(x, ks, vs, 3).shape == (2, 32)
    with pytest.raises(RuntimeError, match="one key and one value cache a layer"):
        stack.step(x, ks[:1], vs, 3)
    with pytest.raises(RuntimeError, match="bad input"):
        stack.step(torch.randn(2, 31), ks, vs, 3)
    with pytest.raises(RuntimeError, match="bad cache or position"):
        stack.step(x, ks, vs, ks[0].shape[2])
    with pytest.raises(RuntimeError, match="bad input"):
        stack.step(x.bfloat16(), ks, vs, 3)
