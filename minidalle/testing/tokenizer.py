"""Conformance checks for tokenizer components. From a plugin's pytest::

    from minidalle.testing.tokenizer import check_tokenizer

    def test_my_tokenizer_conforms():
        check_tokenizer(MyTokenizer(...), texts=["a red circle", "two dogs on a beach"])

``check_tokenizer`` runs every ``check_*`` below; each raises ``AssertionError`` with a
message saying what is wrong. ``texts`` should be captions the tokenizer can represent
exactly (for a trained BPE: words from its training data); round-trips are compared after
lower-casing and removing whitespace, since tokenizers may normalise case and spacing.
"""
from __future__ import annotations

import torch

DEFAULT_TEXTS = ("a small red circle at the top left", "a large blue square in the center")
UNICODE_TEXTS = ("café crème brûlée", "snowman ☃ and emoji 🙂", "日本語のテキスト", "Ünïcödé ß")


def _norm(text: str) -> str:
    return "".join(text.lower().split())


def _encode(tok, texts, context_length, truncate=True):
    out = tok.encode(list(texts), context_length, truncate=truncate)
    assert isinstance(out, torch.Tensor), f"encode must return a torch tensor, got {type(out).__name__}"
    assert out.dtype == torch.long, f"encode must return int64 ids, got {out.dtype}"
    assert tuple(out.shape) == (len(texts), context_length), (
        f"encode(texts of {len(texts)}, context_length={context_length}) returned shape "
        f"{tuple(out.shape)}, expected {(len(texts), context_length)}")
    return out


def _length(row: torch.Tensor) -> int:
    nonzero = (row != 0).nonzero()
    return int(nonzero[-1]) + 1 if len(nonzero) else 0


def check_vocab_size(tok) -> None:
    assert isinstance(tok.vocab_size, int) and tok.vocab_size > 1, (
        f"vocab_size must be an int > 1, got {tok.vocab_size!r}")


def check_fixed_length(tok, texts=DEFAULT_TEXTS, context_length: int = 64) -> None:
    for length in (context_length, 1, 7):
        ids = _encode(tok, texts, length)
        assert int(ids.min()) >= 0 and int(ids.max()) < tok.vocab_size, (
            f"ids must lie in [0, vocab_size={tok.vocab_size}), got {int(ids.min())}..{int(ids.max())}")


def check_padding(tok, texts=DEFAULT_TEXTS, context_length: int = 64) -> None:
    ids = _encode(tok, texts, context_length)
    for text, row in zip(texts, ids):
        n = int((row != 0).sum())
        assert n > 0, f"{text!r} encoded to padding only"
        assert n < context_length, f"{text!r} fills the context of {context_length}: use shorter texts"
        assert bool((row[:n] != 0).all()) and bool((row[n:] == 0).all()), (
            f"{text!r}: the text's ids must come first and padding (0) after them, got {row.tolist()}")


def check_roundtrip(tok, texts=DEFAULT_TEXTS, context_length: int = 64) -> None:
    ids = _encode(tok, texts, context_length)
    for text, row in zip(texts, ids):
        back = tok.decode(row)
        assert isinstance(back, str), f"decode must return str, got {type(back).__name__}"
        assert _norm(back) == _norm(text), f"round-trip changed {text!r} into {back!r}"
        assert tok.decode(row.tolist()) == back, "decode must accept a list of ints as well as a tensor"


def check_truncation(tok, texts=DEFAULT_TEXTS, context_length: int = 64) -> None:
    from minidalle.errors import DataError

    full = _encode(tok, texts, context_length)
    long_text = max(texts, key=lambda t: _length(full[list(texts).index(t)]))
    n = _length(full[list(texts).index(long_text)])
    assert n >= 2, f"need a text of at least 2 tokens to check truncation, got {long_text!r}"
    short = _encode(tok, [long_text], n - 1, truncate=True)
    assert torch.equal(short[0], full[list(texts).index(long_text), : n - 1]), (
        "truncate=True must keep the first context_length ids")
    try:
        tok.encode([long_text], n - 1, truncate=False)
    except DataError as exc:
        assert long_text[:40] in str(exc), f"the error for a too-long caption must name it: {exc}"
    else:
        raise AssertionError("encode(..., truncate=False) of a too-long caption must raise "
                             "minidalle.errors.DataError naming the caption")
    exact = _encode(tok, [long_text], n, truncate=False)  # fits exactly: no error
    assert torch.equal(exact[0], full[list(texts).index(long_text), :n])


def check_unicode(tok, texts=UNICODE_TEXTS, context_length: int = 64) -> None:
    ids = _encode(tok, texts, context_length)
    assert int(ids.min()) >= 0 and int(ids.max()) < tok.vocab_size, "unicode text gave ids out of range"
    for row in ids:
        assert isinstance(tok.decode(row), str), "decode of unicode text must return str"


def check_empty(tok, context_length: int = 16) -> None:
    ids = _encode(tok, ["", "   "], context_length)  # whitespace only: anything valid
    assert bool((ids[0] == 0).all()), f"an empty caption must encode to padding only, got {ids[0].tolist()}"
    assert int(ids.min()) >= 0 and int(ids.max()) < tok.vocab_size, "whitespace gave ids out of range"
    assert tok.decode(ids[0]).strip() == "", "decoding padding only must give an empty string"
    assert tok.decode([]).strip() == "", "decode([]) must give an empty string"


def check_pickle(tok, texts=DEFAULT_TEXTS, context_length: int = 64) -> None:
    import pickle

    try:
        copy = pickle.loads(pickle.dumps(tok))  # data-loader workers receive a pickled copy
    except Exception as exc:
        raise AssertionError(f"the tokenizer must pickle (data-loader workers get a pickled copy): "
                             f"{type(exc).__name__}: {exc}") from None
    assert torch.equal(_encode(copy, texts, context_length), _encode(tok, texts, context_length)), (
        "a pickled copy must encode identically")


def check_tokenizer(tok, texts=DEFAULT_TEXTS, context_length: int = 64) -> None:
    """Run every check; ``texts`` must round-trip exactly and fit in ``context_length``."""
    texts = tuple(texts)
    check_vocab_size(tok)
    check_fixed_length(tok, texts, context_length)
    check_padding(tok, texts, context_length)
    check_roundtrip(tok, texts, context_length)
    check_truncation(tok, texts, context_length)
    check_unicode(tok, context_length=context_length)
    check_empty(tok)
    check_pickle(tok, texts, context_length)
