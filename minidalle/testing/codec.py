"""Conformance checks for image codec components.

A codec plugin's test suite calls :func:`check_codec` on a built codec::

    from minidalle.testing.codec import check_codec

    def test_my_codec_conforms():
        report = check_codec(my_registry.build("codec", "mine", params))

Each failed check raises ``AssertionError`` naming what was expected. The report (a dict)
holds the measured values, e.g. ``stable``: the share of codes that survive
``encode(decode(codes))`` (or come back as an equivalent code), ``code_agreement``: the share
that come back identical, ``mse``: the reconstruction error of the test images.
"""
from __future__ import annotations

import torch


def sample_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """``n`` smooth test images in [0, 1]: flat colours with a few solid rectangles."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, 1, 1, generator=g).expand(n, 3, size, size).clone()
    for i in range(n):
        for _ in range(2):
            x0, y0 = torch.randint(0, size // 2, (2,), generator=g).tolist()
            w, h = torch.randint(size // 4, size // 2 + 1, (2,), generator=g).tolist()
            images[i, :, y0:y0 + h, x0:x0 + w] = torch.rand(3, 1, 1, generator=g)
    return images


def check_codec(codec, images: torch.Tensor | None = None, *, min_stable: float = 0.5,
                patch_tol: float = 1e-3, batch_size: int = 4, seed: int = 0) -> dict:
    """Check the shared codec interface on ``codec``; return the measured values.

    - ``image_size``, ``num_tokens``, ``fmap_size`` are positive integers;
    - ``encode`` gives int64 ``[B, fmap_size**2]`` codes in ``[0, num_tokens)``, is
      deterministic, does not modify its input, and does not depend on the rest of the batch;
    - ``decode`` gives finite float ``[B, 3, image_size, image_size]`` images in ``[0, 1]``,
      deterministically and independently of the batch, for any codes (including 0 and
      ``num_tokens - 1``);
    - at least ``min_stable`` of the codes survive ``encode(decode(codes))`` (a codec whose
      decoder and encoder disagree cannot be trained on); a code replaced by one that decodes
      to the same patch (mean squared difference below ``patch_tol``) counts as kept.

    ``images`` defaults to :func:`sample_images`; pass real images for a trained codec.
    """
    report: dict = {}
    for attr in ("image_size", "num_tokens", "fmap_size"):
        value = getattr(codec, attr, None)
        assert isinstance(value, int) and not isinstance(value, bool) and value > 0, \
            f"codec.{attr} must be a positive int, got {value!r}"
    size, n_tok, f = codec.image_size, codec.num_tokens, codec.fmap_size
    if images is None:
        images = sample_images(batch_size, size, seed)
    assert images.shape[1:] == (3, size, size), \
        f"test images must be [B, 3, {size}, {size}], got {tuple(images.shape)}"
    b = images.shape[0]
    original = images.clone()

    codes = codec.encode(images)
    assert torch.equal(images, original), "encode modified its input images"
    assert isinstance(codes, torch.Tensor) and codes.dtype == torch.int64, \
        f"encode must return an int64 tensor, got {getattr(codes, 'dtype', type(codes))}"
    assert codes.shape == (b, f * f), \
        f"encode must return [B, fmap_size**2] = {(b, f * f)}, got {tuple(codes.shape)}"
    assert not codes.requires_grad, "encode output must not require grad (the codec is frozen)"
    assert int(codes.min()) >= 0 and int(codes.max()) < n_tok, \
        f"codes must be in [0, {n_tok}), got [{int(codes.min())}, {int(codes.max())}]"
    assert torch.equal(codec.encode(images), codes), "encode is not deterministic"
    single = torch.cat([codec.encode(images[i:i + 1]) for i in range(b)])
    report["batch_agreement"] = (single == codes).float().mean().item()
    # Convolution algorithms may differ with batch size; a rare tie may flip a code.
    assert report["batch_agreement"] >= 0.98, \
        f"encode depends on the rest of the batch: only {report['batch_agreement']:.1%} of codes agree"

    decoded = codec.decode(codes)
    assert isinstance(decoded, torch.Tensor) and decoded.is_floating_point(), \
        "decode must return a float tensor"
    assert decoded.shape == (b, 3, size, size), \
        f"decode must return [B, 3, {size}, {size}], got {tuple(decoded.shape)}"
    assert not decoded.requires_grad, "decode output must not require grad (the codec is frozen)"
    assert torch.isfinite(decoded).all(), "decode returned NaN or inf"
    assert float(decoded.min()) >= 0 and float(decoded.max()) <= 1, \
        f"decode must return values in [0, 1], got [{float(decoded.min()):.3f}, {float(decoded.max()):.3f}]"
    assert torch.allclose(codec.decode(codes), decoded), "decode is not deterministic"
    single = torch.cat([codec.decode(codes[i:i + 1]) for i in range(b)])
    assert torch.allclose(single, decoded, atol=1e-4), "decode depends on the rest of the batch"

    g = torch.Generator().manual_seed(seed)
    edge = torch.randint(0, n_tok, (2, f * f), generator=g)
    edge[0, 0], edge[1, -1] = 0, n_tok - 1
    out = codec.decode(edge)
    assert out.shape == (2, 3, size, size) and torch.isfinite(out).all(), \
        "decode fails on arbitrary codes in [0, num_tokens)"

    # Round trip: a position is stable when re-encoding the decoded image gives its code back,
    # or a code that decodes to the same patch (codebooks often hold near-duplicates, e.g.
    # several plain-background codes).
    again = codec.encode(decoded.float())
    same = again == codes
    report["code_agreement"] = same.float().mean().item()
    if size % f == 0:
        p = size // f
        diff = ((codec.decode(again).float() - decoded.float()) ** 2).mean(1)  # [B, S, S]
        patch_mse = diff.view(b, f, p, f, p).mean((2, 4)).reshape(b, f * f)
        same = same | (patch_mse < patch_tol)
    report["stable"] = same.float().mean().item()
    assert report["stable"] >= min_stable, \
        f"encode(decode(codes)) keeps only {report['stable']:.1%} of codes (expected >= {min_stable:.0%})"
    report["mse"] = torch.mean((decoded.float() - images.float()) ** 2).item()
    return report
