"""`minidalle plan` and the ipu backend's command-line behaviour without PopTorch."""
import json
from pathlib import Path

import pytest

from minidalle.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("name, ipus", [("l16.toml", "= 4 IPU(s) (one IPU-M2000)"),
                                        ("l16_pod16.toml", "= 16 IPU(s) (an IPU-POD16)"),
                                        ("l16_pod64.toml", "= 64 IPU(s) (an IPU-POD64)")])
def test_plan_prints_recipe(capsys, name, ipus):
    code, out, err = run_cli(capsys, "plan", str(CONFIGS / name), "--dataset-size", "118287")
    assert code == 0, err
    assert "Samples per step: 24,576 = batch_size 3 x gradient_accumulation" in out
    assert ipus in out
    assert "Steps per epoch: 4 (118,287 samples; 800 epochs = 3,200 steps)" in out
    assert "Components: tokenizer yttm (8,192 ids), codec vqgan (1,024 codes, 16x16), dataset coco" in out
    table = [line.split() for line in out.splitlines() if line[:1].isdigit()]
    assert [row[0] for row in table] == ["0", "1", "2", "3"]
    assert "layers 0-5" in out and "layers 12-15, output" in out
    assert "transformer_6@transformer.layers.6" in out
    assert "ok  layers_per_ipu [0, 6, 6, 4] sums to model.depth 16" in out
    assert "ok  weights + optimizer state fit in 900 MB per IPU" in out
    # no data on this machine: the recipe's sizes are assumed, and said so
    assert "assumed the recipe's 8192 ids" in out or "(8,192 ids)" in out


def test_plan_json_and_missing_dataset(capsys):
    code, out, _ = run_cli(capsys, "plan", str(CONFIGS / "l16_pod64.toml"), "--json")
    assert code == 0
    data = json.loads(out)
    assert data["samples_per_step"] == 24_576
    assert data["total_ipus"] == 64 and data["enable_rts"] is True
    assert [s["layers"] for s in data["stages"]][1] == [0, 1, 2, 3, 4, 5]
    assert data["components"]["backend"] == "ipu"
    assert data["steps_per_epoch"] is None
    assert any("--dataset-size" in n for n in data["notes"])
    assert data["sizes"]["codec_params"] > 20_000_000  # the f16-1024 encoder on IPU 0


def test_plan_warns_over_memory(capsys):
    code, out, _ = run_cli(capsys, "plan", str(CONFIGS / "l16.toml"), "--set", "model.depth=40",
                           "--set", "backend.layers_per_ipu=[0,30,6,4]")
    assert code == 0
    assert "Warnings:" in out and "IPU 1: estimated" in out and "exceeds the 900 MB" in out


@pytest.mark.parametrize("argv, message", [
    (["--set", "backend.layers_per_ipu=[0,6,6,3]"],
     "backend.layers_per_ipu: [0, 6, 6, 3] places 15 layers but model.depth is 16"),
    (["--dataset-size", "1000"], "the dataset has 1,000 samples, fewer than one step's 24,576"),
    (["--set", "backend.embedding_serialization_factor=5"],
     "backend.embedding_serialization_factor: 5 does not divide"),
])
def test_plan_errors_are_one_line(capsys, argv, message):
    code, out, err = run_cli(capsys, "plan", str(CONFIGS / "l16.toml"), *argv)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("minidalle: error: ") and message in err


def test_plan_of_a_cpu_config(capsys, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'extends = "{CONFIGS / "unit_test.toml"}"\n'
                   '[tokenizer]\nname = "yttm"\npath = "missing.model"\n')
    code, out, err = run_cli(capsys, "plan", str(cfg), "--dataset-size", "10", "--text-vocab", "64")
    # no codec and no dataset: the image vocabulary is unknown
    assert code == 2 and "codec: cannot tell the image vocabulary" in err


def test_list_and_run_without_poptorch(capsys):
    pytest.importorskip("torch")
    from minidalle.components.backends.ipu import poptorch_installed

    if poptorch_installed():
        pytest.skip("PopTorch is installed here: this checks the message shown without it")
    code, out, _ = run_cli(capsys, "list", "backend")
    line = next(l for l in out.splitlines() if l.split()[:2] == ["backend", "ipu"])
    assert "unavailable" in line and "Poplar SDK" in line
    code, out, err = run_cli(capsys, "run", str(CONFIGS / "l16_pod64.toml"))
    assert code == 2
    assert err.count("\n") == 1
    assert "PopTorch" in err and "Poplar SDK" in err and "--backend cpu" in err
    assert out == ""  # reported before any stage starts


def test_plan_of_the_quickstart_uses_what_its_stages_will_train(capsys, tmp_path):
    cfg = tmp_path / "q.toml"
    cfg.write_text(f'extends = "{CONFIGS / "quickstart.toml"}"\n'
                   f'[tokenizer]\nname = "yttm"\npath = "{tmp_path / "none.yttm"}"\n'
                   f'[codec]\nname = "vqgan"\npath = "{tmp_path / "none.ckpt"}"\n')
    code, out, err = run_cli(capsys, "plan", str(cfg), "--dataset-size", "1000")
    assert code == 0, err
    assert "the [tokenizer_training] vocabulary of 96 ids" in out
    assert "codec vqgan (256 codes, 9x9)" in out and "[codec_training] will train" in out
    assert "Backend 'cpu' is not the IPU: planned on one IPU per replica" in out
    assert "= 1 IPU(s)\n" in out
    assert "ok  layers_per_ipu [4] sums to model.depth 4" in out
