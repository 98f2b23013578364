"""minidalle against the real DALLE-pytorch 1.6.6: an imported checkpoint computes the same
logits and loss (fp32, 1e-5) for every attention type of the recipe and sandwich norm, draws
the same codes under greedy decoding, and round-trips through `minidalle export`.

DALLE-pytorch and its small pure-Python dependencies are pip-installed (``--no-deps``) into
a cache directory on first use (``$MINIDALLE_TEST_CACHE``, default ``~/.cache/minidalle-tests``);
the modules it imports at load time but never uses for code input (taming's VQGAN, requests,
...) are stubbed while it loads. The tests skip, naming the packages, only when that install fails.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from minidalle import cli
from minidalle.interop import dalle_pytorch as dp_interop
from minidalle.interop import mapping
from minidalle.inference.sampling import generate_image_codes

import _tiny
from _tiny import TinyTokenizer

PACKAGES = ("dalle-pytorch==1.6.6", "axial-positional-embedding==0.2.1",
            "rotary-embedding-torch==0.1.5", "einops")
TEXT_VOCAB, TEXT_LEN, FMAP, NUM_CODES = 64, 6, 4, 8  # TinyTokenizer's vocab, GreyCodec's codes


def _install() -> Path:
    root = Path(os.environ.get("MINIDALLE_TEST_CACHE", Path.home() / ".cache" / "minidalle-tests"))
    target = root / "dalle_pytorch-1.6.6"
    if (target / ".complete").exists():
        return target
    tmp = root / f".tmp-dalle_pytorch-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet",
                        "--disable-pip-version-check", "--target", str(tmp), *PACKAGES],
                       check=True, capture_output=True, timeout=600)
    except (subprocess.SubprocessError, OSError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        lines = (getattr(exc, "stderr", b"") or b"").decode(errors="replace").strip().splitlines()
        pytest.skip(f"needs {', '.join(PACKAGES)} (pip install --no-deps failed: "
                    f"{lines[-1] if lines else exc})")
    (tmp / ".complete").touch()
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target


class _Stub(types.ModuleType):
    """An empty module whose every (non-dunder) attribute is a placeholder class."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (), {})


@pytest.fixture(scope="module")
def dalle_pytorch():
    target = _install()
    if str(target) not in sys.path:
        sys.path.insert(0, str(target))
    stubs = ["taming.models.vqgan"]
    if importlib.util.find_spec("taming") is None:
        stubs += ["taming", "taming.models"]
    saved = {name: sys.modules.get(name) for name in stubs}
    added = []
    for name in stubs:
        sys.modules[name] = _Stub(name)
        added.append(name)
    try:
        for _ in range(30):  # stub whatever else it imports at load time and is missing here
            try:
                module = importlib.import_module("dalle_pytorch")
                break
            except ModuleNotFoundError as exc:
                if not exc.name or exc.name.startswith("dalle_pytorch"):
                    raise
                for part in _parents(exc.name):
                    if part not in sys.modules:
                        saved.setdefault(part, None)
                        sys.modules[part] = _Stub(part)
                        added.append(part)
                for name in [m for m in sys.modules if m.startswith("dalle_pytorch")]:
                    del sys.modules[name]
        else:
            pytest.skip("needs DALLE-pytorch's load-time imports")
    finally:
        for name in added:  # the stubs must not leak into other tests
            if saved.get(name) is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = saved[name]
    from dalle_pytorch.version import __version__

    assert __version__ == "1.6.6"
    return module


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _their_model(dp, attn_types, *, sandwich=False, depth=4, seed=0):
    class CodesOnly(dp.DiscreteVAE):  # passes DALLE's isinstance check; codes in, codes out
        def __init__(self):
            torch.nn.Module.__init__(self)
            self.image_size, self.num_tokens, self.num_layers, self.channels = FMAP * 4, NUM_CODES, 2, 3

        def decode(self, codes):
            return codes

    torch.manual_seed(seed)
    hparams = dict(num_text_tokens=TEXT_VOCAB, text_seq_len=TEXT_LEN, dim=32, depth=depth, heads=2,
                   dim_head=8, reversible=False, loss_img_weight=7, attn_types=tuple(attn_types),
                   ff_dropout=0.0, attn_dropout=0.0, stable=False, shift_tokens=False,
                   rotary_emb=False, shared_attn_ids=None, shared_ff_ids=None,
                   share_input_output_emb=False, sandwich_norm=sandwich)
    model = dp.DALLE(vae=CodesOnly(), **hparams)
    with torch.no_grad():  # no parameter at its initial value: every mapping error shows
        for name, p in model.named_parameters():
            if name.endswith("scale") or "norm" in name or name.startswith("to_logits.0"):
                p.add_(torch.randn_like(p) * 0.3)
    return model, hparams


def _batch(seed=1, batch=3):
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(1, TEXT_VOCAB, (batch, TEXT_LEN), generator=g)
    text[0, 3:] = 0  # padding, numbered per position
    text[1, 5:] = 0
    codes = torch.randint(0, NUM_CODES, (batch, FMAP * FMAP), generator=g)
    return text, codes


def _train_a_step(model):
    """One Adam step as train_dalle.py takes it, so opt_state is not empty."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=3e-4)
    text, codes = _batch(seed=5)
    model(text, codes, return_loss=True).backward()
    opt.step()
    return opt


def _save(model, hparams, path, opt=None):
    """As train_dalle.py's save_model does (DiscreteVAE's hparams as vae_params)."""
    torch.save({"hparams": hparams, "vae_params": {"image_size": FMAP * 4, "num_layers": 2,
                                                   "num_tokens": NUM_CODES},
                "epoch": 3, "version": "1.6.6", "vae_class_name": "DiscreteVAE",
                "weights": model.state_dict(), "opt_state": opt.state_dict() if opt else None,
                "scheduler_state": None}, path)
    return path


@pytest.fixture
def registry():
    return _tiny.use_tiny_registry()


def _import(tmp_path, ckpt, registry, name="run"):
    from minidalle.inference.loader import load_for_inference

    run = dp_interop.import_checkpoint(ckpt, tmp_path / name, tokenizer="tiny_chars", codec="grey",
                                       registry=registry, warn=lambda m: None)
    return run, load_for_inference(run, registry).model


RECIPE_TYPES = [("full",), ("axial_row",), ("axial_col",), ("conv_like",)]


@pytest.mark.parametrize("attn_types,sandwich", [(t, False) for t in RECIPE_TYPES] +
                         [(("axial_row", "axial_col", "conv_like", "full"), True)],
                         ids=["full", "axial_row", "axial_col", "conv_like", "all-sandwich"])
def test_logits_and_loss_equal_dalle_pytorch(tmp_path, dalle_pytorch, registry, attn_types, sandwich):
    theirs, hparams = _their_model(dalle_pytorch, attn_types, sandwich=sandwich)
    ckpt = _save(theirs, hparams, tmp_path / "dalle.pt")
    _, ours = _import(tmp_path, ckpt, registry)
    theirs.eval()
    text, codes = _batch()
    with torch.no_grad():
        want = theirs(text.clone(), codes)
        got = ours(text, codes)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        want_loss = theirs(text.clone(), codes, return_loss=True)
        got_loss = ours(text, codes, return_loss=True)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-5)
    # and the comparison is sharp: a perturbed weight shows
    with torch.no_grad():
        ours.transformer.layers[-1].attn.to_qkv.weight[0, 0] += 0.5
        assert (ours(text, codes) - want).abs().max() > 1e-4


def test_greedy_codes_equal_dalle_pytorch_sampler(tmp_path, dalle_pytorch, registry):
    theirs, hparams = _their_model(dalle_pytorch, ["axial_row", "axial_col", "conv_like", "full"],
                                   sandwich=True, seed=3)
    _, ours = _import(tmp_path, _save(theirs, hparams, tmp_path / "dalle.pt"), registry)
    text, _ = _batch(seed=7, batch=4)
    with torch.no_grad():
        # filter_thres 0.999 keeps max(int(0.001 * vocab), 1) = 1 logit: top-1 in both
        want = theirs.generate_images(text.clone(), filter_thres=0.999)
        got = generate_image_codes(ours, text, filter_thres=0.999, use_cache=True)
    assert got.shape == want.shape == (4, FMAP * FMAP)
    assert torch.equal(got, want)
    assert len(set(map(tuple, want.tolist()))) > 1  # the prompts steer it (not a constant)


def test_cli_import_generate_and_finetune(tmp_path, dalle_pytorch, registry, capsys):
    from minidalle.train.checkpoint import load_checkpoint

    theirs, hparams = _their_model(dalle_pytorch, ["axial_row", "full"], depth=2, seed=4)
    opt = _train_a_step(theirs)
    ckpt = _save(theirs, hparams, tmp_path / "dalle.pt", opt)
    run = tmp_path / "imported"
    rc = cli.main(["import", "dalle-pytorch", str(ckpt), "--out", str(run), "--tokenizer", "tiny_chars",
                   "--codec", "grey"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert (run / "config.toml").exists() and (run / "checkpoints" / "step-00000000" / "model.safetensors").exists()
    assert "warning" not in err  # the optimizer state mapped
    ck = load_checkpoint(run)
    assert ck.config.model.text_vocab == TEXT_VOCAB and ck.config.training.optimizer == "adam"
    state = ck.training_state["optimizer"]["state"]
    assert len(state) == len(list(theirs.parameters())) and all(float(s["step"]) == 1 for s in state.values())

    # generate draws DALLE-pytorch's greedy codes (read back from the grey PNG)
    prompt = "red cat"
    rc = cli.main(["generate", "--checkpoint", str(run), "--text", prompt, "--num-images", "1",
                   "--filter-thres", "0.99", "--out", str(tmp_path / "samples")])
    out, err = capsys.readouterr()
    assert rc == 0, err
    png = [p for p in out.split() if p.endswith(".png") and "grid" not in p][0]
    pixels = np.asarray(Image.open(png).convert("L"), dtype=np.float64)[::2, ::2]
    drawn = torch.from_numpy(np.rint(pixels / 255 * (NUM_CODES - 1))).long().flatten()
    text = TinyTokenizer().encode([prompt], TEXT_LEN)
    with torch.no_grad():
        want = theirs.generate_images(text, filter_thres=0.999)[0]
    assert torch.equal(drawn, want)

    # fine-tuning continues from the imported Adam state
    rc = cli.main(["run", str(run / "config.toml"), "--resume", "--set", "dataset.name=tiny_codes",
                   "--set", f"dataset.num_tokens={NUM_CODES}", "--set", "training.max_steps=2",
                   "--set", "training.batch_size=2"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    ck = load_checkpoint(run)
    assert ck.step == 2
    assert all(float(s["step"]) == 3 for s in ck.training_state["optimizer"]["state"].values())


def test_export_round_trip(tmp_path, dalle_pytorch, registry):
    theirs, hparams = _their_model(dalle_pytorch, ["axial_row", "axial_col", "conv_like", "full"],
                                   sandwich=True, seed=5)
    opt = _train_a_step(theirs)
    ckpt = _save(theirs, hparams, tmp_path / "dalle.pt", opt)
    run, _ = _import(tmp_path, ckpt, registry)
    out = dp_interop.export_run(run, tmp_path / "back.pt", registry=registry, warn=lambda m: None)
    back = torch.load(out, weights_only=True)
    original = torch.load(ckpt, weights_only=True)
    assert list(back["weights"]) == list(original["weights"])  # same keys, same order
    for key, value in original["weights"].items():
        assert torch.equal(back["weights"][key], value), key
    again, _ = _their_model(dalle_pytorch, ["axial_row", "axial_col", "conv_like", "full"], sandwich=True, seed=9)
    again.load_state_dict(back["weights"])  # strict: DALLE-pytorch takes the file as is
    fresh = torch.optim.Adam([p for p in again.parameters() if p.requires_grad], lr=3e-4)
    fresh.load_state_dict(back["opt_state"])
    for i, st in original["opt_state"]["state"].items():
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(back["opt_state"]["state"][i][k], st[k])
    for k in ("num_text_tokens", "text_seq_len", "dim", "depth", "heads", "dim_head", "attn_types",
              "sandwich_norm", "rotary_emb", "shift_tokens"):
        assert back["hparams"][k] == hparams[k], k


def _as_graphcore(weights: dict) -> dict:
    """DALLE-pytorch 1.6.6 keys renamed as Graphcore's WrappedDALLE names them: its blocks
    are ``nn.Sequential(LayerScale(PreNorm(attn)), LayerScale(PreNorm(ff)))`` without the
    cache wrappers, under ``model.`` (models/pipeline_dalle.py, models/transformer.py)."""
    out = {}
    for key, value in weights.items():
        key = key.replace("transformer.layers.layers.", "transformer.layers.").replace(".0.fn.fn.fn.", ".0.fn.fn.")
        out["model." + key] = value
    return out


@pytest.mark.parametrize("attn_types,sandwich", [(("full", "axial_row", "axial_col"), False),
                                                 (("axial_col", "full"), True)])
def test_graphcore_layout_equals_dalle_pytorch(tmp_path, dalle_pytorch, registry, attn_types, sandwich):
    """Graphcore's attention, blocks and embeddings are DALLE-pytorch's (conv_like aside, see
    test_interop.py): its state dict, imported, computes DALLE-pytorch's logits."""
    from minidalle.inference.loader import load_for_inference
    from minidalle.interop import graphcore

    theirs, hparams = _their_model(dalle_pytorch, attn_types, sandwich=sandwich, depth=3)
    gc_hparams = {k: hparams[k] for k in ("num_text_tokens", "text_seq_len", "dim", "depth", "heads",
                                          "dim_head", "loss_img_weight", "attn_types", "ff_dropout",
                                          "attn_dropout", "sandwich_norm")}
    gc_hparams.update(embedding_ipu_id=0, embedding_serialization_factor=1, layers_per_ipu=[0, 0, 2, 1],
                      cls_ipu_id=None, fp16=False, byteio=False)
    ckpt = tmp_path / "dalle_7.pt"
    torch.save({"hparams": gc_hparams, "vae_params": None, "epoch": 7,
                "weights": _as_graphcore(theirs.state_dict()), "opt_state": None}, ckpt)
    run = graphcore.import_checkpoint(ckpt, tmp_path / "run", tokenizer="tiny_chars", codec="grey",
                                      registry=registry, warn=lambda m: None)
    ours = load_for_inference(run, registry).model
    theirs.eval()
    text, codes = _batch()
    with torch.no_grad():
        torch.testing.assert_close(ours(text, codes), theirs(text.clone(), codes), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours(text, codes, return_loss=True),
                                   theirs(text.clone(), codes, return_loss=True), rtol=1e-5, atol=1e-5)


def test_shared_input_output_embedding_is_untied_equal(tmp_path, dalle_pytorch, registry):
    torch.manual_seed(0)
    theirs, hparams = _their_model(dalle_pytorch, ["full", "axial_row"], depth=2)
    hparams["share_input_output_emb"] = True
    torch.manual_seed(1)
    theirs = dalle_pytorch.DALLE(vae=theirs.vae, **hparams)
    opt = _train_a_step(theirs)
    warnings = []
    run = dp_interop.import_checkpoint(_save(theirs, hparams, tmp_path / "dalle.pt", opt), tmp_path / "run",
                                       tokenizer="tiny_chars", codec="grey", registry=registry,
                                       warn=warnings.append)
    from minidalle.inference.loader import load_for_inference

    ours = load_for_inference(run, registry).model
    theirs.eval()
    text, codes = _batch()
    with torch.no_grad():
        torch.testing.assert_close(ours(text, codes), theirs(text.clone(), codes), rtol=1e-5, atol=1e-5)
    assert any("share_input_output_emb" in w for w in warnings)
