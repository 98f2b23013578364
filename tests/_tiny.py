"""Tiny in-memory components for the tests (no files).

``tiny_chars``: a character tokenizer (vocab 64). ``tiny_codes``: ``size`` captions, each
with image codes derived from the caption (so the model can learn them), and the
``num_tokens`` / ``fmap_size`` attributes a codes dataset records. ``grey``: a codec whose
codes are grey levels (:class:`GreyCodec`).
"""
from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from minidalle import hookimpl

VOCAB = 64


class TinyTokenizer:
    vocab_size = VOCAB

    def encode(self, texts, context_length, truncate=True):
        out = torch.zeros(len(texts), context_length, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = [ord(c) % (VOCAB - 1) + 1 for c in t]
            if len(ids) > context_length and not truncate:
                raise ValueError(f"caption {i} has {len(ids)} tokens, more than {context_length}")
            ids = ids[:context_length]
            out[i, : len(ids)] = torch.tensor(ids)
        return out

    def decode(self, ids):
        return "".join(chr(int(i) + 31) for i in ids if int(i) != 0)


@attrs.define
class TinyCodesConfig:
    size: int = 16
    fmap_size: int = 4
    num_tokens: int = 32


class TinyCodes(torch.utils.data.Dataset):
    WORDS = ["red", "green", "blue", "cat", "dog", "big", "small", "a"]

    def __init__(self, config: TinyCodesConfig, seed: int):
        self.num_tokens, self.fmap_size = config.num_tokens, config.fmap_size
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for i in range(config.size):
            words = [self.WORDS[j] for j in torch.randint(0, len(self.WORDS), (3,), generator=g)]
            base = sum(len(w) for w in words)
            codes = (torch.arange(config.fmap_size**2) * base + i % 3) % config.num_tokens
            self.items.append((" ".join(words), codes.long()))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        caption, codes = self.items[i]
        return {"caption": caption, "codes": codes}

    def captions(self):
        return (c for c, _ in self.items)


def build_tokenizer():
    return TinyTokenizer()


def build_dataset(config, *, image_size, split="train", seed=0):
    return TinyCodes(config, seed)


class Plugin:
    @staticmethod
    @hookimpl
    def minidalle_tokenizers(register):
        register("tiny_chars", build_tokenizer, summary="test tokenizer")

    @staticmethod
    @hookimpl
    def minidalle_datasets(register):
        register("tiny_codes", build_dataset, config=TinyCodesConfig, summary="test dataset")

    @staticmethod
    @hookimpl
    def minidalle_codecs(register):
        register("grey", GreyCodec, summary="test codec: grey levels of 2x2 patches")


def registry(*extra_plugins):
    from minidalle.plugin.discovery import load_registry

    return load_registry(autoload="none", extra_plugins=[Plugin, *extra_plugins])


def use_tiny_registry(*extra_plugins):
    """Make the process-wide registry include the tiny components (for the CLI), and
    ``extra_plugins``; the conftest puts a fresh one back after each test."""
    import minidalle.plugin.discovery as plugins

    plugins._registry = registry(*extra_plugins)
    return plugins._registry


def tiny_config_file(tmp_path, extra: str = "", checkpoint_every: int = 2):
    """A TOML file extending the unit_test recipe with the tiny tokenizer and dataset (8
    items), writing to ``tmp_path/out``; ``extra`` is appended as TOML."""
    from pathlib import Path

    base = Path(__file__).resolve().parents[1] / "configs" / "unit_test.toml"
    path = tmp_path / "tiny.toml"
    path.write_text(f"""
extends = "{base}"
[run]
out_dir = "{tmp_path / 'out'}"
[model]
text_seq_len = 16
[training]
dataloader_workers = 0
checkpoint_every = {checkpoint_every}
[tokenizer]
name = "tiny_chars"
[dataset]
name = "tiny_codes"
size = 8
{extra}
""")
    return path


def tiny_config(out_dir, *overrides, base="configs/unit_test.toml"):
    """The unit_test recipe with the tiny tokenizer and dataset, writing to ``out_dir``."""
    from pathlib import Path

    from minidalle.api import config_from_dict

    from minidalle.config import apply_overrides, load_raw

    root = Path(__file__).resolve().parents[1]
    data, origins = load_raw(root / base)
    data.setdefault("tokenizer", {"name": "tiny_chars"})
    data.setdefault("dataset", {"name": "tiny_codes"})
    data = apply_overrides(data, [f"run.out_dir={out_dir}", "training.dataloader_workers=0",
                                  "model.text_seq_len=16", *overrides], origins)
    return config_from_dict(data, source=str(root / base), registry=registry())


class GreyCodec(nn.Module):
    """Each code is the grey level of a 2x2 patch: decode then encode gives the codes back."""

    def __init__(self, fmap: int = 4, num_tokens: int = 8):
        super().__init__()
        self.fmap_size, self.num_tokens, self.image_size = fmap, num_tokens, 2 * fmap
        self.w = nn.Parameter(torch.ones(1))  # a weight that must stay out of the DALL-E's

    def encode(self, images):
        patches = F.avg_pool2d(images.mean(1, keepdim=True), 2).flatten(1)
        return (patches * (self.num_tokens - 1)).round().long()

    def decode(self, codes):
        g = (codes.float() / (self.num_tokens - 1)).view(-1, 1, self.fmap_size, self.fmap_size)
        return F.interpolate(g, scale_factor=2).expand(-1, 3, -1, -1)
