"""`minidalle prepare coco|codes` and `minidalle tokenizer train` through the CLI."""
from __future__ import annotations

import json

import attrs
import pytest
import torch

from minidalle import hookimpl
from minidalle.plugin import discovery as plugins
from minidalle.cli import main


@attrs.define
class GridConfig:
    image_size: int = 16


class GridCodec(torch.nn.Module):
    """A stand-in codec: mean brightness of each 4x4 cell, quantised to 8 levels."""

    fmap_size, num_tokens = 4, 8

    def __init__(self, config: GridConfig) -> None:
        super().__init__()
        self.image_size = config.image_size
        self.calls = 0

    def encode(self, images):
        assert images.dtype == torch.float32 and 0 <= float(images.min()) and float(images.max()) <= 1
        pooled = torch.nn.functional.adaptive_avg_pool2d(images.mean(1, keepdim=True), self.fmap_size)
        return (pooled.flatten(1) * 7.999).long()

    def decode(self, codes):
        return (codes.float() / 7).view(-1, 1, 4, 4).expand(-1, 3, -1, -1)


class GridPlugin:
    @hookimpl
    def minidalle_codecs(self, register):
        register("grid", GridCodec, config=GridConfig, summary="test stand-in")


@pytest.fixture()
def registry(monkeypatch):
    reg = plugins.load_registry(autoload="none", extra_plugins=(GridPlugin(),))
    monkeypatch.setattr(plugins, "_registry", reg)
    return reg


def _config(tmp_path, body="", name="c.toml"):
    path = tmp_path / name
    path.write_text(f'[run]\nout_dir = "{tmp_path / "out"}"\nseed = 5\n'
                    '[dataset]\nname = "shapes"\nnum_samples = 20\nnum_eval_samples = 6\n'
                    '[codec]\nname = "grid"\n' + body)
    return path


def test_prepare_codes(tmp_path, registry, capsys):
    from minidalle.components.datasets.codes import CodesConfig, build
    from minidalle.components.datasets.shapes import ShapesConfig
    from minidalle.components.datasets.shapes import build as build_shapes

    cfg = _config(tmp_path)
    assert main(["prepare", "codes", str(cfg), "--batch-size", "7", "--split", "train",
                 "--split", "val", "--no-progress", "--set", "dataset.num_samples=15",
                 "--set", "training.dataloader_workers=2"]) == 0  # encoded in worker processes
    out = capsys.readouterr().out
    assert "train: 15 items, 4x4 codes of 8" in out and "val: 6 items" in out
    cache = tmp_path / "out" / "codes"
    meta = json.loads((cache / "train.json").read_text())
    assert meta["codec"] == {"name": "grid", "image_size": 16}
    assert meta["dataset"]["name"] == "shapes" and meta["seed"] == 5
    shapes = build_shapes(ShapesConfig(num_samples=15), image_size=16, seed=5)
    ds = build(CodesConfig(path=str(cache)), image_size=16, seed=5)
    assert len(ds) == 15
    codec = GridCodec(GridConfig())
    for i in range(15):
        assert torch.equal(ds[i]["codes"], codec.encode(shapes[i]["image"][None].float() / 255)[0])
        assert ds[i]["caption"] == shapes[i]["caption"]
    assert len(build(CodesConfig(path=str(cache)), image_size=16, split="val")) == 6
    # a config pointing at the cache trains from codes
    from minidalle.api import load_config

    cfg2 = tmp_path / "codes.toml"
    cfg2.write_text(f'[dataset]\nname = "codes"\npath = "{cache}"\n')
    assert load_config(cfg2).dataset.params.path == str(cache)


def test_prepare_codes_errors(tmp_path, registry, capsys):
    path = tmp_path / "nocodec.toml"
    path.write_text('[dataset]\nname = "shapes"\n')
    assert main(["prepare", "codes", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "needs a [codec] section" in err
    assert main(["prepare", "codes", str(_config(tmp_path)), "--set", "dataset.num_samples=0"]) == 2
    assert "dataset.num_samples: expected a positive" in capsys.readouterr().err


def test_prepare_coco(tmp_path, capsys):
    pytest.importorskip("ftfy", reason="needs ftfy (pip install ftfy)")
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "train2017").mkdir()
    (root / "annotations" / "captions_train2017.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "000000000001.jpg"}, {"id": 2, "file_name": "000000000002.jpg"}],
        "annotations": [{"image_id": 1, "id": 1, "caption": " A cat\u00e2\u20ac\u2122s bowl. "},
                        {"image_id": 1, "id": 2, "caption": ""},
                        {"image_id": 2, "id": 3, "caption": "Two dogs."}],
    }))
    assert main(["prepare", "coco", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "train2017: wrote 2 captions for 2 images" in out
    assert "1 captions fixed, 1 empty dropped" in out and "2 image files missing" in out
    text = (root / "train2017_captions" / "000000000001.txt").read_text(encoding="utf-8")
    assert text == "A cat's bowl.\n"  # mojibake repaired (and quotes uncurled, as ftfy does)
    assert main(["prepare", "coco", "--root", str(tmp_path / "nope")]) == 2
    assert "folder not found" in capsys.readouterr().err
    assert main(["prepare", "coco", "--root", str(tmp_path)]) == 2
    assert "no captions_train2017.json" in capsys.readouterr().err


def test_tokenizer_train(tmp_path, registry, capsys):
    pytest.importorskip("youtokentome", reason="needs youtokentome")
    from minidalle.components.tokenizers.yttm import YttmTokenizer

    model = tmp_path / "tok" / "bpe.yttm"
    cfg = _config(tmp_path)
    assert main(["tokenizer", "train", str(cfg), "--vocab-size", "64", "--out", str(model)]) == 0
    assert f"trained on 20 captions: 64 ids -> {model}" in capsys.readouterr().out
    tok = YttmTokenizer(model)
    ids = tok.encode(["a small red circle at the top left"], 20)
    assert tok.decode(ids[0]) == "a small red circle at the top left" and 1 not in ids[0].tolist()
    # defaults from the config: [tokenizer_training] and tokenizer.path
    other = tmp_path / "other.yttm"
    cfg2 = _config(tmp_path, f'[tokenizer]\nname = "yttm"\npath = "{other}"\n'
                             '[tokenizer_training]\nvocab_size = 50\n', name="c2.toml")
    assert main(["tokenizer", "train", str(cfg2)]) == 0
    assert YttmTokenizer(other).vocab_size == 50
    assert main(["tokenizer", "train", str(cfg)]) == 2
    assert "--vocab-size: expected a positive integer" in capsys.readouterr().err
