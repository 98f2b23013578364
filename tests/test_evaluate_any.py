"""``minidalle evaluate`` on any dataset and ``training.sample_every`` previews.

One tiny folder of captioned pictures is generated; the README's "Train on your own
pictures" walk-through runs on it end to end through the command line with
``configs/folder.toml`` (train-codec, tokenizer, run with previews, evaluate, generate). The
same codec and tokenizer then serve ``coco`` (a fake COCO layout), ``codes`` (a cache from
``prepare codes``) and ``webdataset`` (tar shards) runs, each evaluated.
"""
from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from minidalle.cli import main

ROOT = Path(__file__).resolve().parents[1]
FOLDER_TOML = ROOT / "configs" / "folder.toml"
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (40, 60, 230), "yellow": (230, 220, 40)}
PLACES = {"left": (1, 5), "right": (9, 5)}
SIZE = 16

TINY = [  # configs/folder.toml shrunk to seconds
    "codec_training.image_size=16", "codec_training.ch=32", "codec_training.ch_mult=[1, 1, 1]",
    "codec_training.z_channels=8", "codec_training.n_embed=8", "codec_training.embed_dim=8",
    "codec_training.steps=3", "codec_training.batch_size=4", "codec_training.heldout=4",
    "codec_training.log_every=1", "codec_training.precision=\"fp32\"",
    "model.dim=32", "model.depth=1", "model.heads=2", "model.dim_head=16", "model.text_seq_len=12",
    "training.epochs=1", "training.max_steps=4", "training.batch_size=4", "training.warmup_steps=1",
    "training.log_every=2", "training.checkpoint_every=2", "training.sample_every=2",
    "backend.precision=\"fp32\"",
    "evaluate.heldout_images=8", "evaluate.fid_images=6", "evaluate.kid_subset_size=3",
    "evaluate.grid_prompts=2", "evaluate.grid_images=2", "evaluate.batch_size=8",
]
EVAL = ["--set", "evaluate.fid_images=6", "--set", "evaluate.heldout_images=8",
        "--set", "evaluate.grid_prompts=2", "--set", "evaluate.grid_images=2",
        "--set", "evaluate.kid_subset_size=3"]


def _picture(colour: str, place: str) -> Image.Image:
    img = Image.new("RGB", (SIZE, SIZE), (0, 0, 0))
    x, y = PLACES[place]
    ImageDraw.Draw(img).rectangle([x, y, x + 5, y + 5], fill=COLOURS[colour])
    return img


def _pairs():
    for i, (colour, place) in enumerate((c, p) for _ in range(4) for c in COLOURS for p in PLACES):
        yield f"{i:03d}", _picture(colour, place), f"a {colour} square on the {place}"


def _override(items):
    return [a for item in items for a in ("--set", item)]


class TinyFeatures(torch.nn.Module):
    """A local stand-in for Inception: mean colour and spread per channel of uint8 images."""

    num_features = 6

    def forward(self, images):
        x = images.float() / 255
        return torch.cat([x.mean((2, 3)), x.std((2, 3))], dim=1)


@pytest.fixture(scope="module")
def walkthrough(tmp_path_factory):
    """The README walk-through on a generated folder; returns (work dir, captured lines)."""
    work = tmp_path_factory.mktemp("own")
    pictures = work / "my_pictures"
    pictures.mkdir()
    for key, img, caption in _pairs():
        img.save(pictures / f"{key}.png")
        (pictures / f"{key}.txt").write_text(caption + "\n", encoding="utf-8")
    config = work / "folder.toml"
    shutil.copy(FOLDER_TOML, config)
    sets = _override(TINY + [f"dataset.root=\"{pictures}\"", "dataset.val_fraction=0.25"])
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        import contextlib

        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(["train-codec", str(config), *sets]) == 0
            assert main(["tokenizer", "train", str(config), *sets, "--vocab-size", "40",
                         "--out", "output/folder/tokenizer.yttm"]) == 0
            assert main(["run", str(config), *sets]) == 0
            assert main(["evaluate", "output/folder", *EVAL]) == 0
            assert main(["generate", "--checkpoint", "output/folder", "--text", "a red square on the left",
                         "--num-images", "2", "--out", "generated"]) == 0
    return work, config, sets, out.getvalue()


def _not_blank(path: Path, min_size: int):
    with Image.open(path) as img:
        img.load()
        assert min(img.size) >= min_size, img.size
        pixels = torch.from_numpy(np.asarray(img.convert("L"), dtype=np.float32))
    assert pixels.std() > 5, f"{path} looks blank"  # labels and pictures, not one flat colour
    return img.size


def test_walkthrough_previews_evaluate_and_generate(walkthrough):
    work, _, _, printed = walkthrough
    run = work / "output" / "folder"
    previews = sorted((run / "samples").glob("step-*.png"))
    assert [p.name for p in previews] == ["step-00000002.png", "step-00000004.png"]
    for p in previews:
        _not_blank(p, 2 * SIZE)
    assert not list((run / "samples").glob("*.tmp"))
    assert "Preview step 2:" in printed and " s -> " in printed
    assert f"Last preview: {Path('output/folder/samples/step-00000004.png')}" in printed

    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["dataset"] == "folder" and metrics["heldout"]["source"] == "the dataset's val split"
    h = metrics["heldout_loss"]
    assert 0 < h["text_loss"] and 0 < h["image_loss"]
    assert h["bits_per_image_token"] == pytest.approx(h["image_loss"] / 0.693147, rel=1e-3)
    c = metrics["codec"]
    assert c["psnr"] > 0 and -1 <= c["ssim"] <= 1 and 0 < c["usage"] <= 1 and c["perplexity"] >= 1
    assert "fid_weights" in metrics["fid"]["skipped"]  # no weights given: says how
    assert "clip_weights" in metrics["clip"]["skipped"]
    assert "FID/KID: skipped: no evaluate.fid_weights" in printed
    assert len(metrics["grid"]["prompts"]) == 2 and metrics["grid"]["prompt_source"] == "held-out captions"
    _not_blank(run / "evaluate_grid.png", 2 * SIZE)
    assert (run / "loss.png").is_file() and metrics["loss"]["steps"] == 4
    assert len(list((work / "generated").glob("*.png"))) >= 2


def test_fid_kid_with_an_injected_feature_extractor(walkthrough, monkeypatch):
    from minidalle.recipes.evaluation import evaluate_run

    work, _, _, _ = walkthrough
    monkeypatch.chdir(work)  # the config's paths are relative to it
    lines = []
    metrics = evaluate_run(Path("output/folder"), fid_features=TinyFeatures(), log=lines.append)
    f = metrics["fid"]
    assert f["fid"] >= 0 and f["generated_images"] == f["real_images"] == 6
    assert f["features"] == "TinyFeatures" and f["real"] == "held-out images"
    assert any(line.startswith("FID ") for line in lines)
    # the same images against themselves: FID ~ 0, so the number depends on the images
    from minidalle.recipes.image_metrics import fid_kid

    real = torch.stack([torch.from_numpy(np.array(img)).permute(2, 0, 1)
                        for _, img, _ in list(_pairs())[:8]])
    same = fid_kid(real, real, TinyFeatures(), kid_subset_size=4)
    other = fid_kid(real, torch.zeros_like(real), TinyFeatures(), kid_subset_size=4)
    assert same["fid"] < 1e-3 < other["fid"] and other["kid_mean"] > same["kid_mean"]


def test_weights_files_are_read_as_tensors_only(tmp_path):
    import pickle

    from minidalle.errors import ConfigError
    from minidalle.recipes.image_metrics import load_state_dict

    class Boom:
        def __reduce__(self):
            return (print, ("never",))

    bad = tmp_path / "bad.pth"
    bad.write_bytes(pickle.dumps({"w": Boom()}))
    with pytest.raises(ConfigError, match="evaluate.fid_weights: .*not a plain weights file"):
        load_state_dict(bad, "evaluate.fid_weights")
    with pytest.raises(ConfigError, match="no such file"):
        load_state_dict(tmp_path / "missing.pth", "evaluate.clip_weights")
    good = tmp_path / "good.pth"
    torch.save({"w": torch.ones(2)}, good)
    assert load_state_dict(good, "evaluate.fid_weights")["w"].sum() == 2


def _run_and_evaluate(work: Path, name: str, dataset: dict, sets, config: Path, extra=()):
    """Train the same tiny model on another dataset and evaluate it; returns metrics."""
    import tomli
    import tomli_w

    data = tomli.loads(config.read_text())
    data["dataset"] = dataset
    data["run"]["out_dir"] = f"output/{name}"
    path = work / f"{name}.toml"
    path.write_text(tomli_w.dumps(data))
    args = sets_without_dataset(sets)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        assert main(["run", str(path), *args, *extra]) == 0
        assert main(["evaluate", f"output/{name}", *EVAL]) == 0
    return json.loads((work / "output" / name / "metrics.json").read_text())


def sets_without_dataset(sets):
    out = []
    for flag, item in zip(sets[0::2], sets[1::2]):
        if not item.startswith("dataset."):
            out += [flag, item]
    return out


class FakeSummaryWriter:
    """Stands in for TensorBoard's writer (the package is optional): records the images."""

    images: list = []

    def __init__(self, log_dir):
        pass

    def add_scalar(self, *args):
        pass

    def add_image(self, tag, image, step):
        FakeSummaryWriter.images.append((tag, tuple(image.shape), image.dtype, step))

    def close(self):
        pass


def test_evaluate_a_coco_run(walkthrough, monkeypatch):
    import sys
    import types

    fake_tb = types.ModuleType("torch.utils.tensorboard")
    fake_tb.SummaryWriter = FakeSummaryWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake_tb)
    work, config, sets, _ = walkthrough
    root = work / "coco"
    (root / "train2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    images, annotations = [], []
    for i, (key, img, caption) in enumerate(_pairs()):
        img.save(root / "train2017" / f"{i + 1:012d}.png")
        images.append({"id": i + 1, "file_name": f"{i + 1:012d}.png"})
        annotations.append({"image_id": i + 1, "id": i + 1, "caption": caption})
    (root / "annotations" / "captions_train2017.json").write_text(
        json.dumps({"images": images, "annotations": annotations}))
    metrics = _run_and_evaluate(work, "coco", {"name": "coco", "root": str(root)}, sets, config,
                                extra=["--set", "training.val_fraction=0.25",
                                       "--set", "training.sample_every=4",
                                       "--set", "training.tensorboard=true"])
    # no val2017 here: the items training.val_fraction kept out
    assert metrics["heldout"] == {"source": "training.val_fraction of the train split", "items": 8}
    assert metrics["heldout_loss"]["items"] == 8 and metrics["codec"]["psnr"] > 0
    preview = work / "output" / "coco" / "samples" / "step-00000004.png"
    width, height = _not_blank(preview, 2 * SIZE)
    # the same grid went to TensorBoard, once (sample_every = max_steps = 4)
    assert FakeSummaryWriter.images == [("samples", (3, height, width), torch.uint8, 4)]


def test_evaluate_a_codes_run(walkthrough):
    work, config, sets, _ = walkthrough
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        assert main(["prepare", "codes", str(config), *sets, "--out", "codes", "--split", "train",
                     "--split", "val", "--no-progress"]) == 0
    metrics = _run_and_evaluate(work, "codes", {"name": "codes", "path": str(work / "codes")}, sets,
                                config)
    assert metrics["heldout"]["source"] == "the dataset's val split"
    c = metrics["codec"]
    assert c["psnr"] is None and "codes, not images" in c["skipped"] and 0 < c["usage"] <= 1
    assert metrics["heldout_loss"]["image_loss"] > 0


def test_evaluate_a_webdataset_run(walkthrough):
    pytest.importorskip("minidalle_webdataset", reason="needs the minidalle-webdataset plugin")
    work, config, sets, _ = walkthrough
    for shard, members in (("train", list(_pairs())[:24]), ("val", list(_pairs())[24:])):
        with tarfile.open(work / f"{shard}-000.tar", "w") as tar:
            for key, img, caption in members:
                buf = io.BytesIO()
                img.save(buf, format="PNG")
                for name, data in ((f"{key}.png", buf.getvalue()), (f"{key}.txt", caption.encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    metrics = _run_and_evaluate(work, "wds", {"name": "webdataset", "shards": str(work / "train-000.tar"),
                                              "val_shards": str(work / "val-000.tar")}, sets, config)
    assert metrics["dataset"] == "webdataset"
    assert metrics["heldout"] == {"source": "the dataset's val split", "items": 8}
    assert metrics["codec"]["ssim"] is not None and metrics["fid"]["skipped"]


FAKE_OPEN_CLIP = '''
import torch
from torch import nn

class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.image = nn.Linear(3, 4, bias=False)
        self.text = nn.Embedding(256, 4)
    def encode_image(self, pix):
        return self.image(pix.mean((2, 3)))
    def encode_text(self, ids):
        return self.text(ids).mean(1)

def list_models():
    return ["Tiny"]

def create_model_and_transforms(name, pretrained=None):
    assert pretrained is None  # weights are loaded by minidalle, never fetched
    import numpy as np
    to_tensor = lambda img: torch.from_numpy(np.array(img, dtype=np.float32)).permute(2, 0, 1) / 255
    return _Model(), None, to_tensor

def get_tokenizer(name):
    return lambda texts: torch.tensor([[ord(c) % 256 for c in t[:8].ljust(8)] for t in texts])
'''


def test_clip_score_loads_local_weights_into_open_clip(tmp_path, monkeypatch):
    """The open_clip glue, with a stand-in open_clip package (the real one is optional)."""
    import importlib
    import sys

    (tmp_path / "open_clip").mkdir()
    (tmp_path / "open_clip" / "__init__.py").write_text(FAKE_OPEN_CLIP)
    monkeypatch.syspath_prepend(str(tmp_path))
    # setitem first: its undo removes the stand-in again (later tests ask whether open_clip
    # is installed), whereas delitem of an absent key would leave the import behind
    monkeypatch.setitem(sys.modules, "open_clip", None)
    del sys.modules["open_clip"]
    fake = importlib.import_module("open_clip")
    from safetensors.torch import save_file

    from minidalle.errors import ConfigError
    from minidalle.recipes.image_metrics import clip_score

    model = fake._Model()
    with torch.no_grad():
        model.image.weight.fill_(1.0)  # with these weights every image embeds to (s, s, s, s)
        model.text.weight.fill_(1.0)  # and every caption to (1, 1, 1, 1): cosine 1
    weights = tmp_path / "clip.safetensors"
    save_file(model.state_dict(), str(weights))
    images = torch.full((2, 3, 8, 8), 200, dtype=torch.uint8)
    result = clip_score(["a red square", "a cat"], images, weights=weights, model_name="Tiny")
    assert result["clip_score"] == pytest.approx(100.0, abs=1e-3) and result["images"] == 2
    with pytest.raises(ConfigError, match="evaluate.clip_model: unknown"):
        clip_score(["x"], images[:1], weights=weights, model_name="ViT-H-14")
    save_file({"other": torch.ones(1)}, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(ConfigError, match="does not fit Tiny"):
        clip_score(["x"], images[:1], weights=tmp_path / "wrong.safetensors", model_name="Tiny")
