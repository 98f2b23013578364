"""How cleanly a colour x outline codec separates the two, on the shapes dataset.

Encodes a rendered image of every colour+shape+position combination and measures: the
share of outline codes that stay the same when only the colour changes, of colour codes
that stay the same when only the shape changes, of a shape's block of codes that equals its
block in the center cell (the codes a withheld position needs), and how often each colour
code is used per colour. The quickstart's result rests on these (benchmarks/RESULTS.md).
"""
from __future__ import annotations

import itertools

import torch

from minidalle.components.datasets.shapes import POSITIONS, render


def _block(codes_row: torch.Tensor, position: str, f: int) -> torch.Tensor:
    """The codes of a grid cell (the image is a 3x3 grid of cells, f x f codes in all)."""
    (r, c), _ = POSITIONS[position]
    k = f // 3
    return codes_row.view(f, f)[k * r:k * r + k, k * c:k * c + k].flatten()


def _agreement(codes, keys, group, vary) -> float:
    """Mean share of equal codes between items that differ only in key ``vary``."""
    same = total = 0
    for fixed in itertools.product(*[sorted({k[i] for k in keys}) for i in group]):
        rows = [codes[j] for j, k in enumerate(keys) if tuple(k[i] for i in group) == fixed]
        for row in rows[1:]:
            same += (row == rows[0]).float().mean().item()
            total += 1
    return same / total


@torch.no_grad()
def factor_report(codec, colours, shapes, size: str = "large") -> dict:
    """The measurements above for a codec with ``token_factors == (colours, outlines)``."""
    if not getattr(codec, "token_factors", None) or len(codec.token_factors) != 2:
        raise ValueError("factor_report needs a codec with two codebooks (colour x outline)")
    keys = list(itertools.product(colours, shapes, POSITIONS))
    images = torch.stack([render({"colour": c, "shape": s, "position": p, "size": size},
                                 codec.image_size) for c, s, p in keys]).float() / 255
    codes = codec.encode(images)
    colour, outline = codec.split_codes(codes)
    f = int(codec.fmap_size)
    centre = {(c, s): _block(codes[keys.index((c, s, "center"))], "center", f)
              for c, s in itertools.product(colours, shapes)}
    moved = sum((_block(codes[j], k[2], f) == centre[k[:2]]).float().mean().item()
                for j, k in enumerate(keys)) / len(keys)
    counts = {c: torch.bincount(torch.cat([_block(colour[j], k[2], f) for j, k in enumerate(keys)
                                           if k[0] == c]), minlength=codec.token_factors[0]).tolist()
              for c in colours}
    # each colour's most used code, and whether no two colours share it
    top = {c: max(range(len(n)), key=n.__getitem__) for c, n in counts.items()}
    return {"outline_same_across_colours": round(_agreement(outline, keys, (1, 2), 0), 4),
            "colour_same_across_shapes": round(_agreement(colour, keys, (0, 2), 1), 4),
            "same_codes_in_every_cell": round(moved, 4),
            "colour_codes": counts,
            "one_code_per_colour": len(set(top.values())) == len(colours)}
