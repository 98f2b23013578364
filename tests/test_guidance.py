"""Classifier-free guidance and reranking: null captions in training (seeded, resumable),
guided sampling on the cached path, the likelihood and clip rerankers, the CLI."""
import json
from pathlib import Path

import pytest
import torch

import _tiny
from minidalle import cli
from minidalle.config import Config, ModelConfig, config_from_dict, config_to_dict
from minidalle.data import NullCaptions
from minidalle.inference.sampling import generate_image_codes, image_log_likelihood
from minidalle.model import build_model
from minidalle.train.checkpoint import load_checkpoint, save_checkpoint

pytestmark = pytest.mark.cpu_paths  # `make test` reruns it with MINIDALLE_CPU forced down

TEXT_VOCAB, TEXT_LEN, IMG_TOKENS, FMAP = 12, 5, 7, 3
TEXT = torch.tensor([[3, 5, 7, 0, 0], [1, 2, 0, 0, 0]])


def tiny(attn_types=("axial_row", "full"), factors=None, tokens=IMG_TOKENS):
    from minidalle.plugin.discovery import get_registry

    cfg = Config(registry=get_registry(), model=ModelConfig(dim=32, depth=len(attn_types), heads=2,
                                                            dim_head=8, text_seq_len=TEXT_LEN,
                                                            attn_types=list(attn_types)))
    torch.manual_seed(0)
    m = build_model(cfg, text_vocab=TEXT_VOCAB, num_image_tokens=tokens, fmap_size=FMAP,
                    image_token_factors=factors)
    for layer in m.transformer.layers:  # LayerScale 0.1 hides mistakes: make layers count
        layer.scale_attn.data.fill_(1.0)
        layer.scale_ff.data.fill_(1.0)
    return m.eval()


# --------------------------------------------------------------------------- sampling


def test_cond_scale_one_is_bit_identical_to_unguided():
    m = tiny()
    for kwargs in ({}, {"prime_codes": torch.tensor([[1, 2], [3, 4]])}, {"top_p": 0.9}):
        plain = generate_image_codes(m, TEXT, seed=4, **kwargs)
        assert torch.equal(generate_image_codes(m, TEXT, seed=4, cond_scale=1.0, **kwargs), plain)
    # and guidance does change the logits (so the test above could not pass by ignoring it)
    seen = {}
    generate_image_codes(m, TEXT, seed=4, cond_scale=4.0, on_logits=lambda s, lg: seen.setdefault("g", lg))
    generate_image_codes(m, TEXT, seed=4, on_logits=lambda s, lg: seen.setdefault("p", lg))
    assert (seen["g"] - seen["p"]).abs().max() > 1e-3


def _guided_reference(m, text, codes, step, s):
    """uncond + s * (cond - uncond) from plain forwards (no cache) of both captions."""
    ntext = TEXT_VOCAB + TEXT_LEN
    with torch.no_grad():
        cond = m(text, codes[:, :step])[:, -1, ntext:]
        uncond = m(torch.zeros_like(text), codes[:, :step])[:, -1, ntext:]
    return uncond + s * (cond - uncond)


@pytest.mark.parametrize("case", ["plain", "primed", "factorised"])
def test_guided_cached_equals_guided_uncached(case):
    m = tiny(factors=(3, 2), tokens=6) if case == "factorised" else tiny()
    prime = torch.tensor([[1, 2, 3], [4, 5, 0]]) if case == "primed" else None
    runs = {}
    for cache in (True, False):
        steps = {}
        codes = generate_image_codes(m, TEXT, seed=2, cond_scale=3.0, prime_codes=prime, use_cache=cache,
                                     on_logits=lambda s, lg, d=steps: d.__setitem__(s, lg))
        runs[cache] = codes, steps
    (a, la), (b, lb) = runs[True], runs[False]
    assert torch.equal(a, b)
    first = 0 if prime is None else prime.shape[1]
    assert sorted(la) == list(range(first, FMAP * FMAP))
    if prime is not None:
        assert torch.equal(a[:, :first], prime)
    for step in la:
        torch.testing.assert_close(la[step], lb[step], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(la[step], _guided_reference(m, TEXT, a, step, 3.0), atol=1e-5, rtol=1e-5)


def test_guided_batch_goes_through_the_lean_decoder(monkeypatch):
    from minidalle.inference import decode

    calls = []
    real = decode.LeanDecoder.hidden
    monkeypatch.setattr(decode.LeanDecoder, "hidden",
                        lambda self, tokens, cache: calls.append(tokens.shape[0]) or real(self, tokens, cache))
    generate_image_codes(tiny(["full", "full"]), TEXT, seed=0, cond_scale=2.0)
    assert calls and set(calls) == {2 * len(TEXT)}  # conditional and null rows, one batch


def test_likelihood_matches_forward_and_pmi():
    from minidalle.components.rerankers.likelihood import LikelihoodConfig, LikelihoodReranker

    m = tiny()
    codes = generate_image_codes(m, TEXT, seed=1)
    ntext = TEXT_VOCAB + TEXT_LEN
    with torch.no_grad():
        logits = m(TEXT, codes)[:, TEXT_LEN:, ntext:].log_softmax(-1)
    want = logits.gather(-1, codes[..., None])[..., 0].sum(-1)
    torch.testing.assert_close(image_log_likelihood(m, TEXT, codes), want, atol=1e-4, rtol=1e-5)

    class Tok:  # captions are the rows of TEXT
        def encode(self, captions, n, truncate=True):
            return TEXT[[int(c) for c in captions]]

    rr = LikelihoodReranker(LikelihoodConfig(pmi=False))
    rr.bind(model=m, tokenizer=Tok())
    torch.testing.assert_close(rr.score(["0", "1"], codes=codes), want, atol=1e-4, rtol=1e-5)
    pmi = LikelihoodReranker(LikelihoodConfig(pmi=True))
    pmi.bind(model=m, tokenizer=Tok())
    null = image_log_likelihood(m, torch.zeros_like(TEXT), codes)
    torch.testing.assert_close(pmi.score(["0", "1"], codes=codes), want - null, atol=1e-4, rtol=1e-5)


# --------------------------------------------------------------------------- training


def test_null_captions_are_seeded_per_item_and_epoch():
    ds = _tiny.TinyCodes(_tiny.TinyCodesConfig(size=200), seed=0)
    a, b = NullCaptions(ds, 0.3, seed=5), NullCaptions(ds, 0.3, seed=5)
    first = [a[i].get("null_caption", False) for i in range(200)]
    assert first == [b[i].get("null_caption", False) for i in reversed(range(200))][::-1]
    assert 30 < sum(first) < 90  # about 30% of 200
    assert all(a[i]["caption"] == "" for i in range(200) if first[i])
    a.set_epoch(1)
    assert [a[i].get("null_caption", False) for i in range(200)] != first
    assert [NullCaptions(ds, 0.3, seed=6)[i].get("null_caption", False) for i in range(200)] != first
    from minidalle.train.pipeline import make_collate

    batch = make_collate(_tiny.TinyTokenizer(), 16, True)([a[i] for i in range(20)])
    nulled = [a[i].get("null_caption", False) for i in range(20)]
    assert any(nulled)
    for row, null in zip(batch["text"], nulled):
        assert (row == 0).all().item() == null


def _train(out, *overrides):
    from minidalle.components.backends.cpu import CpuBackend, CpuConfig
    from minidalle.train.pipeline import Pipeline
    from minidalle.train.trainer import Trainer, seed_everything

    cfg = _tiny.tiny_config(out, "training.max_steps=2", "dataset.size=8", *overrides)
    seed_everything(cfg.run.seed)
    pipe = Pipeline(cfg, _tiny.registry())
    seen = []
    collate = lambda samples: seen.append(sum(bool(s.get("null_caption")) for s in samples)) or pipe.collate(samples)
    trainer = Trainer(cfg, model=pipe.model, dataset=pipe.dataset, collate=collate,
                      backend=CpuBackend(CpuConfig(precision="fp32")), show_progress=False)
    trainer.train()
    return trainer, seen


def test_null_caption_prob_is_reproducible_and_recorded(tmp_path):
    a, seen_a = _train(tmp_path / "a", "training.null_caption_prob=0.5")
    b, seen_b = _train(tmp_path / "b", "training.null_caption_prob=0.5")
    c, seen_c = _train(tmp_path / "c")
    assert seen_a == seen_b and sum(seen_a) > 0 and sum(seen_c) == 0
    sa, sb, sc = a.model.state_dict(), b.model.state_dict(), c.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)  # the null captions changed training
    meta = load_checkpoint(tmp_path / "a", with_config=False).meta
    assert meta["config"]["training"]["null_caption_prob"] == 0.5


class _Crash(Exception):
    pass


def test_null_captions_survive_a_crash_and_resume_bit_identically(tmp_path):
    # 8 steps over 2 epochs (the null draws change with the epoch), checkpoints at 3 and 6;
    # the first run dies after step 5 and is resumed from step 3 (as tests/test_checkpoint.py,
    # in process: the null draws depend on no process state).
    from minidalle.train.trainer import train_from_config as train

    def cfg(out):
        return _tiny.tiny_config(out, "training.epochs=2", "training.checkpoint_every=3", "dataset.size=8",
                                 "training.null_caption_prob=0.4", "backend.precision=fp32")

    def crash(trainer, step, result):
        if step == 5:
            raise _Crash()

    with pytest.raises(_Crash):
        train(cfg(tmp_path / "k"), registry=_tiny.registry(), callbacks=[crash], show_progress=False)
    res = train(cfg(tmp_path / "k"), resume=True, registry=_tiny.registry(), show_progress=False)
    assert res.resumed_from == 3 and res.step == 8
    train(cfg(tmp_path / "s"), registry=_tiny.registry(), show_progress=False)
    a = load_checkpoint(tmp_path / "k", with_config=False)
    b = load_checkpoint(tmp_path / "s", with_config=False)
    assert a.step == b.step == 8
    for name, tensor in b.state_dict.items():
        assert torch.equal(a.state_dict[name], tensor), name


# --------------------------------------------------------------------------- the CLI


@pytest.fixture
def registry():
    return _tiny.use_tiny_registry()


def _checkpoint(tmp_path, registry, null_caption_prob=0.2, generate=None, **extra):
    table = {"model": {"dim": 32, "depth": 2, "heads": 2, "dim_head": 8, "text_seq_len": 12,
                       "attn_types": ["axial_row", "full"]},
             "training": {"null_caption_prob": null_caption_prob},
             "tokenizer": {"name": "tiny_chars"}, "codec": {"name": "grey"},
             "generate": {"num_images": 2, **(generate or {})}, **extra}
    cfg = config_from_dict(table, registry=registry)
    torch.manual_seed(0)
    model = build_model(cfg, text_vocab=64, num_image_tokens=8, fmap_size=4, registry=registry)
    for layer in model.transformer.layers:
        layer.scale_attn.data.fill_(1.0)
    run = tmp_path / f"run{null_caption_prob}"
    save_checkpoint(run / "checkpoints", step=3, model_state=model.state_dict(), config=config_to_dict(cfg))
    return run


def _main(capsys, *argv):
    rc = cli.main(["generate", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_cond_scale_refused_without_null_captions(tmp_path, registry, capsys):
    run = _checkpoint(tmp_path, registry, null_caption_prob=0.0)
    rc, out, err = _main(capsys, "--checkpoint", run, "--text", "red cat", "--cond-scale", "3",
                         "--out", tmp_path / "o")
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "null_caption_prob = 0" in lines[0], err
    assert not (tmp_path / "o").exists()
    rc, out, err = _main(capsys, "--checkpoint", run, "--text", "red cat", "--cond-scale", "1",
                         "--out", tmp_path / "o1")
    assert rc == 0, err


def test_cli_cond_scale_one_equals_default_and_guidance_runs(tmp_path, registry, capsys):
    import numpy as np
    from PIL import Image

    run = _checkpoint(tmp_path, registry)
    read = lambda p: np.asarray(Image.open(p))
    outs = {}
    for name, extra in (("plain", []), ("one", ["--cond-scale", "1"]), ("g", ["--cond-scale", "3"]),
                        ("g_nocache", ["--cond-scale", "3", "--no-cache"])):
        rc, out, err = _main(capsys, "--checkpoint", run, "--text", "red cat", "--out", tmp_path / name,
                             "--seed", "3", *extra)
        assert rc == 0, err
        outs[name] = [read(p) for p in out.split()[:-1]]
    assert all(np.array_equal(a, b) for a, b in zip(outs["plain"], outs["one"]))
    assert all(np.array_equal(a, b) for a, b in zip(outs["g"], outs["g_nocache"]))


def test_cli_candidates_keep_rerank_likelihood_writes_scores(tmp_path, registry, capsys):
    run = _checkpoint(tmp_path, registry)
    out_dir = tmp_path / "o"
    rc, out, err = _main(capsys, "--checkpoint", run, "--text", "red cat", "--text", "blue dog",
                         "--candidates", "5", "--keep", "2", "--rerank", "likelihood",
                         "--cond-scale", "2", "--out", out_dir, "--temperature", "3")
    assert rc == 0, err
    paths = [Path(p) for p in out.split()]
    pngs = [p for p in paths if p.suffix == ".png" and p.name != "grid.png"]
    assert len(pngs) == 4 and paths[-1].name == "grid.png" and out_dir / "scores.json" in paths
    doc = json.loads((out_dir / "scores.json").read_text())
    assert doc["reranker"] == "likelihood" and doc["candidates"] == 5 and doc["keep"] == 2
    assert [p["prompt"] for p in doc["prompts"]] == ["red cat", "blue dog"]
    for entry in doc["prompts"]:
        kept = [k["score"] for k in entry["kept"]]
        dropped = [d["score"] for d in entry["dropped"]]
        assert len(kept) == 2 and len(dropped) == 3
        assert kept == sorted(kept, reverse=True) and min(kept) >= max(dropped)
        assert len({k["candidate"] for k in entry["kept"]} | {d["candidate"] for d in entry["dropped"]}) == 5
    # the score of a written image is the model's likelihood of its codes
    import numpy as np
    from PIL import Image

    from minidalle.inference.loader import load_for_inference

    loaded = load_for_inference(run)
    tok, codec, model = loaded.tokenizer, loaded.codec, loaded.model
    img = torch.from_numpy(np.asarray(Image.open(pngs[0])).copy()).permute(2, 0, 1)[None].float() / 255
    codes = codec.encode(img)
    want = image_log_likelihood(model, tok.encode(["red cat"], 12), codes).item()
    assert abs(want - doc["prompts"][0]["kept"][0]["score"]) < 1e-3


def test_cli_config_candidates_and_bad_keep(tmp_path, registry, capsys):
    run = _checkpoint(tmp_path, registry, generate={"candidates": 3, "keep": 1, "rerank": "likelihood"})
    rc, out, err = _main(capsys, "--checkpoint", run, "--text", "red cat", "--out", tmp_path / "o")
    assert rc == 0, err
    assert len([p for p in out.split() if p.endswith(".png")]) == 1 + 1  # one image and the grid
    assert len(json.loads((tmp_path / "o" / "scores.json").read_text())["prompts"][0]["dropped"]) == 2
    for extra, word in ((["--keep", "4", "--candidates", "2"], "--keep"),
                        (["--rerank", "none_such"], "reranker")):
        rc, out, err = _main(capsys, "--checkpoint", run, "--text", "red cat", "--out", tmp_path / "x", *extra)
        assert rc == 2 and len(err.strip().splitlines()) == 1 and word in err, err
    run = _checkpoint(tmp_path, registry, null_caption_prob=0.3)
    rc, out, err = _main(capsys, "--checkpoint", run, "--text", "a", "--candidates", "3", "--keep", "1",
                         "--out", tmp_path / "y")
    assert rc == 2 and "--rerank" in err


def test_cli_pmi_from_the_config_section(tmp_path, registry, capsys):
    for prob in (0.0, 0.3):
        run = _checkpoint(tmp_path, registry, null_caption_prob=prob, generate={"candidates": 3, "keep": 2},
                          reranker={"name": "likelihood", "pmi": True})
        rc, out, err = _main(capsys, "--checkpoint", run, "--text", "red cat", "--out", tmp_path / f"o{prob}")
        if prob == 0:
            assert rc == 2 and "pmi" in err and "null_caption_prob = 0" in err, err
            continue
        assert rc == 0, err
        doc = json.loads((tmp_path / f"o{prob}" / "scores.json").read_text())
        assert doc["reranker"] == "likelihood" and len(doc["prompts"][0]["kept"]) == 2


def test_clip_reranker_unavailable_or_tiny_random(tmp_path, registry, capsys):
    from minidalle.plugin.registry import module_missing

    component = registry.get("reranker", "clip")
    run = _checkpoint(tmp_path, registry)
    rc, out, err = _main(capsys, "--checkpoint", run, "--text", "red cat", "--rerank", "clip",
                         "--out", tmp_path / "o")
    assert rc == 2 and len(err.strip().splitlines()) == 1 and not (tmp_path / "o").exists()
    if module_missing("open_clip"):
        assert component.unavailable_reason() == "missing Python package(s): open_clip"
        assert "open_clip" in err
        assert cli.main(["list", "reranker"]) == 0
        listing = capsys.readouterr().out
        assert "clip" in listing and "open_clip" in listing and "likelihood" in listing
        pytest.skip("open_clip is not installed: the tiny random clip model is not built")
    assert "weights" in err and "nothing is downloaded" in err
    # a tiny randomly initialised open_clip architecture, its weights in a local file
    arch = tmp_path / "tiny-clip.json"
    arch.write_text(json.dumps({"embed_dim": 16,
                                "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
                                "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32,
                                             "heads": 2, "layers": 1}}))
    import open_clip
    from safetensors.torch import save_file

    open_clip.add_model_config(str(arch))
    torch.manual_seed(0)
    weights = tmp_path / "tiny-clip.safetensors"
    save_file({k: v.contiguous() for k, v in open_clip.create_model("tiny-clip").state_dict().items()},
              str(weights))
    params = {"model": "tiny-clip", "model_config": str(arch), "weights": str(weights)}
    a, b = (registry.build("reranker", "clip", params) for _ in range(2))
    images = torch.rand(3, 3, 8, 8)
    scores = a.score(["a red circle", "a blue square", "a cat"], images)
    assert scores.shape == (3,) and torch.isfinite(scores).all() and scores.abs().max() <= 1 + 1e-5
    assert torch.equal(scores, b.score(["a red circle", "a blue square", "a cat"], images))  # loaded weights
    from minidalle.commands.generate import _reranker

    cfg = config_from_dict({"reranker": {"name": "clip", **params}}, registry=registry)
    assert _reranker(None, cfg, registry).model is not None


def test_null_captions_reach_the_ipu_data_pipeline(monkeypatch, tmp_path):
    """The ipu backend (fake PopTorch) feeds steps through its own poptorch.DataLoader: it
    gets the same null captions (per epoch and item) as the cpu backend's loader."""
    import fake_poptorch
    from minidalle.components.backends.cpu import CpuBackend, CpuConfig
    from minidalle.components.backends.ipu.backend import IpuBackend
    from minidalle.components.backends.ipu.plan import IpuConfig
    from minidalle.train.pipeline import Pipeline
    from minidalle.train.trainer import Trainer, seed_everything

    poptorch = fake_poptorch.install(monkeypatch)
    counts = {}
    for name, make in (("ipu", lambda: IpuBackend(IpuConfig(ipus_per_replica=1, dataloader_mode="sync"))),
                       ("cpu", lambda: CpuBackend(CpuConfig(precision="fp32")))):
        cfg = _tiny.tiny_config(tmp_path / name, "training.epochs=2", "training.gradient_accumulation=4",
                                "training.null_caption_prob=0.3")
        seed_everything(cfg.run.seed)
        pipe = Pipeline(cfg, _tiny.registry())
        seen = []

        def collate(samples, seen=seen, pipe=pipe):
            batch = pipe.collate(samples)
            seen.append(int((batch["text"] == 0).all(dim=1).sum()))
            return batch

        backend = make()
        Trainer(cfg, model=pipe.model, dataset=pipe.dataset, collate=collate, backend=backend,
                show_progress=False).train()
        counts[name] = sum(seen)
        if name == "ipu":
            assert isinstance(backend._loader, poptorch.DataLoader)
    assert counts["ipu"] == counts["cpu"] > 0
