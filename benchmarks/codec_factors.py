"""How cleanly a colour x outline codec separates the two (benchmarks/RESULTS.md#quickstart).

    python benchmarks/codec_factors.py output/quickstart/codec/vqgan.ckpt

Encodes a rendered image of every colour+shape+position combination of the quickstart's
`shapes` settings (36 px, large shapes) and prints: the share of outline codes that stay
the same when only the colour changes, of colour codes that stay the same when only the
shape changes, of a shape's 3x3 block of codes that equals its block in the center cell,
and how often each colour code is used per colour.
"""
import itertools
import sys

import torch

from minidalle.components.codecs.vqgan import load_vqgan
from minidalle.components.datasets.shapes import POSITIONS, render

COLOURS = ["red", "green", "blue", "yellow", "purple"]
SHAPES = ["circle", "square", "triangle"]


def block(codes_row, position, f=9):
    """The 3x3 codes of a grid cell (a 36 px image has 9x9 codes)."""
    (r, c), _ = POSITIONS[position]
    return codes_row.view(f, f)[3 * r:3 * r + 3, 3 * c:3 * c + 3].flatten()


def agreement(codes, keys, group, vary):
    """Mean share of equal codes between items that differ only in ``vary`` (index into keys)."""
    same = total = 0
    for fixed in itertools.product(*[sorted({k[i] for k in keys}) for i in group]):
        rows = [codes[j] for j, k in enumerate(keys) if tuple(k[i] for i in group) == fixed]
        for row in rows[1:]:
            same += (row == rows[0]).float().mean().item()
            total += 1
    return same / total


def main(path):
    torch.set_num_threads(1)
    codec = load_vqgan(path)
    keys = list(itertools.product(COLOURS, SHAPES, POSITIONS))
    images = torch.stack([render({"colour": c, "shape": s, "position": p, "size": "large"}, 36)
                          for c, s, p in keys]).float() / 255
    codes = codec.encode(images)
    colour, outline = codec.split_codes(codes)
    print(f"outline codes equal across colours (same shape, position): {agreement(outline, keys, (1, 2), 0):.3f}")
    print(f"colour codes equal across shapes (same colour, position):  {agreement(colour, keys, (0, 2), 1):.3f}")
    centre = {(c, s): block(codes[keys.index((c, s, "center"))], "center") for c, s in itertools.product(COLOURS, SHAPES)}
    moved = sum((block(codes[j], k[2]) == centre[k[:2]]).float().mean().item() for j, k in enumerate(keys))
    print(f"a shape's codes equal to its codes in the center cell:      {moved / len(keys):.3f}")
    for c in COLOURS:
        used = torch.cat([block(colour[j], k[2]) for j, k in enumerate(keys) if k[0] == c])
        print(f"  colour codes of {c:>6}: {torch.bincount(used, minlength=codec.n_embed).tolist()}")


if __name__ == "__main__":
    main(sys.argv[1])
