"""``shapes``: procedural captioned images of one coloured shape, offline and seeded.

Item ``i`` of a split is drawn from ``(seed, split, i)`` alone: a shape, a colour, a
position on a 3x3 grid and a size, rendered crisply (solid background, solid shape, no
anti-aliasing) at any image size, with a caption such as
``"a small red circle at the top left"`` and the attributes
``{"shape", "colour", "position", "size"}``.

``exclude`` withholds combinations from the ``train`` and ``val`` splits: a colour and a
shape (``"red circle"``: that pair anywhere), or a colour, a shape and a position
(``"red circle top left"``: only there); the ``heldout`` split (or ``only_excluded = true`` for every split) yields
only those combinations, to measure how well a model composes attributes it never saw
together.

The quickstart's pixel analyser (:mod:`minidalle.recipes.quickstart.analyse`) recovers the
attributes from a rendered (or generated) image.
"""
from __future__ import annotations

import itertools

import attrs
import numpy as np
import torch

from minidalle.config import FieldError, positive
from minidalle.errors import ConfigError, DataError

PALETTE = {  # well separated in RGB so that blurry reconstructions still classify
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (40, 70, 230),
    "yellow": (240, 220, 30),
    "purple": (150, 40, 200),
    "cyan": (30, 210, 220),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle", "diamond")
# name -> (row, column) on the 3x3 grid, and how captions say it
POSITIONS = {
    "top left": ((0, 0), "at the top left"),
    "top": ((0, 1), "at the top"),
    "top right": ((0, 2), "at the top right"),
    "left": ((1, 0), "on the left"),
    "center": ((1, 1), "in the center"),
    "right": ((1, 2), "on the right"),
    "bottom left": ((2, 0), "at the bottom left"),
    "bottom": ((2, 1), "at the bottom"),
    "bottom right": ((2, 2), "at the bottom right"),
}
SIZES = {"small": 0.45, "large": 0.85}  # shape extent as a fraction of a grid cell
SPLITS = ("train", "val", "heldout")


def _subset_of(universe):
    def check(instance, attribute, value):
        if not value:
            raise FieldError(f"{attribute.name}: expected a non-empty list")
        for i, v in enumerate(value):
            if v not in universe:
                raise FieldError(f"{attribute.name}[{i}]: expected one of "
                                 f"{', '.join(map(repr, universe))}, got {v!r}")
        if len(set(value)) != len(value):
            raise FieldError(f"{attribute.name}: duplicate entries")
    return check


@attrs.define
class ShapesConfig:
    num_samples: int = attrs.field(default=10000, validator=positive)  # train split
    num_eval_samples: int = attrs.field(default=500, validator=positive)  # val and heldout
    # "diamond" is also available, but at small sizes under ~128 px it looks like a circle
    shapes: list[str] = attrs.field(factory=lambda: ["circle", "square", "triangle"],
                                    validator=_subset_of(SHAPES))
    colours: list[str] = attrs.field(factory=lambda: ["red", "green", "blue", "yellow", "purple"],
                                     validator=_subset_of(tuple(PALETTE)))
    positions: list[str] = attrs.field(factory=lambda: list(POSITIONS),
                                       validator=_subset_of(tuple(POSITIONS)))
    sizes: list[str] = attrs.field(factory=lambda: ["small", "large"],
                                   validator=_subset_of(tuple(SIZES)))
    # combinations withheld from train/val: "<colour> <shape>" or "<colour> <shape> <position>",
    # e.g. ["red circle", "blue square bottom right"]
    exclude: list[str] = attrs.field(factory=list)
    only_excluded: bool = False  # every split yields only the excluded combinations
    # random shift of the shape inside its grid cell, as a fraction of the cell
    jitter: float = attrs.field(default=0.0)
    background: list[int] = attrs.field(factory=lambda: [0, 0, 0])
    # Probability that a train-split caption leaves out each of `caption_dropout_attributes`
    # (independently): "a large circle at the top left", "a large red shape at the top", ...
    # so that the model also learns what each attribute alone does to the image.
    caption_dropout: float = attrs.field(default=0.0)
    caption_dropout_attributes: list[str] = attrs.field(
        factory=lambda: ["colour", "shape", "position"],
        validator=_subset_of(("colour", "shape", "position")))
    max_items: int | None = attrs.field(default=None, validator=positive)
    # How many shapes a train-split image holds, drawn uniformly from this list, each in its
    # own grid cell and each a non-excluded combination; the caption joins their clauses with
    # "and" in random order. Several shapes per image make the model find, for each cell, the
    # clause that names it, instead of memorising one image per caption: that is what lets it
    # draw a combination it never saw. val and heldout items always hold one shape.
    shapes_per_image: list[int] = attrs.field(factory=lambda: [1])

    @shapes_per_image.validator
    def _shapes_per_image(self, attribute, value):
        if not value or any(not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 9
                            for k in value):
            raise FieldError(f"shapes_per_image: expected a non-empty list of counts in 1..9, "
                             f"got {value!r}")
        if max(value) > len(self.positions):
            raise FieldError(f"shapes_per_image: {max(value)} shapes need as many positions, "
                             f"the config has {len(self.positions)}")

    @jitter.validator
    def _jitter(self, attribute, value):
        if not 0.0 <= value <= 0.25:
            raise FieldError(f"jitter: expected a number in [0, 0.25], got {value!r}")

    @caption_dropout.validator
    def _caption_dropout(self, attribute, value):
        if not 0.0 <= value < 1.0:
            raise FieldError(f"caption_dropout: expected a number in [0, 1), got {value!r}")

    @background.validator
    def _background(self, attribute, value):
        if len(value) != 3 or not all(0 <= v <= 255 for v in value):
            raise FieldError(f"background: expected [r, g, b] with values 0..255, got {value!r}")

    @exclude.validator
    def _exclude(self, attribute, value):
        for i, combo in enumerate(value):
            try:
                parse_combination(combo, self.colours, self.shapes, self.positions)
            except ValueError as e:
                raise FieldError(f"exclude[{i}]: {e}") from None


def parse_combination(text: str, colours, shapes, positions) -> tuple[str, str, str | None]:
    """``"red circle"`` -> ``("red", "circle", None)``; ``"red circle top left"`` adds the
    position. Raises ValueError naming what is wrong."""
    parts = text.split()
    position = " ".join(parts[2:]) or None
    if (len(parts) < 2 or parts[0] not in colours or parts[1] not in shapes
            or (position is not None and position not in positions)):
        raise ValueError(f"expected \"<colour> <shape>\" or \"<colour> <shape> <position>\" "
                         f"from colours, shapes and positions, got {text!r}")
    return parts[0], parts[1], position


def is_excluded(colour: str, shape: str, position: str, excluded) -> bool:
    """Whether ``(colour, shape, position)`` matches one of the parsed ``excluded`` entries."""
    return any(c == colour and s == shape and p in (None, position) for c, s, p in excluded)


def caption_for(attributes: dict, omit=()) -> str:
    """The caption of ``attributes``, leaving out the ``omit`` ones (colour, shape, position)."""
    words = ["a", attributes["size"]]
    if "colour" not in omit:
        words.append(attributes["colour"])
    words.append("shape" if "shape" in omit else attributes["shape"])
    if "position" not in omit:
        words.append(POSITIONS[attributes["position"]][1])
    return " ".join(words)


def render(attributes: dict | list[dict], image_size: int, *, background=(0, 0, 0),
           offset=(0.0, 0.0)) -> torch.Tensor:
    """Draw one shape (or a list of them): ``uint8 [3, S, S]``. ``offset`` shifts each by
    fractions of a cell."""
    from PIL import Image

    img = Image.new("RGB", (image_size, image_size), tuple(background))
    for obj in [attributes] if isinstance(attributes, dict) else attributes:
        _draw(img, obj, offset)
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def _draw(img, attributes: dict, offset) -> None:
    from PIL import ImageDraw

    image_size = img.size[0]
    draw = ImageDraw.Draw(img)
    cell = image_size / 3
    (row, col), _ = POSITIONS[attributes["position"]]
    cx = (col + 0.5 + offset[0]) * cell
    cy = (row + 0.5 + offset[1]) * cell
    r = SIZES[attributes["size"]] * cell / 2
    colour = PALETTE[attributes["colour"]]
    box = [cx - r, cy - r, cx + r - 1, cy + r - 1]
    shape = attributes["shape"]
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":  # apex up
        draw.polygon([(cx, cy - r), (cx + r - 1, cy + r - 1), (cx - r, cy + r - 1)], fill=colour)
    else:  # diamond
        draw.polygon([(cx, cy - r), (cx + r - 1, cy), (cx, cy + r - 1), (cx - r, cy)], fill=colour)


class ShapesDataset(torch.utils.data.Dataset):
    def __init__(self, config: ShapesConfig, image_size: int, split: str, seed: int) -> None:
        if split not in SPLITS:
            raise DataError(f"shapes: unknown split {split!r} (known: {', '.join(SPLITS)})")
        self.config, self.image_size, self.split, self.seed = config, image_size, split, seed
        excluded = [parse_combination(c, config.colours, config.shapes, config.positions)
                    for c in config.exclude]
        # every (colour, shape, position, size), in a fixed order, then those of this split
        combos = list(itertools.product(config.colours, config.shapes, config.positions,
                                        config.sizes))
        if split == "heldout" or config.only_excluded:
            self.combos = [k for k in combos if is_excluded(*k[:3], excluded)]
            if not self.combos:
                raise ConfigError("dataset.exclude: the heldout split needs at least one "
                                  "excluded combination")
        else:
            self.combos = [k for k in combos if not is_excluded(*k[:3], excluded)]
            if not self.combos:
                raise ConfigError("dataset.exclude: every combination is excluded")
        n = config.num_samples if split == "train" else config.num_eval_samples
        self.length = min(n, config.max_items) if config.max_items else n

    def __len__(self) -> int:
        return self.length

    def _rng(self, index: int) -> np.random.Generator:
        split_id = SPLITS.index(self.split)
        return np.random.default_rng([self.seed & 0xFFFFFFFF, split_id, index])

    def attributes(self, index: int) -> dict:
        """The attributes of the item's (first) shape."""
        return self.objects(index)[0]

    def objects(self, index: int) -> list[dict]:
        """The attributes of every shape of the item, in caption order."""
        if not 0 <= index < self.length:
            raise IndexError(index)
        rng = self._rng(index)
        colour, shape, position, size = self.combos[int(rng.integers(len(self.combos)))]
        objects = [{"shape": shape, "colour": colour, "position": position, "size": size}]
        counts = self.config.shapes_per_image if self.split == "train" else [1]
        if len(counts) > 1 or counts[0] > 1:  # a stream of its own: one-shape items stay as they were
            more = np.random.default_rng([self.seed & 0xFFFFFFFF, 11, index])
            want = int(counts[int(more.integers(len(counts)))])
            while len(objects) < want:
                colour, shape, position, size = self.combos[int(more.integers(len(self.combos)))]
                if all(o["position"] != position for o in objects):
                    objects.append({"shape": shape, "colour": colour, "position": position,
                                    "size": size})
        return objects

    def __getitem__(self, index: int) -> dict:
        objects = self.objects(index)
        offset = (0.0, 0.0)
        if self.config.jitter:
            j = self.config.jitter
            offset = tuple(float(v) for v in self._rng(index).uniform(-j, j, size=3)[1:])
        image = render(objects, self.image_size, background=self.config.background, offset=offset)
        item = {"caption": self.caption(index, objects), "image": image, "attributes": objects[0]}
        if len(objects) > 1:
            item["objects"] = objects
        return item

    def caption(self, index: int, objects: list[dict] | None = None) -> str:
        p = self.config.caption_dropout if self.split == "train" else 0.0
        objects = objects or self.objects(index)
        omits = [()] * len(objects)
        if p:  # a stream of its own, so the item's attributes do not change with p
            names = self.config.caption_dropout_attributes
            drop = np.random.default_rng([self.seed & 0xFFFFFFFF, 7, index]).random(
                (len(objects), len(names))) < p
            omits = [[name for name, d in zip(names, row) if d] for row in drop]
        return " and ".join(caption_for(o, omit) for o, omit in zip(objects, omits))

    def item_captions(self, index: int) -> list[str]:
        return [self.caption(index)]

    def captions(self):
        for i in range(self.length):
            yield self.caption(i)


def build(config: ShapesConfig, *, image_size: int, split: str = "train", seed: int = 0):
    return ShapesDataset(config, image_size, split, seed)
