"""Built-in datasets (shapes, folder, coco, codes) and the dataset conformance kit."""
from __future__ import annotations

import io
import json
import logging
import pickle

import pytest
import torch
from PIL import Image

from minidalle.config import FieldError
from minidalle.errors import ConfigError, DataError
from minidalle.testing.dataset import check_dataset

S = 16  # image size used throughout


def _png(path, colour, size=(24, 20)):
    Image.new("RGB", size, colour).save(path)


def _jpeg_bytes(colour=(10, 200, 30), size=(64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.effect_noise(size, 60).convert("RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


# --------------------------------------------------------------------------- shared helpers


def test_load_image_resizes_and_centre_crops(tmp_path):
    from minidalle.data import load_image

    img = Image.new("RGB", (40, 20), (255, 0, 0))
    for x in range(10, 30):  # a green middle band: only it survives the centre crop
        for y in range(20):
            img.putpixel((x, y), (0, 255, 0))
    img.save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png", 10)
    assert out.dtype == torch.uint8 and out.shape == (3, 10, 10)
    assert out[1].float().mean() > 200 and out[0].float().mean() < 40
    Image.new("L", (8, 8), 128).save(tmp_path / "grey.png")  # greyscale becomes RGB
    assert load_image(tmp_path / "grey.png", 4).shape == (3, 4, 4)
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    assert load_image(tmp_path / "bad.jpg", 4) is None
    (tmp_path / "cut.jpg").write_bytes(_jpeg_bytes()[:400])
    assert load_image(tmp_path / "cut.jpg", 4) is None


# --------------------------------------------------------------------------- shapes


def _shapes(**kw):
    from minidalle.components.datasets.shapes import ShapesConfig, build

    split = kw.pop("split", "train")
    seed = kw.pop("seed", 0)
    size = kw.pop("image_size", S)
    return build(ShapesConfig(**kw), image_size=size, split=split, seed=seed)


def test_shapes_conforms():
    check_dataset(lambda seed: _shapes(num_samples=50, seed=seed), image_size=S)
    check_dataset(lambda seed: _shapes(num_samples=50, split="heldout", exclude=["red circle"], seed=seed),
                  image_size=S)


def test_shapes_items_captions_and_seeds():
    ds = _shapes(num_samples=200, image_size=33)
    item = ds[3]
    a = item["attributes"]
    assert set(a) == {"shape", "colour", "position", "size"}
    assert item["caption"].startswith(f"a {a['size']} {a['colour']} {a['shape']} ")
    assert item["image"].shape == (3, 33, 33)
    assert list(ds.captions()) == [ds[i]["caption"] for i in range(len(ds))]
    other = _shapes(num_samples=200, image_size=33, seed=1)
    assert [ds[i]["caption"] for i in range(50)] != [other[i]["caption"] for i in range(50)]
    val = _shapes(num_samples=200, num_eval_samples=30, split="val")
    assert len(val) == 30 and [val[i]["caption"] for i in range(30)] != [ds[i]["caption"] for i in range(30)]
    assert len(_shapes(num_samples=200, max_items=7)) == 7
    # every attribute value shows up
    seen = {k: {ds[i]["attributes"][k] for i in range(len(ds))} for k in a}
    assert seen["shape"] == {"circle", "square", "triangle"} and len(seen["position"]) == 9
    assert len(seen["colour"]) == 5 and seen["size"] == {"small", "large"}


def test_shapes_exclude_and_heldout():
    exclude = ["red circle", "blue square"]
    combos = lambda ds: {(ds[i]["attributes"]["colour"], ds[i]["attributes"]["shape"]) for i in range(len(ds))}
    train = combos(_shapes(num_samples=400, exclude=exclude))
    assert not train & {("red", "circle"), ("blue", "square")} and len(train) == 5 * 3 - 2
    held = combos(_shapes(num_eval_samples=100, split="heldout", exclude=exclude))
    assert held == {("red", "circle"), ("blue", "square")}
    assert combos(_shapes(num_samples=100, exclude=exclude, only_excluded=True)) == held
    with pytest.raises(ConfigError, match="heldout split needs"):
        _shapes(split="heldout")
    with pytest.raises(DataError, match="unknown split"):
        _shapes(split="test")


def test_shapes_exclude_at_a_position():
    exclude = ["red circle top left", "blue square center"]
    triples = lambda ds: {tuple(ds[i]["attributes"][k] for k in ("colour", "shape", "position"))
                          for i in range(len(ds))}
    train = triples(_shapes(num_samples=3000, exclude=exclude, sizes=["large"]))
    withheld = {("red", "circle", "top left"), ("blue", "square", "center")}
    assert not train & withheld and len(train) == 5 * 3 * 9 - 2
    assert ("red", "circle", "top right") in train  # the pair itself is still seen elsewhere
    held = triples(_shapes(num_eval_samples=60, split="heldout", exclude=exclude))
    assert held == withheld
    with pytest.raises(FieldError, match=r"exclude\[0\]: expected"):
        _shapes(exclude=["red circle top middle"])


def test_shapes_caption_dropout():
    plain = _shapes(num_samples=300)
    dropped = _shapes(num_samples=300, caption_dropout=0.5, caption_dropout_attributes=["colour", "shape"])
    short = 0
    for i in range(300):
        a, caption = dropped[i]["attributes"], dropped[i]["caption"]
        assert a == plain[i]["attributes"]  # the same items, only the captions change
        assert caption.endswith(plain[i]["caption"].split(a["shape"])[1])  # position always kept
        short += caption != plain[i]["caption"]
        assert (a["colour"] in caption) or (a["shape"] in caption) or "shape" in caption
    assert 0.6 < short / 300 < 0.9  # 1 - 0.5 * 0.5 of them lose a word
    assert "a large shape" in "".join(dropped.captions()) or "a small shape" in "".join(dropped.captions())
    val = _shapes(split="val", caption_dropout=0.5)
    assert all(val[i]["attributes"]["colour"] in val[i]["caption"] for i in range(50))  # train only
    with pytest.raises(FieldError, match="caption_dropout: expected"):
        _shapes(caption_dropout=1.0)


def test_shapes_several_per_image():
    from minidalle.components.datasets.shapes import POSITIONS, render

    POSITION_WORDS = {name: words for name, (_, words) in POSITIONS.items()}
    size, cell = 36, 12

    exclude = ["red circle top left", "blue square center"]
    one = _shapes(num_samples=200, exclude=exclude, image_size=size)
    ds = _shapes(num_samples=200, exclude=exclude, shapes_per_image=[1, 2, 3], image_size=size)
    counts = {1: 0, 2: 0, 3: 0}
    for i in range(200):
        item = ds[i]
        objects = item.get("objects", [item["attributes"]])
        counts[len(objects)] += 1
        assert item["attributes"] == objects[0] == one[i]["attributes"]  # first shape unchanged
        assert len({o["position"] for o in objects}) == len(objects)  # one shape per cell
        assert not any((o["colour"], o["shape"], o["position"]) in
                       {("red", "circle", "top left"), ("blue", "square", "center")} for o in objects)
        clauses = item["caption"].split(" and ")
        assert len(clauses) == len(objects)
        for o, clause in zip(objects, clauses):
            assert clause == f"a {o['size']} {o['colour']} {o['shape']} {POSITION_WORDS[o['position']]}"
        # every shape is drawn: each cell analysed alone finds its shape
        for o in objects:
            alone = torch.zeros_like(item["image"])
            (r, c), _ = POSITIONS[o["position"]]
            rows, cols = slice(r * cell, (r + 1) * cell), slice(c * cell, (c + 1) * cell)
            alone[:, rows, cols] = item["image"][:, rows, cols]
            assert torch.equal(alone, render(o, size)), (i, o)
    assert all(n > 40 for n in counts.values()), counts
    val = _shapes(split="val", shapes_per_image=[2])
    assert all("objects" not in val[i] and " and " not in val[i]["caption"] for i in range(20))
    with pytest.raises(FieldError, match="shapes_per_image: expected"):
        _shapes(shapes_per_image=[0])
    with pytest.raises(FieldError, match="shapes_per_image: 3 shapes need"):
        _shapes(shapes_per_image=[3], positions=["left", "right"])


def test_shapes_config_errors(tmp_path):
    from minidalle.api import load_config

    cfg = tmp_path / "c.toml"
    cfg.write_text('[dataset]\nname = "shapes"\nexclude = ["red circle", "pink square"]\n')
    with pytest.raises(ConfigError, match=r"c.toml: dataset.exclude\[1\]: expected"):
        load_config(cfg)
    cfg.write_text('[dataset]\nname = "shapes"\ncolours = ["red", "mauve"]\n')
    with pytest.raises(ConfigError, match=r"dataset.colours\[1\]: expected one of"):
        load_config(cfg)
    cfg.write_text('[dataset]\nname = "shapes"\nnum_samples = 0\n')
    with pytest.raises(ConfigError, match="dataset.num_samples: expected a positive"):
        load_config(cfg)


def test_shapes_analyser_accuracy():
    from minidalle.recipes.quickstart.analyse import analyse

    for jitter in (0.0, 0.15):
        ds = _shapes(num_samples=500, image_size=32, jitter=jitter, seed=3)
        cfg = ds.config
        right = sum(analyse(ds[i]["image"], colours=cfg.colours, shapes=cfg.shapes) == ds[i]["attributes"]
                    for i in range(len(ds)))
        assert right / len(ds) >= 0.98, (jitter, right)
    # float images in [0, 1] (what a codec decodes to), a little blurred and noisy
    item = _shapes(num_samples=5, image_size=64)[2]
    img = item["image"].float() / 255
    img = torch.nn.functional.avg_pool2d(img[None], 3, 1, 1)[0] + 0.03 * torch.randn(img.shape)
    assert analyse(img.clamp(0, 1)) == item["attributes"]
    assert analyse(torch.zeros(3, 32, 32, dtype=torch.uint8)) is None
    # stray pixels of the shape's colour elsewhere do not move, grow or reshape it
    from minidalle.components.datasets.shapes import PALETTE

    ds = _shapes(num_samples=100, image_size=64, seed=4)
    g = torch.Generator().manual_seed(0)
    right = 0
    for i in range(len(ds)):
        item = ds[i]
        img = item["image"].clone()
        for y, x in torch.randint(0, 64, (6, 2), generator=g).tolist():
            img[:, y, x] = torch.tensor(PALETTE[item["attributes"]["colour"]])
        right += analyse(img, colours=ds.config.colours, shapes=ds.config.shapes) == item["attributes"]
    assert right >= 98, right


# --------------------------------------------------------------------------- folder


@pytest.fixture()
def folder(tmp_path):
    root = tmp_path / "pics"
    (root / "sub").mkdir(parents=True)
    _png(root / "a.png", (255, 0, 0))
    (root / "a.txt").write_text("a red square\n\n  a  red   thing \n")
    _png(root / "b.webp", (0, 0, 255))
    (root / "b.txt").write_text("a blue square\n")
    (root / "sub" / "c.jpg").write_bytes(_jpeg_bytes())
    (root / "sub" / "c.txt").write_text("noise\n")
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    (root / "corrupt.txt").write_text("a corrupt picture\n")
    (root / "cut.jpg").write_bytes(_jpeg_bytes()[:500])
    (root / "cut.txt").write_text("a truncated picture\n")
    _png(root / "nocaption.png", (0, 255, 0))
    (root / "orphan.txt").write_text("a caption without an image\n")
    _png(root / "empty.png", (9, 9, 9))
    (root / "empty.txt").write_text("\n  \n")
    return root


def _folder(root, **kw):
    from minidalle.components.datasets.folder import FolderConfig, build

    split = kw.pop("split", "train")
    seed = kw.pop("seed", 0)
    return build(FolderConfig(root=str(root), **kw), image_size=S, split=split, seed=seed)


def test_folder_counts_captions_and_skips(folder, caplog):
    with caplog.at_level(logging.WARNING, logger="minidalle.data"):
        ds = _folder(folder)
    text = caplog.text
    assert "1 images without a caption file" in text and "nocaption.png" in text
    assert "1 caption files without an image" in text and "orphan.txt" in text
    assert "1 empty caption files" in text
    assert len(ds) == 5  # a, b, corrupt, cut, sub/c (sorted by path)
    assert sorted(ds.captions()) == sorted(["a red square", "a red thing", "a blue square", "noise",
                                            "a corrupt picture", "a truncated picture"])
    first = ds[0]  # a.png
    assert first["caption"] in ("a red square", "a red thing")
    assert first["image"].shape == (3, S, S) and first["image"].dtype == torch.uint8
    assert first["image"][0].min() == 255 and first["image"][1].max() == 0
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="minidalle.data"):
        names = [ds.paths[i].rsplit("/", 1)[-1] for i in range(len(ds))]
        bad = names.index("corrupt.jpg")
        item = ds[bad]  # skipped: the next readable item (cut.jpg is bad too -> sub/c.jpg)
    assert item["caption"] == "noise"
    assert len(ds.skipper.bad) == 2 and "skipping unreadable image" in caplog.text
    check_dataset(lambda seed: _folder(folder, seed=seed), image_size=S)


def test_folder_caption_choice_is_seeded(folder):
    picks = lambda ds: [ds.pick_caption(0) for _ in range(3)]
    ds = _folder(folder)
    assert len(set(picks(ds))) == 1  # same (seed, epoch, index): same caption
    chosen = set()
    for seed in range(12):
        chosen.add(_folder(folder, seed=seed).pick_caption(0))
    assert chosen == {"a red square", "a red thing"}
    by_epoch = set()
    for epoch in range(12):
        ds.set_epoch(epoch)
        by_epoch.add(ds.pick_caption(0))
    assert by_epoch == {"a red square", "a red thing"}


def test_folder_split_and_errors(folder, tmp_path):
    train = _folder(folder, val_fraction=0.5)
    val = _folder(folder, val_fraction=0.5, split="val")
    assert len(train) + len(val) == 5 and not set(train.paths) & set(val.paths)
    assert len(_folder(folder, split="all", val_fraction=0.5)) == 5
    assert len(_folder(folder, max_items=2)) == 2
    with pytest.raises(DataError, match="folder not found"):
        _folder(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images with captions"):
        _folder(tmp_path / "empty")


def test_folder_all_unreadable_is_a_clear_error(tmp_path):
    (tmp_path / "x.jpg").write_bytes(b"junk")
    (tmp_path / "x.txt").write_text("junk\n")
    with pytest.raises(DataError, match="no readable image"):
        _folder(tmp_path)[0]


def test_folder_with_worker_processes(folder):
    ds = _folder(folder)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2,
                                         collate_fn=lambda b: b, multiprocessing_context="fork")
    items = [item for batch in loader for item in batch]
    assert len(items) == 5 and all(i["image"].shape == (3, S, S) for i in items)


# --------------------------------------------------------------------------- coco


@pytest.fixture()
def coco(tmp_path):
    root = tmp_path / "coco"
    (root / "train2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    _png(root / "train2017" / "000000000009.png", (200, 10, 10))
    (root / "train2017" / "000000000025.jpg").write_bytes(_jpeg_bytes())
    _png(root / "train2017" / "000000000030.png", (10, 10, 200))  # no captions
    images = [{"id": 9, "file_name": "000000000009.png"}, {"id": 25, "file_name": "000000000025.jpg"},
              {"id": 30, "file_name": "000000000030.png"}, {"id": 77, "file_name": "000000000077.jpg"}]
    annotations = [
        {"image_id": 9, "id": 1, "caption": "A plate of food  has potatoes\nand fruit."},
        {"image_id": 9, "id": 2, "caption": "Caf\u00c3\u00a9 food on a plate"},  # mojibake
        {"image_id": 9, "id": 3, "caption": "   "},  # empty
        {"image_id": 25, "id": 4, "caption": "A giraffe standing in the grass."},
        {"image_id": 77, "id": 5, "caption": "An image whose file is missing."},
    ]
    (root / "annotations" / "captions_train2017.json").write_text(
        json.dumps({"images": images, "annotations": annotations}))
    return root


def _coco(root, **kw):
    from minidalle.components.datasets.coco import CocoConfig, build

    split = kw.pop("split", "train")
    seed = kw.pop("seed", 0)
    return build(CocoConfig(root=str(root), **kw), image_size=S, split=split, seed=seed)


def test_coco_from_json(coco, caplog):
    with caplog.at_level(logging.WARNING, logger="minidalle.data"):
        ds = _coco(coco)
    assert "000000000077.jpg" in caplog.text and "000000000030.png" in caplog.text
    assert len(ds) == 2
    assert sorted(ds.captions()) == sorted(["A plate of food has potatoes and fruit.",
                                            "Caf\u00c3\u00a9 food on a plate",
                                            "A giraffe standing in the grass."])
    assert ds[1]["caption"] == "A giraffe standing in the grass."
    assert ds[0]["image"].shape == (3, S, S) and ds[0]["image"][0].float().mean() > 190
    check_dataset(lambda seed: _coco(coco, seed=seed), image_size=S)


def test_coco_prepare_then_read_caption_files(coco):
    pytest.importorskip("ftfy", reason="needs ftfy (pip install ftfy)")
    from minidalle.components.datasets.coco import prepare_captions

    summary = prepare_captions(coco, "train")
    assert summary["images"] == 3 and summary["captions"] == 4  # 9, 25 and the missing 77
    assert summary["empty_dropped"] == 1 and summary["fixed"] == 1
    assert summary["missing_image_files"] == 1 and summary["images_without_captions"] == 1
    lines = (coco / "train2017_captions" / "000000000009.txt").read_text(encoding="utf-8").splitlines()
    assert lines == ["A plate of food has potatoes and fruit.", "Caf\u00e9 food on a plate"]
    ds = _coco(coco)  # auto: the caption folder wins
    assert "Caf\u00e9 food on a plate" in set(ds.captions()) and len(ds) == 2
    assert "Caf\u00c3\u00a9 food on a plate" in set(_coco(coco, captions="json").captions())
    check_dataset(lambda seed: _coco(coco, seed=seed), image_size=S)
    prepare_captions(coco, "train")  # again: replaces the folder cleanly
    assert sorted(p.name for p in coco.iterdir()) == ["annotations", "train2017", "train2017_captions"]


def test_coco_errors(coco, tmp_path):
    with pytest.raises(DataError, match="val2017"):
        _coco(coco, split="val")
    with pytest.raises(DataError, match="caption folder not found"):
        _coco(coco, captions="txt")
    (coco / "annotations" / "captions_train2017.json").write_text("{not json")
    with pytest.raises(DataError, match="captions_train2017.json: cannot read COCO annotations"):
        _coco(coco)
    (coco / "annotations" / "captions_train2017.json").write_text('{"images": []}')
    with pytest.raises(DataError, match="not a COCO captions file"):
        _coco(coco)


# --------------------------------------------------------------------------- codes


class _GridCodec(torch.nn.Module):
    """A stand-in codec: mean brightness of each 4x4 cell, quantised to 8 levels."""

    image_size, fmap_size, num_tokens = S, 4, 8

    def encode(self, images):
        pooled = torch.nn.functional.adaptive_avg_pool2d(images.mean(1, keepdim=True), self.fmap_size)
        return (pooled.flatten(1) * 7.999).long()

    def decode(self, codes):
        return (codes.float() / 7).view(-1, 1, 4, 4).repeat_interleave(4, 2).repeat_interleave(4, 3).expand(-1, 3, -1, -1)


def test_codes_cache_roundtrip(tmp_path, folder):
    from minidalle.components.datasets.codes import CodesConfig, build, write_cache

    shapes = _shapes(num_samples=12)
    info = write_cache(shapes, _GridCodec(), tmp_path / "cache", "train", batch_size=5,
                       meta={"codec": {"name": "grid"}}, progress=False)
    assert info["count"] == 12 and info["fmap_size"] == 4
    ds = build(CodesConfig(path=str(tmp_path / "cache")), image_size=S)
    assert len(ds) == 12
    for i in (0, 7, 11):
        expect = _GridCodec().encode(shapes[i]["image"][None].float() / 255)[0]
        assert torch.equal(ds[i]["codes"], expect) and ds[i]["codes"].dtype == torch.long
        assert ds[i]["caption"] == shapes[i]["caption"]
        assert ds[i]["attributes"] == shapes[i]["attributes"]  # JSON-able extras travel along
    check_dataset(lambda seed: build(CodesConfig(path=str(tmp_path / "cache")), image_size=S, seed=seed),
                  image_size=S)
    assert pickle.loads(pickle.dumps(ds))._codes is None  # workers reload lazily
    assert len(build(CodesConfig(path=str(tmp_path / "cache"), max_items=3), image_size=S)) == 3

    # several captions per image are kept; the corrupt images take their neighbour's
    write_cache(_folder(folder), _GridCodec(), tmp_path / "cache", "val", progress=False)
    val = build(CodesConfig(path=str(tmp_path / "cache")), image_size=S, split="val")
    assert val.item_captions(0) == ["a red square", "a red thing"]
    assert val.item_captions(2) == ["noise"]  # corrupt.jpg -> its readable neighbour sub/c.jpg


def test_codes_cache_errors(tmp_path, caplog):
    from minidalle.components.datasets.codes import CodesConfig, build, write_cache

    cfg = CodesConfig(path=str(tmp_path / "cache"))
    with pytest.raises(DataError, match="no codes cache for split 'train'"):
        build(cfg, image_size=S)
    write_cache(_shapes(num_samples=4), _GridCodec(), tmp_path / "cache", "train", progress=False)
    with caplog.at_level(logging.WARNING, logger="minidalle.data"):
        assert len(build(cfg, image_size=32)) == 4
    assert "made for 16px images" in caplog.text
    (tmp_path / "cache" / "train.safetensors").write_bytes(b"garbage")
    with pytest.raises(DataError, match="cannot read codes"):
        build(cfg, image_size=S)[0]
    (tmp_path / "cache" / "train.json").write_text('{"format": "other"}')
    with pytest.raises(DataError, match="not a minidalle codes cache"):
        build(cfg, image_size=S)


# --------------------------------------------------------------------------- the kit itself


def _item_caption(i):
    return f"item {i}"


def _other_caption(i):
    return "other"


class _Listed(torch.utils.data.Dataset):
    def __init__(self, seed=0, dtype=torch.uint8, size=S, drift=False, caption_of=_item_caption):
        self.seed, self.dtype, self.size, self.drift = seed, dtype, size, drift
        self.caption_of = caption_of
        self.reads = 0

    def __len__(self):
        return 4

    def __getitem__(self, i):
        if not 0 <= i < 4:
            raise IndexError(i)
        self.reads += 1
        fill = (i * 10 + self.seed + (self.reads if self.drift else 0)) % 256
        return {"caption": self.caption_of(i),
                "image": torch.full((3, self.size, self.size), fill).to(self.dtype)}

    def captions(self):
        return (f"item {i}" for i in range(4))


def test_kit_passes_a_correct_dataset_and_catches_broken_ones():
    import minidalle.testing as kit

    assert kit.check_dataset is check_dataset  # lazy re-export
    check_dataset(lambda seed: _Listed(seed), image_size=S)
    for make, message in ((lambda seed: _Listed(seed, dtype=torch.float32), "uint8"),
                          (lambda seed: _Listed(seed, size=S + 1), "shape"),
                          (lambda seed: _Listed(seed, drift=True), "differ"),
                          (lambda seed: _Listed(seed, caption_of=_other_caption), "not among captions"),
                          (lambda seed: _Listed(seed, caption_of=lambda i: f"item {i}"), "must pickle")):
        with pytest.raises(AssertionError, match=message):
            check_dataset(make, image_size=S)
