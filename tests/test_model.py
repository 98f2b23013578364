"""The DALL-E network against the recipe: layout, init, logits mask and loss."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minidalle.errors import ConfigError
from minidalle.config import Config, ModelConfig
from minidalle.plugin.discovery import get_registry
from minidalle.model import DALLE, build_model

from _tiny import GreyCodec

TEXT_VOCAB, TEXT_LEN, IMG_TOKENS, FMAP = 10, 4, 6, 2


def tiny(attn_types=("full",), depth=2, **kw):
    cfg = Config(registry=get_registry(), model=ModelConfig(dim=16, depth=depth, heads=2, dim_head=8, text_seq_len=TEXT_LEN,
                                   attn_types=list(attn_types), **kw))
    torch.manual_seed(0)
    return build_model(cfg, text_vocab=TEXT_VOCAB, num_image_tokens=IMG_TOKENS, fmap_size=FMAP)


def test_layout_and_names():
    m = tiny(attn_types=["axial_row", "axial_col", "full"], depth=4)
    assert isinstance(m.text_emb, nn.Embedding) and m.text_emb.num_embeddings == TEXT_VOCAB + TEXT_LEN
    assert m.text_pos_emb.num_embeddings == TEXT_LEN + 1
    assert isinstance(m.image_emb, nn.Embedding) and m.image_emb.num_embeddings == IMG_TOKENS
    assert m.image_pos_emb().shape == (FMAP * FMAP, 16)
    assert isinstance(m.to_logits, nn.Linear)
    assert m.to_logits.out_features == TEXT_VOCAB + TEXT_LEN + IMG_TOKENS
    kinds = [type(layer.attn.pattern).__name__ + str(getattr(layer.attn.pattern, "axis", ""))
             for layer in m.transformer.layers]
    assert kinds == ["AxialPattern0", "AxialPattern1", "FullPattern", "AxialPattern0"]  # cycled
    attn = m.transformer.layers[0].attn
    assert attn.to_qkv.bias is None and attn.to_out.bias is not None
    assert m.transformer.layers[0].ff.proj_in.out_features == 16 * 4 * 2
    assert m.transformer.layers[0].ff.proj_out.in_features == 16 * 4
    # masks are derived, not weights
    assert not any("mask" in k for k in m.state_dict())


def test_layerscale_init_by_layer_index():
    m = tiny(depth=26)
    got = [layer.scale_attn[0].item() for layer in m.transformer.layers]
    assert got[0] == pytest.approx(0.1) and got[17] == pytest.approx(0.1)
    assert got[18] == pytest.approx(1e-5) and got[23] == pytest.approx(1e-5)
    assert got[24] == pytest.approx(1e-6) and got[25] == pytest.approx(1e-6)
    assert all(layer.scale_ff[0].item() == g for layer, g in zip(m.transformer.layers, got))


def test_sandwich_norm():
    assert isinstance(tiny().transformer.layers[0].post_attn_norm, nn.Identity)
    layer = tiny(sandwich_norm=True).transformer.layers[0]
    assert isinstance(layer.post_attn_norm, nn.LayerNorm) and isinstance(layer.post_ff_norm, nn.LayerNorm)


def test_unique_padding_and_bos():
    m = tiny()
    text = torch.tensor([[3, 5, 0, 0]])
    assert m.prepare_text(text).tolist() == [[0, 3, 5, TEXT_VOCAB + 2, TEXT_VOCAB + 3]]


def test_logits_mask():
    m = tiny()
    text = torch.tensor([[3, 5, 0, 0]])
    codes = torch.tensor([[1, 2, 3, 4]])
    logits = m(text, codes)
    assert logits.shape == (1, TEXT_LEN + 1 + 3, TEXT_VOCAB + TEXT_LEN + IMG_TOKENS)  # last code dropped
    most_negative = torch.finfo(logits.dtype).min
    ntext = TEXT_VOCAB + TEXT_LEN
    assert (logits[0, :TEXT_LEN, ntext:] == most_negative).all()
    assert (logits[0, :TEXT_LEN, :ntext] > most_negative).all()
    assert (logits[0, TEXT_LEN:, :ntext] == most_negative).all()
    assert (logits[0, TEXT_LEN:, ntext:] > most_negative).all()


def test_loss_on_hand_made_batch():
    m = tiny(loss_img_weight=3.0)
    text = torch.tensor([[3, 5, 0, 0], [9, 1, 2, 7]])
    codes = torch.tensor([[1, 2, 3, 4], [5, 0, 0, 2]])
    logits = m(text, codes)
    # Labels by hand: text (unique pads) then image codes offset by the text table size.
    ntext = TEXT_VOCAB + TEXT_LEN
    labels = torch.tensor([[3, 5, 12, 13, 1 + ntext, 2 + ntext, 3 + ntext, 4 + ntext],
                           [9, 1, 2, 7, 5 + ntext, ntext, ntext, 2 + ntext]])
    logp = logits.log_softmax(-1).gather(-1, labels[..., None])[..., 0]
    ce_text = -logp[:, :TEXT_LEN].mean()
    ce_img = -logp[:, TEXT_LEN:].mean()
    expected = (ce_text + 3.0 * ce_img) / 4.0
    loss = m(text, codes, return_loss=True)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    # untrained: about uniform over the allowed ids
    assert 0.3 * math.log(IMG_TOKENS) < ce_img.item() < 3 * math.log(IMG_TOKENS)
    loss.backward()
    assert all(p.grad is not None for p in m.parameters())


def test_training_input_drops_last_token():
    m = tiny()
    text = torch.tensor([[3, 5, 0, 0]])
    codes = torch.tensor([[1, 2, 3, 4]])
    seen = []
    m.image_emb.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].clone()))
    m(text, codes, return_loss=True)
    assert seen[0].tolist() == [[1, 2, 3]]


def test_images_through_codec_uint8_and_float():
    cfg = Config(registry=get_registry(), model=ModelConfig(dim=16, depth=1, heads=2, dim_head=8, text_seq_len=TEXT_LEN, byteio=True))
    torch.manual_seed(0)
    m = build_model(cfg, text_vocab=TEXT_VOCAB, num_image_tokens=IMG_TOKENS, fmap_size=FMAP, codec=GreyCodec(FMAP, IMG_TOKENS))
    text = torch.tensor([[3, 5, 0, 0]])
    img_u8 = torch.randint(0, 256, (1, 3, 4, 4), dtype=torch.uint8)
    codes = m.codec.encode(img_u8.float() / 255)
    loss_codes = m(text, codes, return_loss=True)
    assert m(text, img_u8, return_loss=True).item() == loss_codes.item()
    assert m(text, img_u8.float() / 255, return_loss=True).item() == loss_codes.item()
    # the codec is frozen and not part of the model's weights
    assert not any(k.startswith("codec") or k == "w" for k in m.state_dict())
    assert all(p is not m.codec.w for p in m.parameters())
    assert not m.codec.w.requires_grad
    m.to(torch.float64)
    assert m.codec.w.dtype == torch.float32  # device moves only


def test_images_without_codec_is_an_error():
    with pytest.raises(ValueError, match="no codec"):
        tiny()(torch.tensor([[3, 5, 0, 0]]), torch.rand(1, 3, 4, 4), return_loss=True)


def test_conv_like_parameters_reach_the_pattern():
    from minidalle.api import config_from_dict

    cfg = config_from_dict({"model": {"dim": 16, "depth": 1, "heads": 2, "dim_head": 8, "text_seq_len": 4,
                                      "attn_types": ["conv_like"]},
                            "attention": {"conv_like": {"kernel_size": 3, "dilation": 2}}})
    m = build_model(cfg, text_vocab=TEXT_VOCAB, num_image_tokens=IMG_TOKENS, fmap_size=4)
    p = m.transformer.layers[0].attn.pattern
    assert (p.kernel_size, p.dilation) == (3, 2)


def test_conv_like_config_errors():
    from minidalle.api import config_from_dict
    from minidalle.errors import ConfigError

    with pytest.raises(ConfigError, match="attention.conv_like.kernel_size: expected an odd number"):
        config_from_dict({"model": {"attn_types": ["conv_like"]}, "attention": {"conv_like": {"kernel_size": 4}}})
    with pytest.raises(ConfigError, match="attention.full.+takes no parameters"):
        config_from_dict({"model": {"attn_types": ["full"]}, "attention": {"full": {"x": 1}}})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_geglu_autograd_function_is_bit_identical_to_autograd(dtype):
    """The GEGLU backward that writes into one buffer gives autograd's exact gradient."""
    import torch.nn.functional as F

    from minidalle.model.transformer import geglu

    h = torch.randn(2, 7, 24, dtype=dtype, requires_grad=True)
    grad = torch.randn(2, 7, 12, dtype=dtype)
    x, gates = h.chunk(2, dim=-1)
    ref = x * F.gelu(gates)
    ref_grad, = torch.autograd.grad(ref, h, grad)
    out = geglu(h)
    assert out.grad_fn is not None and "GEGLU" in type(out.grad_fn).__name__
    out_grad, = torch.autograd.grad(out, h, grad)
    assert torch.equal(out, ref)
    assert torch.equal(out_grad, ref_grad)
    with torch.no_grad():
        assert torch.equal(geglu(h), ref)


def test_factorised_image_codes_predict_each_part_on_its_own():
    """Codes of a two-codebook codec (code = a * 3 + b): embeddings and image logits are sums
    over the parts, so the softmax is p(a) p(b) and the loss two independent cross entropies."""
    cfg = Config(registry=get_registry(), model=ModelConfig(dim=16, depth=2, heads=2, dim_head=8, text_seq_len=TEXT_LEN,
                                   attn_types=["full"], loss_img_weight=3.0))
    torch.manual_seed(0)
    m = build_model(cfg, text_vocab=TEXT_VOCAB, num_image_tokens=6, fmap_size=FMAP,
                    image_token_factors=(2, 3))
    ntext = TEXT_VOCAB + TEXT_LEN
    assert m.to_logits.weight.shape == (ntext + 6, 16) and m.image_emb.weight.shape == (6, 16)
    codes = torch.tensor([[1, 2, 3, 4], [5, 0, 0, 2]])
    a, b = codes // 3, codes % 3
    emb = m.image_emb(codes)
    torch.testing.assert_close(emb, m.image_emb.parts[0](a) + m.image_emb.parts[1](b))
    torch.testing.assert_close(emb, m.image_emb.weight[codes])

    text = torch.tensor([[3, 5, 0, 0], [9, 1, 2, 7]])
    with torch.no_grad():
        h = m.norm_out(m.hidden(torch.cat([m.prepare_text(text), codes[:, :-1]], 1)))
        img = m.image_logits_raw(h)
        la, lb = m.to_logits.parts[0](h), m.to_logits.parts[1](h)
        torch.testing.assert_close(img, (la[..., :, None] + lb[..., None, :]).flatten(-2))
        # the model's masked full-vocabulary logits agree
        torch.testing.assert_close(m(text, codes)[:, TEXT_LEN:, ntext:], img[:, TEXT_LEN:])

    loss = m(text, codes, return_loss=True)
    hi = h[:, TEXT_LEN:]
    ce_parts = (F.cross_entropy(m.to_logits.parts[0](hi).flatten(0, 1), a.flatten())
                + F.cross_entropy(m.to_logits.parts[1](hi).flatten(0, 1), b.flatten()))
    ce_text = F.cross_entropy(m.to_logits.text(h[:, :TEXT_LEN]).flatten(0, 1),
                              m.prepare_text(text)[:, 1:].flatten())
    assert loss.item() == pytest.approx(((ce_text + 3.0 * ce_parts) / 4.0).item(), rel=1e-5)
    loss.backward()
    assert all(p.grad is not None for p in m.parameters())
    with pytest.raises(ValueError, match="do not multiply"):
        build_model(cfg, text_vocab=TEXT_VOCAB, num_image_tokens=7, fmap_size=FMAP,
                    image_token_factors=(2, 3))

    # model.image_factor_weights: a weight per factor's cross entropy; [1, 1] is the joint loss
    def weighted(weights):
        cfg.model.image_factor_weights = weights
        torch.manual_seed(0)
        w = build_model(cfg, text_vocab=TEXT_VOCAB, num_image_tokens=6, fmap_size=FMAP,
                        image_token_factors=(2, 3))
        return w(text, codes, return_loss=True)

    assert weighted([1.0, 1.0]).item() == pytest.approx(loss.item(), rel=1e-5)
    ce_a = F.cross_entropy(m.to_logits.parts[0](hi).flatten(0, 1), a.flatten())
    assert weighted([4.0, 1.0]).item() == pytest.approx(
        ((ce_text + 3.0 * (ce_parts + 3.0 * ce_a)) / 4.0).item(), rel=1e-5)
    for bad in ([1.0], [1.0, -1.0]):
        with pytest.raises(ConfigError, match=r"model.image_factor_weights: expected one weight >= 0 per codec factor \(2: \[2, 3\]\)"):
            weighted(bad)
    cfg.model.image_factor_weights = None
