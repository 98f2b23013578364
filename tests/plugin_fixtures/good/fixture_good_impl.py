"""The heavy part: imported only when a component is built."""
import attrs
import torch

from minidalle.config import positive

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


@attrs.define
class SolidConfig:
    size: int = attrs.field(default=6, validator=positive)


class SolidDataset(torch.utils.data.Dataset):
    def __init__(self, n, image_size):
        self.n, self.image_size = n, image_size
        self.names = sorted(COLOURS)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(i)
        name = self.names[i % len(self.names)]
        colour = torch.tensor(COLOURS[name], dtype=torch.uint8).view(3, 1, 1)
        return {"caption": f"a {name} square",
                "image": colour.expand(3, self.image_size, self.image_size).clone()}

    def captions(self):
        for i in range(self.n):
            yield f"a {self.names[i % len(self.names)]} square"


def build_dataset(config, *, image_size, split="train", seed=0):
    return SolidDataset(config.size, image_size)


class CharTokenizer:
    vocab_size = 257

    def encode(self, texts, context_length, truncate=True):
        out = torch.zeros(len(texts), context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [b + 1 for b in text.encode("utf-8")]
            if len(ids) > context_length and not truncate:
                raise ValueError(f"text too long for context length {context_length}: {text!r}")
            ids = ids[:context_length]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def decode(self, ids):
        ids = [int(i) for i in ids if int(i) != 0]
        return bytes(i - 1 for i in ids).decode("utf-8", errors="replace")


def build_tokenizer():
    return CharTokenizer()
