"""Built-in tokenizers (yttm, clip) against the tokenizer conformance kit."""
from __future__ import annotations

import gzip
import pickle
import sys
from collections import Counter

import pytest
import torch

from minidalle.errors import DataError
from minidalle.testing.tokenizer import check_tokenizer

pytest.importorskip("youtokentome", reason="needs youtokentome (pip install youtokentome)")

CAPTIONS = [
    "a small red circle at the top left",
    "a large blue square in the center",
    "two dogs playing on a sunny beach",
    "a plate of food has potatoes and fruit.",
    "a man riding a red bicycle down the street",
] * 10


@pytest.fixture(scope="module")
def yttm_model(tmp_path_factory):
    from minidalle.components.tokenizers.yttm import train

    path = tmp_path_factory.mktemp("yttm") / "bpe.yttm"
    train(CAPTIONS, 120, path)
    return path


def test_yttm_conforms(yttm_model):
    from minidalle.plugin.discovery import load_registry

    tok = load_registry(autoload="none").get("tokenizer", "yttm").build({"path": str(yttm_model)})
    assert tok.vocab_size == 120
    check_tokenizer(tok, texts=CAPTIONS[:5], context_length=32)


def test_yttm_ids_and_padding(yttm_model):
    from minidalle.components.tokenizers.yttm import YttmTokenizer

    tok = YttmTokenizer(yttm_model)
    ids = tok.encode(["a red circle", "a red circle at the top left"], 12)
    assert ids.shape == (2, 12) and ids.dtype == torch.long
    n0 = int((ids[0] != 0).sum())
    assert 0 < n0 < int((ids[1] != 0).sum())
    assert ids[0, :n0].tolist() == ids[1, :n0].tolist()  # same prefix, same ids, no BOS added
    assert set(ids[0, :n0].tolist()).isdisjoint({0, 1, 2, 3})  # no pad/unk/bos/eos in known text
    # unknown characters become <UNK> (1), never padding
    unk = tok.encode(["a ☃ circle"], 12)[0]
    assert 1 in unk.tolist() and int((unk != 0).sum()) == int((unk[: int((unk != 0).sum())] != 0).sum())
    # decode skips padding wherever it is
    assert tok.decode(torch.cat([ids[0, :n0], torch.zeros(5, dtype=torch.long)])) == "a red circle"
    assert pickle.loads(pickle.dumps(tok)).decode(ids[0]) == "a red circle"


def test_yttm_too_long_caption_names_it(yttm_model):
    from minidalle.components.tokenizers.yttm import YttmTokenizer

    tok = YttmTokenizer(yttm_model)
    with pytest.raises(DataError, match="two dogs playing on a sunny beach"):
        tok.encode(["a red circle", "two dogs playing on a sunny beach"], 4, truncate=False)
    assert tok.encode(["two dogs playing on a sunny beach"], 4, truncate=True).shape == (1, 4)


def test_yttm_bad_files(tmp_path):
    from minidalle.components.tokenizers.yttm import YttmTokenizer, train

    with pytest.raises(DataError, match="not found"):
        YttmTokenizer(tmp_path / "missing.yttm")
    bad = tmp_path / "bad.yttm"
    bad.write_text("this is not a model\n")
    with pytest.raises(DataError, match="not a youtokentome model"):
        YttmTokenizer(bad)
    with pytest.raises(DataError, match="no captions"):
        train(["", "  "], 50, tmp_path / "x.yttm")
    with pytest.raises(DataError, match="vocab_size"):
        train(CAPTIONS, 5, tmp_path / "y.yttm")
    assert not (tmp_path / "y.yttm").exists()


# --------------------------------------------------------------------------- clip


def make_clip_vocab(path, texts, num_merges=80):
    """A tiny vocabulary in the format of bpe_simple_vocab_16e6.txt.gz (learned greedily)."""
    from minidalle.components.tokenizers.clip import ClipTokenizer, bytes_to_unicode

    bmap = bytes_to_unicode()
    words = Counter()
    for text in texts:
        for word in ClipTokenizer.clean(text).split():
            symbols = [bmap[b] for b in word.encode("utf-8")]
            symbols[-1] += "</w>"
            words[tuple(symbols)] += 1
    merges = []
    for _ in range(num_merges):
        pairs = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        merged = Counter()
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode("utf-8")))
    return merges


@pytest.fixture(scope="module")
def clip_vocab(tmp_path_factory):
    pytest.importorskip("ftfy", reason="needs ftfy (pip install ftfy)")
    pytest.importorskip("regex", reason="needs regex (pip install regex)")
    path = tmp_path_factory.mktemp("clip") / "bpe_simple_vocab_16e6.txt.gz"
    make_clip_vocab(path, CAPTIONS)
    return path


def test_clip_conforms(clip_vocab):
    from minidalle.plugin.discovery import load_registry

    tok = load_registry(autoload="none").get("tokenizer", "clip").build({"bpe_path": str(clip_vocab)})
    assert tok.vocab_size == 512 + 80 + 2 + 1  # bytes, bytes</w>, merges, 2 specials, +1 for padding
    check_tokenizer(tok, texts=CAPTIONS[:5], context_length=32)


def test_clip_known_ids(tmp_path):
    pytest.importorskip("ftfy", reason="needs ftfy")
    from minidalle.components.tokenizers.clip import ClipTokenizer

    path = tmp_path / "v.txt.gz"
    path.write_bytes(gzip.compress(b"#version: 0.2\nt h\nth e</w>\n"))
    tok = ClipTokenizer(path)
    # CLIP ids + 1: "!" is CLIP id 0 -> 1; "h" is 104 - 33 = 71 -> 72; "the</w>" is merge 1 -> 513 -> 514
    assert tok.encode(["THE  h!"], 5).tolist() == [[514, 72 + 256, 1 + 256, 0, 0]]
    assert tok.decode([514, 72 + 256, 1 + 256, 0, 0]) == "the h !"
    assert tok.decode(tok.encode(["caf\u00e9 \u2603"], 16)[0]) == "caf\u00e9 \u2603"  # bytes round-trip
    # ftfy repairs mojibake before encoding
    assert tok.decode(tok.encode(["caf\u00c3\u00a9"], 16)[0]) == "caf\u00e9"


def test_clip_vocab_missing_or_bundled(tmp_path, monkeypatch):
    pytest.importorskip("ftfy", reason="needs ftfy")
    from minidalle.components.tokenizers import clip as tokenizer_clip

    monkeypatch.setattr(tokenizer_clip, "BUNDLED", (("no_such_package_xyz", ""),))
    with pytest.raises(DataError, match="open_clip_torch"):
        tokenizer_clip.build(tokenizer_clip.ClipConfig())
    with pytest.raises(DataError, match="not found"):
        tokenizer_clip.build(tokenizer_clip.ClipConfig(bpe_path=str(tmp_path / "nope.txt.gz")))
    (tmp_path / "broken.txt.gz").write_bytes(b"not gzip")
    with pytest.raises(DataError, match="not a gzipped"):
        tokenizer_clip.build(tokenizer_clip.ClipConfig(bpe_path=str(tmp_path / "broken.txt.gz")))

    # a package that ships the file is found without importing it
    pkg = tmp_path / "site" / "fake_open_clip"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    make_clip_vocab(pkg / tokenizer_clip.VOCAB_FILE, CAPTIONS, num_merges=5)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(tokenizer_clip, "BUNDLED", (("fake_open_clip", ""),))
    tok = tokenizer_clip.build(tokenizer_clip.ClipConfig())
    assert tok.bpe_path == pkg / tokenizer_clip.VOCAB_FILE
    assert "fake_open_clip" not in sys.modules


def test_clip_real_vocabulary_ids():
    pytest.importorskip("ftfy", reason="needs ftfy")
    from minidalle.components.tokenizers.clip import ClipTokenizer, find_bundled_vocab

    path = find_bundled_vocab()
    if path is None:
        pytest.skip("needs bpe_simple_vocab_16e6.txt.gz from an installed open_clip_torch")
    tok = ClipTokenizer(path)
    assert tok.vocab_size == 49408 + 1
    # CLIP's published ids for "a photo of a cat", shifted by one for padding
    assert (tok.encode(["a photo of a cat"], 6)[0] - 1).tolist() == [320, 1125, 539, 320, 2368, -1]


# --------------------------------------------------------------------------- the kit itself


class _CharTokenizer:
    """A correct character tokenizer (ids = code point + 1, capped), to break on purpose."""

    vocab_size = 1000

    def ids(self, text):
        return [min(ord(c), 998) + 1 for c in text]

    def encode(self, texts, context_length, truncate=True):
        from minidalle.data import to_fixed_length

        return to_fixed_length([self.ids(t) for t in texts], texts, context_length, truncate)

    def decode(self, ids):
        ids = ids.tolist() if hasattr(ids, "tolist") else ids
        return "".join(chr(i - 1) for i in ids if i > 0)


class _NoTruncationError(_CharTokenizer):
    def encode(self, texts, context_length, truncate=True):
        return super().encode(texts, context_length, True)


class _Int32(_CharTokenizer):
    def encode(self, texts, context_length, truncate=True):
        return super().encode(texts, context_length, truncate).int()


class _PadsAtFront(_CharTokenizer):
    def encode(self, texts, context_length, truncate=True):
        return super().encode(texts, context_length, truncate).flip(1)


class _LosesCase(_CharTokenizer):
    def decode(self, ids):
        return super().decode(ids)[:-1]


def test_kit_passes_a_correct_tokenizer_and_catches_broken_ones():
    import minidalle.testing as kit

    assert kit.check_tokenizer is check_tokenizer  # lazy re-export
    check_tokenizer(_CharTokenizer(), texts=CAPTIONS[:3], context_length=64)
    for broken, message in ((_NoTruncationError, "must raise"), (_Int32, "int64"),
                            (_PadsAtFront, "padding"), (_LosesCase, "round-trip")):
        with pytest.raises(AssertionError, match=message):
            check_tokenizer(broken(), texts=CAPTIONS[:3], context_length=64)
