"""``clip``: CLIP's "simple" byte-level BPE, read from a ``bpe_simple_vocab_16e6.txt.gz``.

The file is a gzipped list of merges (first line a version header). The vocabulary is, in
order, the 256 byte symbols, the same with an end-of-word mark ``</w>``, one entry per
merge (at most 49152 - 256 - 2 merges are used, as CLIP does) and ``<|startoftext|>``,
``<|endoftext|>``: 49408 entries for the real file. Text is cleaned (ftfy, HTML
unescape, whitespace collapsed) and lower-cased; start/end tokens are not added.

Ids are CLIP's ids **plus one**, so that 0 is free for padding (in CLIP id 0 is ``!``);
``vocab_size`` is therefore 49409 for the real file.

Without ``bpe_path`` the file shipped inside an installed ``open_clip_torch`` (or OpenAI
``clip`` / ``dalle_pytorch``) package is used; it is found without importing the package.
"""
from __future__ import annotations

import gzip
import html
import importlib.util
from functools import lru_cache
from pathlib import Path
from typing import Union

import attrs

from minidalle.errors import DataError

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
MAX_MERGES = 49152 - 256 - 2
SPECIAL = ("<|startoftext|>", "<|endoftext|>")
# (package, folder inside it) that ship the vocabulary file
BUNDLED = (("open_clip", ""), ("clip", ""), ("dalle_pytorch", "data"))
PATTERN = (r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]"""
           r"""|[^\s\p{L}\p{N}]+""")


@attrs.define
class ClipConfig:
    # Path to bpe_simple_vocab_16e6.txt.gz; None: the copy an installed open_clip_torch ships.
    bpe_path: Union[str, None] = None


def find_bundled_vocab() -> Path | None:
    """The vocabulary file inside an installed package, or None (imports nothing)."""
    for package, folder in BUNDLED:
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            continue
        for location in (spec.submodule_search_locations or []) if spec else []:
            candidate = Path(location, folder, VOCAB_FILE)
            if candidate.is_file():
                return candidate
    return None


@lru_cache()
def bytes_to_unicode() -> dict[int, str]:
    """Every byte -> a printable unicode character (bytes that print as themselves keep
    their character; the rest are mapped above U+0100), so BPE never sees whitespace or
    control bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def _pairs(word: tuple[str, ...]) -> set[tuple[str, str]]:
    return set(zip(word, word[1:]))


class ClipTokenizer:
    def __init__(self, bpe_path) -> None:
        self.bpe_path = Path(bpe_path)
        merges = self._read_merges(self.bpe_path)
        byte_symbols = list(bytes_to_unicode().values())
        vocab = byte_symbols + [s + "</w>" for s in byte_symbols]
        vocab += ["".join(m) for m in merges] + list(SPECIAL)
        self.encoder = {tok: i for i, tok in enumerate(vocab)}
        self.decoder = {i: tok for tok, i in self.encoder.items()}
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.byte_decoder = {c: b for b, c in bytes_to_unicode().items()}
        self.vocab_size = len(vocab) + 1  # +1: id 0 is padding
        self._cache = {s: s for s in SPECIAL}
        self._pattern = None

    @staticmethod
    def _read_merges(path: Path) -> list[tuple[str, str]]:
        if not path.is_file():
            raise DataError(f"{path}: CLIP BPE vocabulary not found")
        try:
            lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
        except (OSError, EOFError, UnicodeDecodeError) as exc:
            raise DataError(f"{path}: not a gzipped CLIP BPE vocabulary ({exc})") from None
        merges = []
        for lineno, line in enumerate(lines[1:MAX_MERGES + 1], start=2):
            if not line.strip():
                continue
            parts = tuple(line.split())
            if len(parts) != 2:
                raise DataError(f"{path}: line {lineno}: expected a merge 'a b', got {line!r}")
            merges.append(parts)
        return merges

    @property
    def pattern(self):
        if self._pattern is None:
            import regex

            self._pattern = regex.compile(PATTERN, regex.IGNORECASE)
        return self._pattern

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_pattern"] = None
        return state

    @staticmethod
    def clean(text: str) -> str:
        import ftfy

        text = html.unescape(html.unescape(ftfy.fix_text(text)))
        return " ".join(text.split()).lower()

    def bpe(self, token: str) -> list[str]:
        """Merge the characters of one pre-token (already byte-mapped) by merge rank."""
        if token in self._cache:
            return self._cache[token].split(" ")
        word = (*token[:-1], token[-1] + "</w>")
        while len(word) > 1:
            pair = min(_pairs(word), key=lambda p: self.ranks.get(p, float("inf")))
            if pair not in self.ranks:
                break
            first, second = pair
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        if len(self._cache) < 100_000:
            self._cache[token] = " ".join(word)
        return list(word)

    def encode_one(self, text: str) -> list[int]:
        byte_map = bytes_to_unicode()
        ids = []
        for piece in self.pattern.findall(self.clean(text)):
            mapped = "".join(byte_map[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[t] + 1 for t in self.bpe(mapped))
        return ids

    def encode(self, texts: list[str], context_length: int, truncate: bool = True):
        from minidalle.data import to_fixed_length

        texts = [texts] if isinstance(texts, str) else list(texts)
        return to_fixed_length([self.encode_one(t) for t in texts], texts, context_length, truncate)

    def decode(self, ids) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        tokens = [self.decoder[int(i) - 1] for i in ids if 0 < int(i) < self.vocab_size]
        tokens = [t for t in tokens if t not in SPECIAL]
        # "</w>" ends a word (as in CLIP, a literal "</w>" typed in a caption reads as one too)
        out = bytearray()
        for word in "".join(tokens).split("</w>"):
            out += bytes(self.byte_decoder[c] for c in word) + b" "
        return out.decode("utf-8", errors="replace").strip()


def build(config: ClipConfig) -> ClipTokenizer:
    path = config.bpe_path
    if path is None:
        path = find_bundled_vocab()
        if path is None:
            raise DataError(
                f"tokenizer.bpe_path: not set and no installed package ships {VOCAB_FILE}; "
                f"`pip install open_clip_torch` or download it from "
                f"https://github.com/openai/CLIP/raw/main/clip/{VOCAB_FILE} and set bpe_path"
            )
    return ClipTokenizer(path)
