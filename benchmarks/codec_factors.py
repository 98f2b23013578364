"""How cleanly a colour x outline codec separates the two (benchmarks/RESULTS.md#quickstart).

    python benchmarks/codec_factors.py output/quickstart/codec/vqgan.ckpt

Prints minidalle.recipes.quickstart.codec_factors.factor_report for the quickstart's
colours and shapes (the evaluate stage writes the same into metrics.json, "codec_factors").
"""
import sys

import torch

from minidalle.components.codecs.vqgan import load_vqgan
from minidalle.recipes.quickstart.codec_factors import factor_report

COLOURS = ["red", "green", "blue", "yellow", "purple"]
SHAPES = ["circle", "square", "triangle"]


def main(path):
    torch.set_num_threads(1)
    r = factor_report(load_vqgan(path), COLOURS, SHAPES)
    print(f"outline codes equal across colours (same shape, position): {r['outline_same_across_colours']:.3f}")
    print(f"colour codes equal across shapes (same colour, position):  {r['colour_same_across_shapes']:.3f}")
    print(f"a shape's codes equal to its codes in the center cell:      {r['same_codes_in_every_cell']:.3f}")
    for c, n in r["colour_codes"].items():
        print(f"  colour codes of {c:>6}: {n}")
    print(f"one code per colour: {r['one_code_per_colour']}")


if __name__ == "__main__":
    main(sys.argv[1])
