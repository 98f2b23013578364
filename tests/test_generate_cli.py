"""`minidalle generate` end to end on a tiny checkpoint (tiny tokenizer, codec, reranker)."""
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from minidalle import cli, hookimpl
from minidalle.train.checkpoint import save_checkpoint
from minidalle.api import config_from_dict
from minidalle.config import config_to_dict

import _tiny
from _tiny import GreyCodec

pytestmark = pytest.mark.cpu_paths  # `make test` reruns it with MINIDALLE_CPU forced down

FMAP, NUM_TOKENS = 4, 8


class Brightness:
    def score(self, texts, images):
        assert len(texts) == len(images)
        return images.mean(dim=(1, 2, 3))


class RerankerPlugin:
    @staticmethod
    @hookimpl
    def minidalle_rerankers(register):
        register("brightness", Brightness, summary="test reranker")


@pytest.fixture
def registry():
    return _tiny.use_tiny_registry(RerankerPlugin)


def _checkpoint(tmp_path, registry, codec=True):
    from minidalle.model import build_model

    table = {"model": {"dim": 32, "depth": 2, "heads": 2, "dim_head": 8, "text_seq_len": 12,
                       "attn_types": ["axial_row", "full"]},
             "tokenizer": {"name": "tiny_chars"}, "generate": {"num_images": 2}}
    if codec:
        table["codec"] = {"name": "grey"}
    cfg = config_from_dict(table, registry=registry)
    torch.manual_seed(0)
    model = build_model(cfg, text_vocab=64, num_image_tokens=NUM_TOKENS, fmap_size=FMAP, registry=registry)
    for layer in model.transformer.layers:
        layer.scale_attn.data.fill_(1.0)
    run = tmp_path / "run"
    save_checkpoint(run / "checkpoints", step=3, model_state=model.state_dict(), config=config_to_dict(cfg))
    return run


def _main(capsys, *argv):
    rc = cli.main(["generate", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def _read(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_generate_writes_pngs_and_grid(tmp_path, registry, capsys):
    run = _checkpoint(tmp_path, registry)
    out = tmp_path / "out"
    rc, stdout, err = _main(capsys, "--checkpoint", run, "--text", "red cat", "--text", "blue dog",
                            "--out", out, "--seed", "5")
    assert rc == 0, err
    paths = [Path(p) for p in stdout.split()]
    assert len(paths) == 2 * 2 + 1 and paths[-1] == out / "grid.png"
    assert all(p.exists() for p in paths)
    assert _read(paths[0]).shape == (2 * FMAP, 2 * FMAP, 3)
    assert paths[0].name.startswith("00-red-cat") and paths[2].name.startswith("01-blue-dog")
    grid = _read(paths[-1])
    assert grid.shape[0] > 2 * 2 * FMAP and grid.shape[1] >= 2 * 2 * FMAP
    # same seed, same images
    out2 = tmp_path / "out2"
    rc, stdout2, _ = _main(capsys, "--checkpoint", run, "--text", "red cat", "--text", "blue dog",
                           "--out", out2, "--seed", "5")
    for a, b in zip(paths[:-1], stdout2.split()[:-1]):
        assert np.array_equal(_read(a), _read(b))


def test_rerank_sorts_each_prompt(tmp_path, registry, capsys):
    run = _checkpoint(tmp_path, registry)
    rc, stdout, err = _main(capsys, "--checkpoint", run, "--text", "red cat", "--num-images", "4",
                            "--rerank", "brightness", "--out", tmp_path / "o", "--temperature", "3")
    assert rc == 0, err
    means = [_read(p).mean() for p in stdout.split()[:-1] if p.endswith(".png")]
    assert (tmp_path / "o" / "scores.json").is_file()
    assert means == sorted(means, reverse=True) and len(set(means)) > 1


def test_prime_image_keeps_its_first_codes(tmp_path, registry, capsys):
    run = _checkpoint(tmp_path, registry)
    codec = GreyCodec()
    prime_codes = torch.arange(16).remainder(NUM_TOKENS)[None]
    prime = tmp_path / "prime.png"
    from minidalle.images import save_png

    save_png(codec.decode(prime_codes)[0], prime)
    rc, stdout, err = _main(capsys, "--checkpoint", run, "--text", "red cat", "--prime-image", prime,
                            "--out", tmp_path / "o")
    assert rc == 0, err
    keep = int(0.4375 * 16)
    for p in stdout.split()[:-1]:
        img = torch.from_numpy(_read(p).copy()).permute(2, 0, 1)[None].float() / 255
        assert torch.equal(codec.encode(img)[0, :keep], prime_codes[0, :keep])


def test_long_prompt_is_truncated_with_a_warning(tmp_path, registry, capsys):
    run = _checkpoint(tmp_path, registry)
    rc, stdout, err = _main(capsys, "--checkpoint", run, "--text", "a very long caption " * 3,
                            "--num-images", "1", "--out", tmp_path / "o")
    assert rc == 0 and "truncated" in err


@pytest.mark.parametrize("case", ["empty", "missing", "corrupt", "no_codec", "unknown_reranker"])
def test_user_errors_exit_2_with_one_line(tmp_path, registry, capsys, case):
    run = _checkpoint(tmp_path, registry, codec=case != "no_codec")
    text = "red cat"
    extra = []
    if case == "empty":
        text = "  "
    elif case == "missing":
        run = tmp_path / "nope"
    elif case == "corrupt":
        weights = next((run / "checkpoints").glob("step-*/model.safetensors"))
        weights.write_bytes(weights.read_bytes()[:100])
    elif case == "unknown_reranker":
        extra = ["--rerank", "clip"]
    rc, stdout, err = _main(capsys, "--checkpoint", run, "--text", text, "--out", tmp_path / "o", *extra)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("minidalle: error:"), err
    expected = {"empty": "empty prompt", "missing": "nope", "corrupt": "corrupt",
                "no_codec": "no [codec]", "unknown_reranker": "reranker"}[case]
    assert expected in lines[0]
    assert not (tmp_path / "o").exists()


def test_bf16_small_batches_and_no_cache(tmp_path, registry, capsys, monkeypatch):
    threads = torch.get_num_threads()
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # --threads: keep the suite's
    run = _checkpoint(tmp_path, registry)
    rc, stdout, err = _main(capsys, "--checkpoint", run, "--text", "red cat", "--num-images", "3",
                            "--batch-size", "2", "--precision", "bf16", "--out", tmp_path / "a",
                            "--threads", "1")
    assert rc == 0, err
    assert len(stdout.split()) == 3 + 1
    assert torch.get_num_threads() == threads
    # the cache changes nothing but speed
    a = _main(capsys, "--checkpoint", run, "--text", "red cat", "--out", tmp_path / "b")[1].split()
    b = _main(capsys, "--checkpoint", run, "--text", "red cat", "--out", tmp_path / "c", "--no-cache")[1].split()
    for x, y in zip(a[:-1], b[:-1]):
        assert np.array_equal(_read(x), _read(y))


def test_grid_labels_keep_the_whole_prompt():
    from minidalle.images import make_grid

    rows = [torch.zeros(3, 3, 16, 16), torch.zeros(1, 3, 16, 16)]
    long = "a large red circle at the top left and a large blue square at the bottom right"
    one_line = make_grid(rows[:1], ["a"]).size[1]
    tall = make_grid(rows[:1], [long]).size[1]
    assert tall - one_line >= 4 * 15  # every wrapped line of the prompt is drawn (15 px each)
    capped = make_grid(rows[:1], [long * 10]).size[1]
    assert capped - one_line == 7 * 15  # at most 8 lines
    assert make_grid(rows, [long, ""]).size[0] == 3 * 16 + 4 * 4


@pytest.mark.parametrize("level", ["avx2", "generic"])
def test_precisions_on_a_cpu_without_native_bf16(level, tmp_path, registry, capsys):
    """Under a forced AVX2 or generic CPU (libraries capped alike): bf16-weights and auto
    draw images; auto says what it chose (bf16-weights with the AVX2 kernel, else fp32)."""
    import subprocess
    import sys

    from minidalle import hardware
    from test_gemv import forced_env

    if hardware.LEVELS.index(hardware.detected_level()) < hardware.LEVELS.index(level):
        pytest.skip(f"the CPU has no {level}")
    run = _checkpoint(tmp_path, registry)
    tests = str(Path(__file__).parent)
    env = {**forced_env(level), "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}
    for precision in ("bf16-weights", "auto"):
        out = tmp_path / precision
        code = ("import sys, test_generate_cli as t, _tiny; "
                "from minidalle import cli; from minidalle.inference import gemv; "
                "_tiny.use_tiny_registry(t.RerankerPlugin); "
                "rc = cli.main(sys.argv[1:]); print(gemv.variant(), gemv.kernel() is not None); sys.exit(rc)")
        p = subprocess.run([sys.executable, "-c", code, "generate", "--checkpoint", str(run),
                            "--text", "red cat", "--precision", precision, "--out", str(out)],
                           capture_output=True, text=True, env=env, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        *paths, variant, built = p.stdout.split()
        assert len(paths) == 2 + 1 and all(Path(x).is_file() for x in paths)
        assert variant == ("avx2" if level == "avx2" else "None")
        if precision == "auto":
            want = "bf16-weights" if built == "True" else "fp32"  # the kernel, where it builds
            assert f"generate: precision auto -> {want}: " in p.stderr, p.stderr
    capsys.readouterr()
