"""Tests for the webdataset plugin on small shards written here."""
from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import tarfile

import pytest
import torch
from PIL import Image

import minidalle_webdataset
from minidalle.api import DataError, load_registry
from minidalle_webdataset.dataset import WebDatasetConfig, build

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "white": (255, 255, 255)}


def _image_bytes(colour, fmt="PNG", size=(24, 16)):
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=fmt)
    return buf.getvalue()


def write_shard(path, members):
    """``members``: (name, bytes) in order."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def shards(tmp_path):
    """Two good shards (png + txt, jpg + json, webp) and one with broken members."""
    write_shard(tmp_path / "shard-000.tar", [
        ("s000.png", _image_bytes(COLOURS["red"])), ("s000.txt", b"a red square\n"),
        ("s001.jpg", _image_bytes(COLOURS["green"], "JPEG")),
        ("s001.json", json.dumps({"caption": "a green square", "id": 1}).encode()),
    ])
    write_shard(tmp_path / "shard-001.tar", [
        ("dir/s002.txt", b"a blue square\nthe colour blue\n"),  # caption first, two captions
        ("dir/s002.webp", _image_bytes(COLOURS["blue"], "WEBP")),
    ])
    write_shard(tmp_path / "shard-002.tar", [
        ("b000.png", b"this is not a png"), ("b000.txt", b"a corrupt image"),
        ("b001.png", _image_bytes(COLOURS["white"])),  # no caption
        ("b002.png", _image_bytes(COLOURS["white"])), ("b002.json", b"{not json"),
        ("b003.png", _image_bytes(COLOURS["white"])), ("b003.txt", b"   \n"),  # empty caption
        ("b004.png", _image_bytes(COLOURS["white"])), ("b004.txt", b"a white square"),
    ])
    return tmp_path


def make(shards, pattern, image_size=8, **kw):
    return build(WebDatasetConfig(shards=str(shards / pattern), **kw), image_size=image_size)


def test_items_follow_the_dataset_interface(shards):
    ds = make(shards, "shard-{000..001}.tar", image_size=8)
    assert len(ds) == 3
    for i, colour in enumerate(("red", "green", "blue")):
        item = ds[i]
        assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, 8, 8)
        assert item["caption"] in {f"a {colour} square", "the colour blue"}
        pixel = item["image"][:, 4, 4].tolist()
        assert all(abs(a - b) < 40 for a, b in zip(pixel, COLOURS[colour])), (colour, pixel)
    assert ds[2]["key"] == "shard-001.tar/dir/s002"
    assert list(ds.captions()) == ["a red square", "a green square", "a blue square",
                                   "the colour blue"]
    with pytest.raises(IndexError):
        ds[3]


def test_reads_shards_written_by_the_webdataset_package(tmp_path):
    wds = pytest.importorskip("webdataset", reason="needs the webdataset package")
    pattern = str(tmp_path / "wds-%03d.tar")
    with wds.ShardWriter(pattern, maxcount=2, verbose=0) as sink:
        for i, colour in enumerate(("red", "green", "blue")):
            sample = {"__key__": f"item{i:04d}", "png": _image_bytes(COLOURS[colour])}
            if i == 1:
                sample["json"] = {"caption": f"a {colour} square"}
            else:
                sample["txt"] = f"a {colour} square"
            sink.write(sample)
    ds = make(tmp_path, "wds-{000..001}.tar", image_size=8)
    assert [ds[i]["caption"] for i in range(len(ds))] == ["a red square", "a green square",
                                                          "a blue square"]
    assert ds[2]["key"] == "wds-001.tar/item0002"


def test_resize_and_centre_crop(shards, tmp_path):
    # 32x16 image: left half black, right half white -> centre crop keeps both halves.
    img = Image.new("RGB", (32, 16), (0, 0, 0))
    img.paste((255, 255, 255), (16, 0, 32, 16))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    write_shard(tmp_path / "wide.tar", [("w.png", buf.getvalue()), ("w.txt", b"half and half")])
    image = make(tmp_path, "wide.tar", image_size=8)[0]["image"]
    assert image.shape == (3, 8, 8)
    assert image[:, :, 0].max() < 30 and image[:, :, -1].min() > 225


def test_corrupt_members_are_skipped_with_warnings(shards, caplog):
    with caplog.at_level(logging.WARNING, logger="minidalle.webdataset"):
        ds = make(shards, "shard-002.tar")
    # b000 (bad image, read-time) and b004 survive indexing; b001..b003 are skipped.
    assert len(ds) == 2
    assert "bad caption" in caplog.text and "without both an image and a caption" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="minidalle.webdataset"):
        item = ds[0]  # b000 does not decode: the next readable sample comes back
    assert item["caption"] == "a white square"
    assert "b000" in caplog.text and "cannot be decoded" in caplog.text
    assert list(ds.captions()) == ["a corrupt image", "a white square"]


def test_truncated_shard_keeps_the_samples_before_the_damage(shards, tmp_path, caplog):
    data = (shards / "shard-000.tar").read_bytes()
    with tarfile.open(shards / "shard-000.tar") as tar:
        jpg = tar.getmember("s001.jpg")
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: jpg.offset_data + jpg.size // 2])  # cut inside the second image
    with caplog.at_level(logging.WARNING, logger="minidalle.webdataset"):
        ds = make(tmp_path, "cut.tar")
    assert len(ds) == 1 and ds[0]["caption"] == "a red square"
    assert "cut.tar" in caplog.text


def test_multiple_captions_choice_is_seeded_and_changes_with_epoch(shards):
    ds = make(shards, "shard-001.tar")
    seen = set()
    for epoch in range(12):
        ds.set_epoch(epoch)
        first = ds[0]["caption"]
        assert ds[0]["caption"] == first  # deterministic for one (seed, epoch, index)
        seen.add(first)
    assert seen == {"a blue square", "the colour blue"}


def test_bad_input_is_a_one_line_data_error(shards, tmp_path):
    with pytest.raises(DataError, match="dataset.shards: shard not found: .*shard-003.tar"):
        make(shards, "shard-{000..009}.tar")
    with pytest.raises(DataError, match="no file matches"):
        make(shards, "nothing-*.tar")
    with pytest.raises(DataError, match="only local shard files"):
        build(WebDatasetConfig(shards="https://example.com/a-{0..3}.tar"), image_size=8)
    (tmp_path / "text.tar").write_text("hello")
    with pytest.raises(DataError, match="text.tar: not a tar shard"):
        make(tmp_path, "text.tar")
    write_shard(tmp_path / "empty.tar", [("x.txt", b"caption only")])
    with pytest.raises(DataError, match="no complete"):
        make(tmp_path, "empty.tar")
    with pytest.raises(DataError, match="dataset.val_shards: not set"):
        build(WebDatasetConfig(shards=str(shards / "shard-000.tar")), image_size=8, split="val")


def test_splits_max_items_glob_and_json_caption_key(shards, tmp_path):
    cfg = WebDatasetConfig(shards=str(shards / "shard-00[01].tar"),
                           val_shards=str(shards / "shard-002.tar"), max_items=2)
    assert len(build(cfg, image_size=8)) == 2
    assert len(build(cfg, image_size=8, split="val")) == 2
    assert len(build(WebDatasetConfig(shards=cfg.shards, val_shards=cfg.val_shards),
                     image_size=8, split="all")) == 5
    with pytest.raises(DataError, match="unknown split 'test'"):
        build(cfg, image_size=8, split="test")
    write_shard(tmp_path / "alt.tar", [
        ("a.png", _image_bytes(COLOURS["red"])),
        ("a.json", json.dumps({"text": ["first caption", "second caption"]}).encode()),
    ])
    ds = build(WebDatasetConfig(shards=str(tmp_path / "alt.tar"), caption_key="text"), image_size=8)
    assert list(ds.captions()) == ["first caption", "second caption"]


def test_works_in_dataloader_workers(shards):
    ds = make(shards, "shard-{000..001}.tar")
    ds[0]  # opens a file handle in this process; workers must reopen their own
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2)
    batch = next(iter(loader))
    assert batch["image"].shape == (3, 3, 8, 8) and len(batch["caption"]) == 3


def test_dataset_conformance_kit(shards):
    kit = pytest.importorskip("minidalle.testing.dataset",
                              reason="needs minidalle.testing.dataset (the conformance kit)")
    registry = load_registry(autoload="none", extra_plugins=(minidalle_webdataset,))
    params = {"shards": str(shards / "shard-{000..002}.tar")}  # includes the corrupt members
    kit.check_dataset(
        lambda seed: registry.build("dataset", "webdataset", params, image_size=16, seed=seed),
        image_size=16)


def test_registered_through_the_entry_point(shards, tmp_path):
    """Installed with pip (make venv): `minidalle list` shows it with its distribution."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        version("minidalle-webdataset")
    except PackageNotFoundError:
        pytest.skip("needs minidalle-webdataset installed (make venv)")
    proc = subprocess.run([sys.executable, "-m", "minidalle", "list", "dataset", "--json"],
                          capture_output=True, text=True,
                          env={**__import__("os").environ, "MINIDALLE_PLUGINS": "minidalle-webdataset"})
    assert proc.returncode == 0, proc.stderr
    rows = {c["name"]: c for c in json.loads(proc.stdout)["components"]}
    assert rows["webdataset"]["provider"] == "minidalle-webdataset"
    assert rows["webdataset"]["version"] == minidalle_webdataset.__version__

    config = tmp_path / "wds.toml"
    config.write_text(f'[dataset]\nname = "webdataset"\nshards = "{shards}/shard-000.tar"\n'
                      "max_items = 0\n")
    proc = subprocess.run([sys.executable, "-m", "minidalle", "config", "show", str(config)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "dataset.max_items" in proc.stderr, proc.stderr
