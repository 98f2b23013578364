"""The `vqgan` codec: taming-format checkpoints in and out, errors, and the conformance kit."""
from __future__ import annotations

import sys
import textwrap

import pytest
import torch
import yaml

from minidalle.components.codecs.vqgan import VQGAN, find_config_path, load_vqgan, save_vqgan
from minidalle.errors import CheckpointError
from minidalle.plugin.discovery import load_registry
from minidalle.testing.codec import check_codec, sample_images

DD = dict(double_z=False, z_channels=8, resolution=16, in_channels=3, out_ch=3, ch=32,
          ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[8], dropout=0.0)
N_EMBED, EMBED_DIM = 16, 8


def taming_yaml_text(dd=DD, n_embed=N_EMBED, embed_dim=EMBED_DIM, target="taming.models.vqgan.VQModel"):
    """A model YAML laid out as taming's public configs are (with a real lossconfig)."""
    return yaml.safe_dump({"model": {
        "base_learning_rate": 4.5e-6, "target": target,
        "params": {"embed_dim": embed_dim, "n_embed": n_embed, "ddconfig": dd,
                   "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
                                  "params": {"disc_conditional": False, "disc_in_channels": 3,
                                             "disc_start": 250001, "disc_weight": 0.8,
                                             "codebook_weight": 1.0}}}}})


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = VQGAN(DD, N_EMBED, EMBED_DIM)
    with torch.no_grad():  # a codebook with spread, unlike taming's tiny uniform init
        m.quantize.embedding.weight.normal_()
    return m


def write_taming(tmp_path, model, name="last.ckpt", yaml_name=None, extra=None):
    """Save as taming/pytorch-lightning do: state_dict with loss.* keys, plus bookkeeping."""
    sd = dict(model.state_dict())
    sd["loss.discriminator.main.0.weight"] = torch.randn(4, 3, 4, 4)
    sd["loss.perceptual_loss.lin0.model.1.weight"] = torch.randn(1, 4, 1, 1)
    ckpt = tmp_path / name
    tmp_path.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 3, "global_step": 1234, "state_dict": sd, **(extra or {})}, ckpt)
    ypath = tmp_path / (yaml_name or (ckpt.stem + ".yaml"))
    ypath.parent.mkdir(parents=True, exist_ok=True)
    ypath.write_text(taming_yaml_text())
    return ckpt


def test_taming_checkpoint_loads_through_registry(tmp_path, model):
    ckpt = write_taming(tmp_path, model)
    codec = load_registry("none").build("codec", "vqgan", {"path": str(ckpt)})
    assert (codec.image_size, codec.fmap_size, codec.num_tokens) == (16, 8, N_EMBED)
    own = model.state_dict()
    loaded = codec.state_dict()
    assert set(loaded) == set(own) and not any(k.startswith("loss.") for k in loaded)
    for k in own:
        assert torch.equal(loaded[k], own[k]), k
    # frozen: no gradients, and it stays in eval mode when a parent calls .train()
    assert not any(p.requires_grad for p in codec.parameters())
    codec.train()
    assert not codec.training
    images = sample_images(3, 16)
    codes = codec.encode(images)
    assert codes.shape == (3, 64) and codes.dtype == torch.int64
    assert 0 <= int(codes.min()) and int(codes.max()) < N_EMBED
    out = codec.decode(codes)
    assert out.shape == (3, 3, 16, 16) and 0 <= float(out.min()) and float(out.max()) <= 1
    with pytest.raises(ValueError, match=r"expected images \[B, 3, 16, 16\]"):
        codec.encode(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"codes must be in \[0, 16\)"):
        codec.decode(torch.full((1, 64), 16))
    # the same numbers as the network it was saved from ([0,1] in, [-1,1] inside)
    with torch.no_grad():
        z = model.quant_conv(model.encoder(images * 2 - 1))
        _, _, (_, _, idx) = model.quantize(z)
    assert torch.equal(codes.flatten(), idx.flatten())
    assert torch.allclose(out, ((model.decode_latent(model.embed_codes(codes)) + 1) / 2).clamp(0, 1),
                          atol=1e-5)


def test_conformance_kit_passes_on_vqgan(tmp_path, model):
    ckpt = write_taming(tmp_path, model)
    report = check_codec(load_vqgan(ckpt), min_stable=0.0)
    assert report["batch_agreement"] >= 0.98 and 0 <= report["stable"] <= 1


class _BrokenRange(torch.nn.Module):
    """Decodes to [-1, 1] instead of [0, 1]: the kit must catch it."""

    def __init__(self, codec):
        super().__init__()
        self.codec = codec
        self.image_size, self.num_tokens, self.fmap_size = codec.image_size, codec.num_tokens, codec.fmap_size

    def encode(self, images):
        return self.codec.encode(images)

    def decode(self, codes):
        return self.codec.decode(codes) * 2 - 1


class _BatchDependent(_BrokenRange):
    def encode(self, images):
        codes = self.codec.encode(images)
        return (codes + images.shape[0]) % self.num_tokens  # depends on the batch size


class _Int32(_BrokenRange):
    def encode(self, images):
        return self.codec.encode(images).int()


@pytest.mark.parametrize("wrapper, message", [
    (_BrokenRange, "values in \\[0, 1\\]"),
    (_BatchDependent, "depends on the rest of the batch"),
    (_Int32, "int64"),
])
def test_conformance_kit_catches_broken_codecs(tmp_path, model, wrapper, message):
    codec = wrapper(load_vqgan(write_taming(tmp_path, model)))
    with pytest.raises(AssertionError, match=message):
        check_codec(codec, min_stable=0.0)


def test_conformance_kit_requires_round_trip_stability(tmp_path, model):
    codec = load_vqgan(write_taming(tmp_path, model))
    with pytest.raises(AssertionError, match="encode\\(decode\\(codes\\)\\)"):
        check_codec(codec, min_stable=1.01)


def test_saved_format_is_taming_and_weights_only(tmp_path, model):
    ckpt, ypath = save_vqgan(model, tmp_path / "out" / "codec.ckpt", meta={"global_step": 7})
    assert ypath == tmp_path / "out" / "codec.yaml"
    blob = torch.load(ckpt, weights_only=True)
    assert blob["global_step"] == 7 and set(blob["state_dict"]) == set(model.state_dict())
    params = yaml.safe_load(ypath.read_text())["model"]["params"]
    assert params["ddconfig"] == DD and params["n_embed"] == N_EMBED and params["embed_dim"] == EMBED_DIM
    assert yaml.safe_load(ypath.read_text())["model"]["target"] == "taming.models.vqgan.VQModel"
    assert not list((tmp_path / "out").glob("*.tmp"))  # written through temp files
    assert torch.equal(load_vqgan(ckpt).quantize.embedding.weight, model.quantize.embedding.weight)


def test_config_found_in_public_layouts(tmp_path, model):
    # taming's logs (and the public ImageNet f16-1024 download): checkpoints/last.ckpt + configs/model.yaml
    ckpt = write_taming(tmp_path / "checkpoints", model, yaml_name="../configs/model.yaml")
    assert find_config_path(ckpt) == tmp_path / "configs" / "model.yaml"
    assert load_vqgan(ckpt).num_tokens == N_EMBED
    # DALLE-pytorch's cache names: vqgan.1024.model.ckpt + vqgan.1024.config.yml
    d = tmp_path / "dp"
    d.mkdir()
    ckpt = write_taming(d, model, name="vqgan.16.model.ckpt", yaml_name="vqgan.16.config.yml")
    assert find_config_path(ckpt).name == "vqgan.16.config.yml"
    # model.yaml in the same folder; and an explicit config_path
    d = tmp_path / "same"
    ckpt = write_taming(d, model, name="weights.ckpt", yaml_name="model.yaml")
    assert find_config_path(ckpt).name == "model.yaml"
    explicit = tmp_path / "elsewhere.yaml"
    explicit.write_text(taming_yaml_text())
    codec = load_registry("none").build("codec", "vqgan", {"path": str(ckpt), "config_path": str(explicit)})
    assert codec.num_tokens == N_EMBED


def test_missing_yaml_lists_what_was_tried(tmp_path, model):
    ckpt = write_taming(tmp_path, model)
    (tmp_path / "last.yaml").unlink()
    with pytest.raises(CheckpointError, match=r"last\.ckpt: no taming YAML config found .*model\.yaml.*config_path"):
        load_vqgan(ckpt)


def test_lightning_objects_load_without_running_their_code(tmp_path, model, monkeypatch):
    """Public .ckpt files pickle pytorch-lightning callbacks; they must load, inertly."""
    pkg = tmp_path / "pkgs"
    pkg.mkdir()
    marker = tmp_path / "code-ran"
    (pkg / "fake_lightning.py").write_text(textwrap.dedent(f"""
        def touch(path):
            open(path, "w").write("ran")
            return 0

        class ModelCheckpoint:
            def __init__(self):
                self.best_model_score = 0.5

            def __setstate__(self, state):
                touch({str(marker)!r})

        class Evil:
            def __reduce__(self):
                return (touch, ({str(marker)!r},))
    """))
    monkeypatch.syspath_prepend(str(pkg))
    import fake_lightning

    extra = {"callbacks": {fake_lightning.ModelCheckpoint: {"best_model_path": "x"}},
             "hparams": fake_lightning.ModelCheckpoint(), "evil": fake_lightning.Evil()}
    ckpt = write_taming(tmp_path, model, extra=extra)
    assert not marker.exists()
    codec = load_vqgan(ckpt)
    assert not marker.exists(), "loading ran code from the checkpoint"
    assert torch.equal(codec.quantize.embedding.weight, model.quantize.embedding.weight)
    sys.modules.pop("fake_lightning", None)


def test_truncated_and_garbage_checkpoints(tmp_path, model):
    ckpt = write_taming(tmp_path, model)
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"last\.ckpt: not a readable PyTorch checkpoint"):
        load_vqgan(ckpt)
    ckpt.write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(CheckpointError, match=r"last\.ckpt: not a readable PyTorch checkpoint"):
        load_vqgan(ckpt)
    torch.save([torch.zeros(2)], ckpt)
    with pytest.raises(CheckpointError, match="'state_dict' of tensors"):
        load_vqgan(ckpt)
    with pytest.raises(CheckpointError, match=r"nothing\.ckpt: codec checkpoint not found"):
        load_vqgan(tmp_path / "nothing.ckpt")


def test_missing_and_mismatched_keys_are_named(tmp_path, model):
    ckpt = write_taming(tmp_path, model)
    blob = torch.load(ckpt, weights_only=True)
    del blob["state_dict"]["quantize.embedding.weight"]
    del blob["state_dict"]["post_quant_conv.bias"]
    torch.save(blob, ckpt)
    with pytest.raises(CheckpointError, match=r"missing 2 key\(s\): post_quant_conv\.bias, quantize\.embedding\.weight"):
        load_vqgan(ckpt)
    ckpt = write_taming(tmp_path, model)
    (tmp_path / "last.yaml").write_text(taming_yaml_text(n_embed=32))
    with pytest.raises(CheckpointError, match=r"quantize\.embedding\.weight: shape \(16, 8\) in the checkpoint, \(32, 8\)"):
        load_vqgan(ckpt)


@pytest.mark.parametrize("text, message", [
    ("model: [unclosed", "invalid YAML"),
    (taming_yaml_text().replace("n_embed: 16", "n_embeds: 16"), "model.params.n_embed: missing"),
    (taming_yaml_text(target="taming.models.vqgan.GumbelVQ"), "model.target: only taming.models.vqgan.VQModel"),
    (taming_yaml_text(dd={**DD, "resolution": 15}), "ddconfig.resolution: expected a positive multiple of 2"),
    (taming_yaml_text(dd={k: v for k, v in DD.items() if k != "z_channels"}), "ddconfig.z_channels: missing"),
])
def test_bad_yaml_is_a_one_line_error(tmp_path, model, text, message):
    ckpt = write_taming(tmp_path, model)
    (tmp_path / "last.yaml").write_text(text)
    with pytest.raises(CheckpointError, match=message) as info:
        load_vqgan(ckpt)
    assert "\n" not in str(info.value) and "last.yaml" in str(info.value)


def test_config_requires_path():
    from minidalle.errors import ConfigError

    with pytest.raises(ConfigError, match="codec"):
        load_registry("none").get("codec", "vqgan").make_config({"config_path": "x"}, where="codec")


def test_colour_blind_structure_codebook_round_trips_and_factorises_codes(tmp_path):
    """A codec with a second, colour-blind codebook: codes are (colour, structure) pairs,
    the structure encoder sees only max(R, G, B), and the YAML records it so it reloads."""
    torch.manual_seed(0)
    m = VQGAN(DD, 4, EMBED_DIM, structure={"n_embed": 6, "embed_dim": 4})
    for book in m.codebooks():
        with torch.no_grad():
            book.normal_()
    assert (m.num_tokens, m.token_factors) == (24, (4, 6))
    x = torch.rand(3, 3, 16, 16)
    codes = m.encode(x)
    assert codes.shape == (3, 64) and 0 <= codes.min() and codes.max() < 24
    colour, structure = m.split_codes(codes)
    assert torch.equal(colour * 6 + structure, codes) and torch.equal(m.join_codes([colour, structure]), codes)
    # the structure codes see no hue: a channel permutation keeps max(R, G, B) and the codes
    assert torch.equal(m.split_codes(m.encode(x[:, [2, 0, 1]]))[1], structure)
    # the colour codes see no outline: a patch one red pixel touches and a patch red fills
    # (same chroma) get the same colour code; a green patch another
    img = torch.zeros(1, 3, 16, 16)
    img[0, :, 0:2, 0:2] = torch.tensor([0.9, 0.1, 0.1]).view(3, 1, 1)  # patch (0, 0) filled
    img[0, :, 2, 3] = torch.tensor([0.9, 0.1, 0.1])                   # one pixel of patch (1, 1)
    img[0, :, 4:6, 0:2] = torch.tensor([0.1, 0.9, 0.1]).view(3, 1, 1)  # patch (2, 0), green
    colours = m.split_codes(m.encode(img))[0].view(8, 8)
    assert colours[0, 0] == colours[1, 1]
    torch.testing.assert_close(m.chroma(img * 2 - 1)[0, :, 0, 0], m.chroma(img * 2 - 1)[0, :, 1, 1], atol=1e-2, rtol=0)
    assert not torch.allclose(m.chroma(img * 2 - 1)[0, :, 2, 0], m.chroma(img * 2 - 1)[0, :, 0, 0])
    # the decoder reads both codebooks' vectors
    z_q = m.embed_codes(codes)
    assert z_q.shape == (3, EMBED_DIM + 4, 8, 8)
    assert torch.equal(z_q[:, EMBED_DIM:], m.structure_quantize.embedding.weight[structure].view(3, 8, 8, 4).permute(0, 3, 1, 2))

    ckpt, yaml_path = save_vqgan(m, tmp_path / "fact.ckpt")
    assert yaml.safe_load(yaml_path.read_text())["model"]["params"]["structure"] == {"n_embed": 6, "embed_dim": 4}
    loaded = load_vqgan(ckpt)
    assert loaded.token_factors == (4, 6) and torch.equal(loaded.encode(x), codes)
    assert torch.allclose(loaded.decode(codes), m.decode(codes))
    check_codec(loaded, min_stable=0.0)

    bad = yaml.safe_load(yaml_path.read_text())
    bad["model"]["params"]["structure"] = {"n_embed": 0, "embed_dim": 4}
    yaml_path.write_text(yaml.safe_dump(bad))
    with pytest.raises(CheckpointError, match="model.params.structure: expected"):
        load_vqgan(ckpt)


def test_patch_structure_encoder_codes_a_patch_the_same_anywhere(tmp_path):
    """``structure = {..., "encoder": "patch"}``: each outline code comes from its own patch
    alone, so the same patch gets the same code in any position and beside anything; the
    choice is saved in the YAML, and an unknown encoder there is a one-line error."""
    torch.manual_seed(0)
    m = VQGAN(DD, 4, EMBED_DIM, structure={"n_embed": 6, "embed_dim": 4, "encoder": "patch"})
    for book in m.codebooks():
        with torch.no_grad():
            book.normal_()
    blob = torch.rand(3, 2, 2)                      # one 2x2-pixel patch (fmap 8 of 16 px)
    img = torch.rand(1, 3, 16, 16)                  # random surroundings
    img[0, :, 0:2, 0:2] = blob
    img[0, :, 10:12, 6:8] = blob
    structure = m.split_codes(m.encode(img))[1].view(8, 8)
    assert structure[0, 0] == structure[5, 3]
    # a conv encoder's code would depend on the neighbours: change them, the code stays
    img2 = img.clone()
    img2[0, :, 2:4, :] = 1 - img2[0, :, 2:4, :]
    assert m.split_codes(m.encode(img2))[1].view(8, 8)[0, 0] == structure[0, 0]

    ckpt, yaml_path = save_vqgan(m, tmp_path / "patch.ckpt")
    saved = yaml.safe_load(yaml_path.read_text())
    assert saved["model"]["params"]["structure"] == {"n_embed": 6, "embed_dim": 4, "encoder": "patch"}
    loaded = load_vqgan(ckpt)
    assert loaded.structure["encoder"] == "patch" and torch.equal(loaded.encode(img), m.encode(img))
    check_codec(loaded, min_stable=0.0)

    saved["model"]["params"]["structure"]["encoder"] = "transformer"
    yaml_path.write_text(yaml.safe_dump(saved))
    with pytest.raises(CheckpointError, match="model.params.structure.encoder: expected one of conv, patch"):
        load_vqgan(ckpt)


@pytest.mark.cpu_paths
def test_codes_do_not_depend_on_the_callers_autocast():
    """The transformer's training forward encodes its images under the backend's autocast;
    evaluation and priming encode in fp32. Both must give the same codes."""
    torch.manual_seed(0)
    m = VQGAN(DD, 4, EMBED_DIM, structure={"n_embed": 64, "embed_dim": 4, "encoder": "patch"})
    for book in m.codebooks():
        with torch.no_grad():
            book.normal_(std=0.05)  # close entries: bf16 latents would pick other ones
    x = torch.rand(8, 3, 16, 16)
    plain = m.encode(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(m.encode(x), plain)
