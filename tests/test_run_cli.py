"""`minidalle run` (stages, --resume, --from, --backend) and `minidalle bench`."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import _tiny
from minidalle.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _config(tmp_path, extra=""):
    return _tiny.tiny_config_file(tmp_path, extra, checkpoint_every=2)


@pytest.fixture
def tiny_registry():
    return _tiny.use_tiny_registry()


def test_run_trains_then_skips_then_reruns_from(tmp_path, tiny_registry, capsys):
    cfg = _config(tmp_path)
    assert main(["run", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "stage transformer: running" in out and "Throughput: " in out and "Loss: " in out
    ckpts = tmp_path / "out" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000002", "step-00000004"]

    assert main(["run", str(cfg)]) == 0
    assert "stage transformer: complete, skipped" in capsys.readouterr().out

    assert main(["run", str(cfg), "--from", "transformer", "--set", "training.epochs=2"]) == 0
    assert "Epoch 2/2 step 8/8" in capsys.readouterr().out
    metrics = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["step"] for l in metrics] == list(range(1, 9))  # old metrics cleaned


def test_unfinished_run_needs_resume(tmp_path, tiny_registry, capsys):
    from minidalle.train.trainer import METRICS_FILE

    cfg = _config(tmp_path)
    assert main(["run", str(cfg), "--set", "training.epochs=2"]) == 0
    out = tmp_path / "out"
    # pretend it died after step 4: drop the final checkpoint
    import shutil

    for p in (out / "checkpoints").iterdir():
        if p.name != "step-00000004":
            shutil.rmtree(p)
    capsys.readouterr()
    assert main(["run", str(cfg), "--set", "training.epochs=2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--resume" in err
    assert main(["run", str(cfg), "--set", "training.epochs=2", "--resume"]) == 0
    assert "resumed at step 4" in capsys.readouterr().out
    assert (out / METRICS_FILE).exists()


def test_backend_override(tmp_path, tiny_registry, capsys):
    cfg = _config(tmp_path)
    assert main(["run", str(cfg), "--backend", "cpu", "--set", "backend.precision=bf16"]) == 0
    assert "cpu bf16" in capsys.readouterr().out
    assert main(["run", str(cfg), "--backend", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown backend 'nope'" in err and err.count("\n") == 1


def test_unavailable_backend_says_why(tmp_path, tiny_registry, capsys):
    cfg = _config(tmp_path)
    assert main(["run", str(cfg), "--backend", "ipu"]) == 2
    err = capsys.readouterr().err
    assert "ipu" in err and "unavailable" in err and err.count("\n") == 1


def test_unknown_stage_and_bad_from(tmp_path, tiny_registry, capsys):
    cfg = _config(tmp_path)
    assert main(["run", str(cfg), "--set", 'run.stages=["transformer", "paint"]']) == 2
    assert "run.stages[1]: unknown stage 'paint'" in capsys.readouterr().err
    assert main(["run", str(cfg), "--from", "paint"]) == 2
    assert "--from paint" in capsys.readouterr().err


def test_stage_mechanism_reruns_later_stages(tmp_path):
    from minidalle.config import RunConfig
    from minidalle import hookimpl
    from minidalle.plugin.discovery import load_registry
    from minidalle.recipes.stages import run_stages

    done = []
    marker = lambda name: tmp_path / f"{name}.done"

    def make(name):
        def run(ctx):
            done.append(name)
            marker(name).write_text("ok")
        return run

    class Plugin:
        @hookimpl
        def minidalle_stages(register):
            for name in ("s_a", "s_b"):
                register(name, make(name), is_complete=lambda ctx, n=name: marker(n).exists())

    registry = load_registry(autoload="none", extra_plugins=[Plugin])

    class Cfg:
        run = RunConfig(out_dir=str(tmp_path), stages=["s_a", "s_b"])
        source = "x.toml"

    quiet = lambda line: None
    assert run_stages(Cfg, registry=registry, log=quiet) == ["s_a", "s_b"]
    assert run_stages(Cfg, registry=registry, log=quiet) == []
    marker("s_a").unlink()  # an earlier stage reruns: the later one must too
    assert run_stages(Cfg, registry=registry, log=quiet) == ["s_a", "s_b"]
    assert run_stages(Cfg, registry=registry, from_stage="s_b", log=quiet) == ["s_b"]


@pytest.mark.cpu_paths
def test_bench_prints_the_figures(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", str(ROOT / "configs" / "unit_test.toml"), "--steps", "1", "--warmup", "1",
                 "--set", "model.text_seq_len=8", "--set", "bench.fmap_size=4",
                 "--set", "bench.text_vocab=100", "--set", "bench.num_image_tokens=64",
                 "--peak-sizes", "128,256", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    for needle in ("Throughput: ", "samples/sec", "Loss: ", "Matmul peak fp32: ", "Matmul peak bf16: ",
                   "MFU: ", "Peak memory: ", "GFLOP per sample"):
        assert needle in text, needle
    r = json.loads(out.read_text())
    # seq 8 + 16 = 24 positions; one layer; 6 x P x T + 12 x d x pairs
    assert r["seq_len"] == 24
    assert r["flops_per_sample"] == 6 * r["params_matmul"] * 24 + 12 * 64 * r["attention_pairs"]
    assert 0 < r["attention_pairs"] < 24 * 25 // 2  # axial_row sees less than causal
    assert r["samples_per_sec"] > 0 and 0 < r["mfu"] < 1.5
    assert "MFU per step against the fp32 peak re-measured after it (128x128)" in text
    assert len(r["probes"]) == len(r["step_seconds"]) == 1 and r["probes"][0] > 0
    assert r["mfu_per_step_median"] == pytest.approx(
        r["samples_per_step"] * r["flops_per_sample"] / (r["step_seconds"][0] * r["probes"][0]))


@pytest.mark.cpu_paths
@pytest.mark.parametrize("precision", ["bf16", "bf16-master"])
def test_bench_precision_and_batch(tmp_path, capsys, precision):
    assert main(["bench", str(ROOT / "configs" / "unit_test.toml"), "--steps", "1", "--warmup", "0",
                 "--precision", precision, "--batch-size", "2", "--no-peak",
                 "--set", "model.text_seq_len=8", "--set", "bench.fmap_size=4"]) == 0
    text = capsys.readouterr().out
    assert f"backend cpu {precision}, batch 2" in text and "MFU" not in text
    assert f"Device: cpu {precision}," in text


@pytest.mark.cpu_paths
def test_bench_generate_prints_the_sampling_figures(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", str(ROOT / "configs" / "unit_test.toml"), "--steps", "1", "--warmup", "0",
                 "--no-peak", "--no-compare", "--generate", "--no-uncached", "--generate-images", "2",
                 "--set", "model.text_seq_len=8", "--set", "bench.fmap_size=4",
                 "--set", "bench.text_vocab=100", "--set", "bench.num_image_tokens=64",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Generate: 16 image tokens per image" in text and "read bandwidth" in text
    assert "2 images together, cached, fp32" in text
    assert "unguided in turn" in text and "(best of 3 each)" in text
    r = json.loads(out.read_text())["generate"]
    assert r["auto"] in ("fp32", "bf16-weights", "bf16")
    for p in ("fp32", "bf16"):
        assert r[f"guided_step_ratio_{p}"] > 0 and r[f"guided_cached_{p}_s"] > 0
    # the floor: the weight bytes of one step in each format; bf16 storage reads half of
    # fp32's where the gemv kernel serves it (elsewhere the fp32 widening is read)
    import torch

    from minidalle.inference import gemv

    stored = gemv.pack(torch.zeros(16, 16), store="bf16") is not None
    assert r["bytes_per_token_bf16w"] * (2 if stored else 1) == r["bytes_per_token_fp32"]
    assert r["floor_ratio_fp32"] == pytest.approx(r["cached_fp32_s"] / r["floor_fp32_s"])
    turns = r["floor_ratios_in_turn_fp32"]
    assert len(turns) == 3 and turns == sorted(turns) and all(t > 0 for t in turns)
    assert "x floor (median of 3, range" in text


def test_bench_rejects_bad_bench_section(tmp_path, capsys):
    assert main(["bench", str(ROOT / "configs" / "unit_test.toml"), "--set", "bench.fmap_size=0"]) == 2
    assert "bench.fmap_size: expected a positive integer" in capsys.readouterr().err


def test_command_modules_do_not_import_torch():
    code = ("import sys, minidalle.commands.run, minidalle.commands.bench, minidalle.recipes.stages; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0
