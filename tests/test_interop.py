"""`minidalle import` / `export` without DALLE-pytorch installed: Graphcore's layout built
from its published key names, the refusals, the codec messages, the pickle safety, the
conv_like windows of both sources, and the imported run with `plan`.
(Equivalence with the real DALLE-pytorch: tests/test_interop_dalle_pytorch.py.)"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from minidalle import cli
from minidalle.components.attention import ConvLikePattern
from minidalle.config import config_from_dict
from minidalle.errors import CheckpointError, ConfigError
from minidalle.interop import dalle_pytorch as dp_interop
from minidalle.interop import graphcore
from minidalle.model import build_model

import _tiny

TEXT_VOCAB, TEXT_LEN, FMAP, NUM_CODES, DIM = 64, 6, 4, 8, 32


@pytest.fixture
def registry():
    return _tiny.use_tiny_registry()


def _minidalle_model(registry, attn_types, sandwich, conv_anchor="centre", seed=0):
    table = {"model": {"dim": DIM, "depth": len(attn_types), "heads": 2, "dim_head": 8,
                       "text_seq_len": TEXT_LEN, "text_vocab": TEXT_VOCAB, "attn_types": list(attn_types),
                       "sandwich_norm": sandwich}}
    if "conv_like" in attn_types:
        table["attention"] = {"conv_like": {"anchor": conv_anchor}}
    torch.manual_seed(seed)
    model = build_model(config_from_dict(table, registry=registry), num_image_tokens=NUM_CODES,
                        fmap_size=FMAP, registry=registry)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return model.eval()


def _graphcore_weights(model, depth, sandwich, serialize=1):
    """minidalle's weights under the names Graphcore's WrappedDALLE gives them (models/
    pipeline_dalle.py: ``self.model = DALLE(...)``; models/dalle.py and models/transformer.py:
    layers ``nn.Sequential(LayerScale(PreNorm(attn)), LayerScale(PreNorm(ff)))``, LayerScale
    ``scale`` [1, 1, dim], PreNorm ``norm``/``norm_out``/``fn``, attention ``to_qkv`` and
    ``to_out.0``, feed-forward ``net.0``/``net.3``, ``to_logits`` = (LayerNorm, Linear),
    AxialPositionalEmbedding ``weights_0`` [1, f, 1, dim] / ``weights_1`` [1, 1, f, dim])."""
    s = model.state_dict()
    g = {}
    if serialize > 1:  # SerializedEmbedding: the text table in equal slices
        for k, part in enumerate(s["text_emb.weight"].chunk(serialize)):
            g[f"model.text_emb.split_embeddings.{k}.weight"] = part.clone()
    else:
        g["model.text_emb.weight"] = s["text_emb.weight"]
    g["model.image_emb.weight"] = s["image_emb.weight"]
    g["model.text_pos_emb.weight"] = s["text_pos_emb.weight"]
    g["model.image_pos_emb.weights_0"] = s["image_pos_emb.row"][None, :, None, :]
    g["model.image_pos_emb.weights_1"] = s["image_pos_emb.col"][None, None, :, :]
    g["model.vae.quantize.embedding.weight"] = torch.randn(NUM_CODES, 4)  # not read
    for i in range(depth):
        o, t = f"transformer.layers.{i}", f"model.transformer.layers.{i}"
        g[f"{t}.0.scale"] = s[f"{o}.scale_attn"].view(1, 1, -1)
        for w in ("weight", "bias"):
            g[f"{t}.0.fn.norm.{w}"] = s[f"{o}.norm_attn.{w}"]
            if sandwich:
                g[f"{t}.0.fn.norm_out.{w}"] = s[f"{o}.post_attn_norm.{w}"]
                g[f"{t}.1.fn.norm_out.{w}"] = s[f"{o}.post_ff_norm.{w}"]
            g[f"{t}.0.fn.fn.to_out.0.{w}"] = s[f"{o}.attn.to_out.{w}"]
            g[f"{t}.1.fn.norm.{w}"] = s[f"{o}.norm_ff.{w}"]
            g[f"{t}.1.fn.fn.net.0.{w}"] = s[f"{o}.ff.proj_in.{w}"]
            g[f"{t}.1.fn.fn.net.3.{w}"] = s[f"{o}.ff.proj_out.{w}"]
        g[f"{t}.0.fn.fn.to_qkv.weight"] = s[f"{o}.attn.to_qkv.weight"]
        g[f"{t}.1.scale"] = s[f"{o}.scale_ff"].view(1, 1, -1)
    for w in ("weight", "bias"):
        g[f"model.to_logits.0.{w}"] = s[f"norm_out.{w}"]
        g[f"model.to_logits.1.{w}"] = s[f"to_logits.{w}"]
    return {k: v.clone() for k, v in g.items()}


def _graphcore_hparams(attn_types, sandwich, serialize=1):
    """train.py's dalle_params for a fresh run."""
    return dict(num_text_tokens=TEXT_VOCAB, text_seq_len=TEXT_LEN, dim=DIM, depth=len(attn_types),
                heads=2, dim_head=8, loss_img_weight=7, attn_types=tuple(attn_types), ff_dropout=0.0,
                attn_dropout=0.0, sandwich_norm=sandwich, embedding_ipu_id=0,
                embedding_serialization_factor=serialize, layers_per_ipu=[0, 0, len(attn_types), 0],
                cls_ipu_id=None, fp16=False, byteio=False)


def _batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(1, TEXT_VOCAB, (2, TEXT_LEN), generator=g)
    text[0, 2:] = 0
    return text, torch.randint(0, NUM_CODES, (2, FMAP * FMAP), generator=g)


def _graphcore_optimizer(weights):
    """models/optimization.py get_optimizer: 2+-D parameters, then 1-D ones (host Adam here)."""
    order = [k for k in weights if ".vae." not in k]
    params = {k: torch.nn.Parameter(weights[k].clone()) for k in order}
    groups = [{"params": [params[k] for k in order if params[k].dim() >= 2], "weight_decay": 0.01},
              {"params": [params[k] for k in order if params[k].dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.Adam(groups, lr=2e-4, eps=1e-6)
    for k, p in params.items():
        p.grad = torch.randn_like(p)
    opt.step()
    return opt, params


@pytest.mark.parametrize("attn_types,sandwich,serialize", [
    (("axial_row", "axial_col", "conv_like", "full"), True, 1),
    (("full", "conv_like"), False, 2)])
def test_graphcore_state_dict_imports_equal(tmp_path, registry, attn_types, sandwich, serialize):
    ours = _minidalle_model(registry, attn_types, sandwich)
    weights = _graphcore_weights(ours, len(attn_types), sandwich, serialize)
    opt, params = _graphcore_optimizer(weights)
    ckpt = tmp_path / "dalle_799.pt"
    torch.save({"hparams": _graphcore_hparams(attn_types, sandwich, serialize), "vae_params": None,
                "epoch": 799, "weights": weights, "opt_state": opt.state_dict(), "scheduler_state": None}, ckpt)
    warnings = []
    run = graphcore.import_checkpoint(ckpt, tmp_path / "run", tokenizer="tiny_chars", codec="grey",
                                      registry=registry, warn=warnings.append)
    from minidalle.train.checkpoint import load_checkpoint
    from minidalle.inference.loader import load_for_inference

    imported = load_for_inference(run, registry).model
    text, codes = _batch()
    with torch.no_grad():
        torch.testing.assert_close(imported(text, codes), ours(text, codes), rtol=0, atol=0)
    ck = load_checkpoint(run)
    if "conv_like" in attn_types:
        assert ck.config.attention["conv_like"].anchor == "centre"
    assert ck.config.training.lr == 2e-4 and ck.config.training.eps == 1e-6
    if serialize > 1:
        assert any("optimizer state dropped" in w for w in warnings)
        return
    assert not warnings, warnings
    # the Adam moments of the two groups land on the right parameters
    state = ck.training_state["optimizer"]["state"]
    names = [n for n, _ in imported.named_parameters()]
    mine = state[names.index("transformer.layers.0.scale_attn")]["exp_avg"]
    theirs = opt.state[params["model.transformer.layers.0.0.scale"]]["exp_avg"].flatten()
    assert torch.equal(mine, theirs)
    mine = state[names.index("to_logits.weight")]["exp_avg_sq"]
    assert torch.equal(mine, opt.state[params["model.to_logits.1.weight"]]["exp_avg_sq"])


def _dp_checkpoint(tmp_path, **changes):
    """A DALLE-pytorch checkpoint (train_dalle.py's dict) of a minidalle-built network."""
    from minidalle.interop import mapping
    from minidalle.plugin.discovery import get_registry

    ours = _minidalle_model(get_registry(), ("full",), False)
    pairs = mapping.name_pairs(mapping.DALLE_PYTORCH, 1, False)
    s = ours.state_dict()
    weights = {t: mapping.to_theirs(s[o], kind) for o, t, kind in pairs}
    hparams = dict(num_text_tokens=TEXT_VOCAB, text_seq_len=TEXT_LEN, dim=DIM, depth=1, heads=2,
                   dim_head=8, reversible=False, loss_img_weight=7, attn_types=("full",), ff_dropout=0.0,
                   attn_dropout=0.0, stable=False, shift_tokens=False, rotary_emb=False,
                   shared_attn_ids=None, shared_ff_ids=None, share_input_output_emb=False)
    obj = {"hparams": hparams, "vae_params": None, "vae_class_name": "VQGanVAE", "version": "1.6.6",
           "epoch": 1, "weights": weights, "opt_state": None, "scheduler_state": None}
    for key, value in changes.items():
        if key in obj:
            obj[key] = value
        else:
            obj["hparams"][key] = value
    path = tmp_path / "dalle.pt"
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("key,value", [("rotary_emb", True), ("shift_tokens", True), ("reversible", True),
                                       ("stable", True), ("sparse_attn", True),
                                       ("shared_attn_ids", (0, 0)), ("attn_types", ("sparse",)),
                                       ("future_feature", 1)])
def test_refuses_what_minidalle_lacks(tmp_path, registry, capsys, key, value):
    ckpt = _dp_checkpoint(tmp_path, **{key: value}, depth=2 if key == "shared_attn_ids" else 1)
    rc = cli.main(["import", "dalle-pytorch", str(ckpt), "--out", str(tmp_path / "run"), "--codec", "grey"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert f"hparams.{key}" in err and str(ckpt) in err
    assert not (tmp_path / "run").exists()  # nothing written


def test_absent_feature_keys_are_read_from_the_weights(tmp_path, registry, capsys):
    """A checkpoint from before rotary_emb / shift_tokens existed has neither key: the
    weights tell (DALLE.__init__'s defaults, both on, would misreport it)."""
    ckpt = _dp_checkpoint(tmp_path)
    obj = torch.load(ckpt, weights_only=True)
    del obj["hparams"]["rotary_emb"], obj["hparams"]["shift_tokens"]
    torch.save(obj, ckpt)
    run = dp_interop.import_checkpoint(ckpt, tmp_path / "run", codec="grey", registry=registry,
                                       warn=lambda m: None)
    assert (run / "config.toml").exists()
    obj["weights"]["transformer.pos_emb"] = torch.zeros(1, 22, 6)
    torch.save(obj, ckpt)
    rc = cli.main(["import", "dalle-pytorch", str(ckpt), "--out", str(tmp_path / "run2"), "--codec", "grey"])
    err = capsys.readouterr().err
    assert rc == 2 and "hparams.rotary_emb (absent" in err


def test_codec_messages(tmp_path, registry, capsys):
    # a taming VQGAN: [codec] is vqgan, its file must be given
    ckpt = _dp_checkpoint(tmp_path)
    rc = cli.main(["import", "dalle-pytorch", str(ckpt), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and "VQGanVAE" in err and "codec.path" in err
    # a DiscreteVAE: no counterpart, say which codec to supply
    ckpt = _dp_checkpoint(tmp_path, vae_class_name="DiscreteVAE",
                          vae_params={"image_size": 16, "num_layers": 2, "num_tokens": NUM_CODES})
    rc = cli.main(["import", "dalle-pytorch", str(ckpt), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and "vae_params" in err and "--codec" in err and f"{NUM_CODES} codes on a 4x4 grid" in err
    # a config that does not fit the weights is refused in one line, nothing written
    ckpt = _dp_checkpoint(tmp_path)
    rc = cli.main(["import", "dalle-pytorch", str(ckpt), "--out", str(tmp_path / "run"), "--codec", "grey",
                   "--set", "model.heads=4"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "do not fit" in err, err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_weights_only_no_code_runs(tmp_path, capsys):
    class Payload:
        def __reduce__(self):
            return (print, ("code from the checkpoint ran",))

    path = tmp_path / "evil.pt"
    torch.save({"hparams": {}, "weights": {}, "extra": Payload()}, path)
    with pytest.raises(CheckpointError, match="weights_only"):
        dp_interop.read(path)
    assert "ran" not in capsys.readouterr().out


def test_format_mixup_and_existing_run(tmp_path, registry):
    ours = _minidalle_model(registry, ("full",), False)
    ckpt = tmp_path / "gc.pt"
    torch.save({"hparams": _graphcore_hparams(("full",), False), "vae_params": None,
                "weights": _graphcore_weights(ours, 1, False)}, ckpt)
    with pytest.raises(CheckpointError, match="import graphcore"):
        dp_interop.read(ckpt, codec="grey")
    run = graphcore.import_checkpoint(ckpt, tmp_path / "run", codec="grey", registry=registry,
                                      warn=lambda m: None)
    before = (run / "config.toml").read_bytes()
    with pytest.raises(ConfigError, match="already holds a run"):
        graphcore.import_checkpoint(ckpt, run, codec="grey", registry=registry, warn=lambda m: None)
    assert (run / "config.toml").read_bytes() == before


def test_plan_works_on_an_imported_run(tmp_path, registry, capsys):
    """Graphcore's placement becomes [backend] ipu, and `plan` plans it."""
    import json

    ours = _minidalle_model(registry, ("axial_row", "axial_col"), True)
    ckpt = tmp_path / "dalle_1.pt"
    hparams = _graphcore_hparams(("axial_row", "axial_col"), True)
    hparams.update(layers_per_ipu=[0, 1, 1, 0], cls_ipu_id=3)
    torch.save({"hparams": hparams, "vae_params": None, "weights": _graphcore_weights(ours, 2, True)}, ckpt)
    rc = cli.main(["import", "graphcore", str(ckpt), "--out", str(tmp_path / "run"), "--codec", "grey",
                   "--tokenizer", "tiny_chars"])
    assert rc == 0, capsys.readouterr().err
    capsys.readouterr()
    rc = cli.main(["plan", str(tmp_path / "run" / "config.toml"), "--dataset-size", "64", "--json",
                   "--set", "training.gradient_accumulation=8"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    plan = json.loads(out)
    assert plan["layers_per_ipu"] == [0, 1, 1, 0] and plan["output_ipu"] == 3
    assert sum(s["trainable_params"] for s in plan["stages"]) == sum(p.numel() for p in ours.parameters())
    # without IPUs: --backend cpu leaves the placement out
    rc = cli.main(["import", "graphcore", str(ckpt), "--out", str(tmp_path / "cpu"), "--codec", "grey",
                   "--backend", "cpu"])
    assert rc == 0, capsys.readouterr().err
    assert 'name = "cpu"' in (tmp_path / "cpu" / "config.toml").read_text()


def _reference_window(text_len, f, anchor, k=5, d=1):
    """Allowed image->image keys as the sources build them with F.unfold: Graphcore (centre,
    symmetric padding, keys after the query masked) and DALLE-pytorch 1.6.6 (corner: padding
    (k-1)*d above and left only)."""
    n = f * f
    idx = torch.arange(n, dtype=torch.float32).view(1, 1, f, f)
    eff = (k - 1) * d + 1
    if anchor == "centre":
        padded = F.pad(idx, (eff // 2,) * 4, value=-1)
    else:
        padded = F.pad(idx, (eff // 2 * 2, 0, eff // 2 * 2, 0), value=-1)
    keys = F.unfold(padded, k, dilation=d)[0].T  # [query, k*k] key index or -1
    allowed = torch.zeros(n, n, dtype=torch.bool)
    for q in range(n):
        for key in keys[q].long().tolist():
            if 0 <= key <= q:
                allowed[q, key] = True
    return allowed


@pytest.mark.parametrize("anchor,dilation", [("centre", 1), ("corner", 1), ("centre", 2), ("corner", 2)])
def test_conv_like_windows_match_the_sources(anchor, dilation):
    t, f = 3, 6
    mask = ConvLikePattern(5, dilation, anchor).mask(t, f)
    assert torch.equal(mask[t:, t:], _reference_window(t, f, anchor, 5, dilation))
    assert mask[t:, :t].all()  # image sees all text


def test_ipu_library_objects_become_placeholders(tmp_path, registry, monkeypatch):
    """poptorch.optim may leave its own objects in opt_state: they are read as inert
    placeholders (nothing imported or run), the rest of the checkpoint imports."""
    import sys
    import types

    fake = types.ModuleType("poptorch.optim")

    class VariableAttributes:
        def __init__(self, names):
            self.names = names

    VariableAttributes.__module__, VariableAttributes.__qualname__ = "poptorch.optim", "VariableAttributes"
    fake.VariableAttributes = VariableAttributes
    monkeypatch.setitem(sys.modules, "poptorch", types.ModuleType("poptorch"))
    monkeypatch.setitem(sys.modules, "poptorch.optim", fake)
    ours = _minidalle_model(registry, ("full",), False)
    weights = _graphcore_weights(ours, 1, False)
    opt, _ = _graphcore_optimizer(weights)
    opt_state = opt.state_dict()
    opt_state["variable_attrs"] = VariableAttributes(["weight_decay"])
    ckpt = tmp_path / "dalle_1.pt"
    torch.save({"hparams": _graphcore_hparams(("full",), False), "vae_params": None, "weights": weights,
                "opt_state": opt_state}, ckpt)
    monkeypatch.delitem(sys.modules, "poptorch.optim")
    monkeypatch.delitem(sys.modules, "poptorch")
    warnings = []
    run = graphcore.import_checkpoint(ckpt, tmp_path / "run", codec="grey", registry=registry,
                                      warn=warnings.append)
    assert any("poptorch.optim.VariableAttributes" in w for w in warnings)
    assert "poptorch" not in sys.modules  # nothing was imported
    from minidalle.train.checkpoint import load_checkpoint

    assert load_checkpoint(run).training_state["optimizer"]["state"]  # the Adam state came through
