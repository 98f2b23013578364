"""`minidalle train-codec`: a few steps on tiny data, the files it writes, dead-code restarts."""
from __future__ import annotations

import json
import types

import pytest
import torch

from minidalle import hookimpl
from minidalle.components.codecs.vqgan_training import EmaCodebook, restart_dead_codes, train_codec, usage_stats
from minidalle.components.codecs.vqgan import load_vqgan
from minidalle.api import config_from_dict
from minidalle.errors import ConfigError, DataError
from minidalle.plugin.discovery import load_registry
from minidalle.testing.codec import check_codec

SIZE = 16
COLOURS = [(230, 30, 30), (30, 200, 40), (40, 60, 230), (240, 220, 30)]


class TinySquares(torch.utils.data.Dataset):
    """A coloured square on black, at one of four places: 16 distinct images."""

    def __init__(self, image_size, n=48, codes=False):
        self.image_size, self.n, self.codes = image_size, n, codes

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if self.codes:
            return {"caption": "x", "codes": torch.zeros(16, dtype=torch.long)}
        s = self.image_size
        img = torch.zeros(3, s, s, dtype=torch.uint8)
        y, x = divmod((i // 4) % 4, 2)
        img[:, y * s // 2: y * s // 2 + s // 3, x * s // 2: x * s // 2 + s // 3] = \
            torch.tensor(COLOURS[i % 4], dtype=torch.uint8).view(3, 1, 1)
        return {"caption": f"square {i}", "image": img, "attributes": {"i": i}}

    def captions(self):
        return (f"square {i}" for i in range(self.n))


def build_tiny(*, image_size, split="train", seed=0):
    return TinySquares(image_size)


def build_tiny_codes(*, image_size, split="train", seed=0):
    return TinySquares(image_size, codes=True)


plugin = types.SimpleNamespace()


@hookimpl
def minidalle_datasets(register):
    register("tiny_squares", build_tiny, summary="test data")
    register("tiny_codes", build_tiny_codes, summary="test data (codes)")


plugin.minidalle_datasets = minidalle_datasets

TRAINING = dict(image_size=SIZE, ch=32, ch_mult=[1, 2], num_res_blocks=1, z_channels=8,
                n_embed=16, embed_dim=8, batch_size=4, heldout=8, log_every=4, restart_every=4,
                steps=12, lr=3e-3, warmup_steps=2)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def registry():
    return load_registry("none", extra_plugins=[plugin])


def make_cfg(registry, tmp_path, dataset="tiny_squares", **training):
    data = {"run": {"out_dir": str(tmp_path / "run"), "seed": 1},
            "dataset": {"name": dataset},
            "codec_training": {**TRAINING, **training}}
    return config_from_dict(data, "test.toml", registry=registry)


def test_train_codec_writes_a_loadable_taming_checkpoint_and_metrics(registry, tmp_path):
    lines = []
    metrics = train_codec(make_cfg(registry, tmp_path, steps=12), registry=registry, log=lines.append)
    out = tmp_path / "run" / "codec" / "vqgan.ckpt"
    for name in ("vqgan.ckpt", "vqgan.yaml", "vqgan.metrics.json", "vqgan.recon.png"):
        assert (out.parent / name).is_file(), name
    assert not list(out.parent.glob("*.tmp"))
    saved = json.loads((out.parent / "vqgan.metrics.json").read_text())
    assert saved == metrics
    assert 0 < metrics["usage"] <= 1 and 1 <= metrics["perplexity"] <= 16
    assert metrics["psnr"] > 5 and metrics["heldout_images"] == 8 and metrics["fmap_size"] == 8

    loss_lines = [line for line in lines if "Loss:" in line]
    assert len(loss_lines) == 3 and "img/s" in loss_lines[-1]
    losses = [float(line.split("Loss:")[1].split()[0]) for line in loss_lines]
    assert losses[-1] < losses[0], losses  # it learns

    codec = registry.build("codec", "vqgan", {"path": str(out)})
    assert (codec.image_size, codec.fmap_size, codec.num_tokens) == (SIZE, 8, 16)
    assert torch.load(out, weights_only=True)["global_step"] == 12
    # the metrics describe this checkpoint: recompute PSNR through the loaded codec
    held = torch.stack([TinySquares(SIZE)[i]["image"] for i in range(40, 48)]).float() / 255
    mse = ((codec.decode(codec.encode(held)) - held) ** 2).flatten(1).mean(1)
    assert (10 * torch.log10(1 / mse)).mean().item() == pytest.approx(metrics["psnr"], abs=0.01)
    report = check_codec(codec, held, min_stable=0.0)  # a trained codec meets the interface
    assert report["batch_agreement"] >= 0.98


@pytest.mark.parametrize("encoder", ["conv", "patch"])
def test_structure_codebook_trains_both_codebooks_and_loads_factorised(registry, tmp_path, encoder):
    lines = []
    metrics = train_codec(make_cfg(registry, tmp_path, steps=12, n_embed=4, structure_n_embed=6,
                                   structure_embed_dim=4, structure_encoder=encoder),
                          registry=registry, log=lines.append)
    assert any("codes of 4 x 6" in line for line in lines), lines
    assert metrics["num_tokens"] == 24 and len(metrics["codebook_usage"]) == 2
    assert all(0 < u <= 1 for u in metrics["codebook_usage"])
    losses = [float(line.split("Loss:")[1].split()[0]) for line in lines if "Loss:" in line]
    assert losses[-1] < losses[0], losses
    codec = registry.build("codec", "vqgan", {"path": str(tmp_path / "run" / "codec" / "vqgan.ckpt")})
    assert codec.token_factors == (4, 6) and codec.num_tokens == 24
    assert codec.structure["encoder"] == encoder
    held = torch.stack([TinySquares(SIZE)[i]["image"] for i in range(40, 48)]).float() / 255
    check_codec(codec, held, min_stable=0.0)


@pytest.mark.cpu_paths
def test_bf16_and_perceptual_loss_with_local_vgg_weights(registry, tmp_path):
    from torchvision.models.vgg import cfgs, make_layers

    vgg = tmp_path / "vgg16.pth"
    torch.save({f"features.{k}": v for k, v in make_layers(cfgs["D"][:9]).state_dict().items()}, vgg)
    metrics = train_codec(make_cfg(registry, tmp_path, steps=2, precision="bf16", threads=2,
                                   perceptual_weight=0.1, vgg_weights=str(vgg)),
                          registry=registry, log=lambda line: None)
    assert metrics["steps"] == 2 and load_vqgan(metrics["checkpoint"]).num_tokens == 16
    assert torch.get_num_threads() == 1  # `threads` applies to training only


def test_dead_code_restart_increases_usage():
    torch.manual_seed(0)
    recent = torch.randn(256, 4)  # encoder outputs around the origin
    weight = torch.nn.Parameter(torch.full((8, 4), 100.0))  # all codes far away...
    with torch.no_grad():
        weight[0] = 0.0  # ...except code 0, which therefore wins every vector

    def used():
        d = torch.cdist(recent, weight.detach())
        return usage_stats(torch.bincount(d.argmin(1), minlength=8))

    assert used()[0] == pytest.approx(1 / 8)
    opt = torch.optim.Adam([weight], lr=1e-3)
    weight.grad = torch.ones_like(weight)
    opt.step()
    counts = torch.bincount(torch.cdist(recent, weight.detach()).argmin(1), minlength=8)
    n = restart_dead_codes(weight, counts, recent, threshold=1, optimizer=opt,
                           generator=torch.Generator().manual_seed(0))
    assert n == 7
    usage, perplexity = used()
    assert usage > 0.5 and perplexity > 2
    assert (opt.state[weight]["exp_avg"][1:] == 0).all() and (opt.state[weight]["exp_avg"][0] != 0).all()
    assert torch.allclose(weight[0].detach(), torch.full((4,), -1e-3))  # the live code is untouched
    assert restart_dead_codes(weight, torch.ones(8), recent) == 0


def test_restarts_go_where_the_codebook_serves_the_data_worst():
    """k-means++ seeding: 200 outputs sit on the live code, 4 far away; the dead codes move
    to the far ones, not to the crowd that is already served."""
    g = torch.Generator().manual_seed(0)
    recent = torch.cat([torch.randn(200, 4, generator=g) * 0.01, 5 + torch.randn(4, 4, generator=g) * 0.01])
    weight = torch.zeros(3, 4)
    weight[1:] = -3.0
    n = restart_dead_codes(weight, torch.tensor([50, 0, 0]), recent, threshold=1, generator=g)
    assert n == 2 and torch.equal(weight[0], torch.zeros(4))
    assert (weight[1:] - 5).abs().max() < 0.2


def test_ema_codebook_follows_assigned_encoder_outputs():
    weight = torch.nn.Parameter(torch.zeros(4, 2))
    ema = EmaCodebook(weight, decay=0.5)
    z = torch.tensor([[2.0, 2.0], [4.0, 4.0], [-6.0, 0.0]])
    codes = torch.tensor([1, 1, 3])
    for _ in range(30):
        ema.update(z, codes)
    assert torch.allclose(weight[1].detach(), torch.tensor([3.0, 3.0]), atol=1e-3)  # mean of its two
    assert torch.allclose(weight[3].detach(), torch.tensor([-6.0, 0.0]), atol=1e-3)
    assert torch.equal(weight[0].detach(), torch.zeros(2))  # unused entries stay where they are
    with torch.no_grad():
        weight[1] = 9.0
    ema.reset(torch.tensor([False, True, False, False]))
    ema.update(z[:0], codes[:0])  # no new data: a restarted entry keeps its new value
    assert torch.allclose(weight[1].detach(), torch.tensor([9.0, 9.0]), atol=1e-3)


def test_cli_train_codec_and_its_one_line_errors(registry, tmp_path, monkeypatch, capsys):
    from minidalle import cli
    from minidalle.plugin import discovery as plugins

    monkeypatch.setattr(plugins, "_registry", registry)
    cfg = tmp_path / "c.toml"
    cfg.write_text('[run]\nout_dir = "%s"\n[dataset]\nname = "tiny_squares"\n[codec_training]\n%s\n' % (
        tmp_path / "run", "\n".join(f"{k} = {json.dumps(v)}" for k, v in TRAINING.items())))
    out = tmp_path / "elsewhere" / "c.ckpt"
    assert cli.main(["train-codec", str(cfg), "--set", "codec_training.steps=2", "--out", str(out),
                     "--set", "codec_training.codebook_update=gradient"]) == 0
    assert "Loss:" in capsys.readouterr().out
    assert out.is_file() and out.with_suffix(".yaml").is_file() and (out.parent / "c.metrics.json").is_file()

    assert cli.main(["train-codec", str(cfg), "--set", "codec_training.ch=48"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "c.toml: codec_training.ch: expected a multiple of 32" in err
    assert cli.main(["train-codec", str(cfg), "--set", "codec_training.bogus=1"]) == 2
    assert "codec_training.bogus: unknown key" in capsys.readouterr().err


@pytest.mark.parametrize("dataset, training, error, message", [
    ("tiny_squares", {"heldout": 45}, DataError, "has 48 items; train-codec needs heldout"),
    ("tiny_codes", {}, DataError, "item 0: expected 'image' uint8"),
    ("tiny_squares", {"image_size": 17}, ConfigError, "codec_training.image_size: expected a multiple of 2"),
    ("tiny_squares", {"perceptual_weight": 1.0}, ConfigError, "codec_training.vgg_weights"),
    ("tiny_squares", {"rec_loss": "l3"}, ConfigError, "codec_training.rec_loss: expected one of"),
    ("tiny_squares", {"out": "somewhere/"}, ConfigError, "codec_training.out: expected a .ckpt file path"),
    ("tiny_squares", {"structure_n_embed": 4, "structure_gain_jitter": 1.0}, ConfigError,
     "codec_training.structure_gain_jitter: expected a value in"),
])
def test_bad_settings_and_data(registry, tmp_path, dataset, training, error, message):
    with pytest.raises(error, match=message):
        train_codec(make_cfg(registry, tmp_path, dataset=dataset, **training), registry=registry,
                    log=lambda line: None)
    assert not (tmp_path / "run" / "codec").exists()  # nothing half-written
