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


def tiny(attn_types, *, sandwich_norm=False, registry=None):
    cfg = Config(registry=get_registry(), model=ModelConfig(dim=32, depth=len(attn_types), heads=2, dim_head=8,
                                   text_seq_len=TEXT_LEN, attn_types=list(attn_types),
                                   sandwich_norm=sandwich_norm))
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
