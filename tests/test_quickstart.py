"""The quickstart pipeline: every stage of configs/quickstart_mini.toml end to end,
interruption after the codec stage and resumption, ``--from``, ``minidalle evaluate``, and the
shapes analyser that prompt fidelity relies on."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from minidalle.cli import main
from minidalle.api import load_config

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.toml"
MINI = ROOT / "configs" / "quickstart_mini.toml"
RUN = Path("output/quickstart_mini")  # relative to the working directory (tmp_path)


def _opens(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        img.load()
        return img.size


# --------------------------------------------------------------------------- analyser


def test_analyser_reads_real_quickstart_images():
    """The analyser must score >= 98% on real images of the quickstart's own dataset, on
    seen and withheld combinations alike, before fidelity means anything."""
    from minidalle.components.datasets.shapes import is_excluded, parse_combination
    from minidalle.recipes.quickstart.evaluation import analyser_for, dataset_split, score

    cfg = load_config(QUICKSTART)
    size = cfg.extra["codec_training"]["image_size"]
    analyse = analyser_for(cfg)
    for split in ("val", "heldout"):
        ds = dataset_split(cfg, split, size)
        items = [ds[i] for i in range(200)]
        result = score([it["image"] for it in items], [it["attributes"] for it in items], analyse)
        assert result["accuracy"] >= 0.98, (split, result)
    # withheld combinations really are absent from training and present in heldout
    train = dataset_split(cfg, "train", size)
    params = cfg.dataset.params
    withheld = [parse_combination(c, params.colours, params.shapes, params.positions)
                for c in params.exclude]
    triple = lambda a: (a["colour"], a["shape"], a["position"])
    assert withheld
    assert not any(is_excluded(*triple(train.attributes(i)), withheld) for i in range(2000))
    held = dataset_split(cfg, "heldout", size)
    assert all(is_excluded(*triple(held.attributes(i)), withheld) for i in range(50))


def test_prompts_balanced_over_the_withheld_combinations():
    """Each withheld combination gets n / combinations prompts, give or take one (a random
    draw gave one combination 13 of 64 prompts and another 3), and ``distinct`` each once."""
    from collections import Counter

    from minidalle.recipes.quickstart.evaluation import prompts

    cfg = load_config(QUICKSTART)
    size = cfg.extra["codec_training"]["image_size"]
    combos = len(cfg.dataset.params.exclude)
    counts = Counter(it["caption"] for it in prompts(cfg, "heldout", 64, size))
    assert len(counts) == combos and sum(counts.values()) == 64
    assert max(counts.values()) - min(counts.values()) <= 1
    distinct = prompts(cfg, "heldout", 64, size, distinct=True)
    assert len(distinct) == combos == len({it["caption"] for it in distinct})
    seen = Counter(it["caption"] for it in prompts(cfg, "val", 20, size))
    assert len(seen) == 20  # fewer prompts than seen combinations: each a different one


def test_score_counts_mismatches():
    from minidalle.components.datasets.shapes import render
    from minidalle.recipes.quickstart.evaluation import score

    want = {"shape": "circle", "colour": "red", "position": "top left", "size": "large"}
    other = dict(want, colour="blue")
    images = [render(want, 32), render(other, 32), torch.zeros(3, 32, 32, dtype=torch.uint8)]
    from minidalle.recipes.quickstart.analyse import analyse

    result = score(images, [want, want, want], analyse)
    assert result["accuracy"] == pytest.approx(1 / 3)
    assert result["shape"] == pytest.approx(2 / 3)  # the empty image has no shape at all
    assert result["colour"] == pytest.approx(1 / 3)
    # per caption: which withheld combination is drawn wrong, not only how many images
    per = score(images, [want, want, want], analyse, captions=["a", "a", "b"])
    assert per["by_caption"] == {"a": 0.5, "b": 0.0}
    assert per["captions_right"] == 1 and per["captions"] == 2


def test_loss_plot_without_history(tmp_path):
    from minidalle.recipes.quickstart.evaluation import plot_losses

    path = plot_losses([], [], tmp_path / "loss.png")
    assert _opens(path)[0] > 100
    path = plot_losses([(1, 3.0), (2, 2.5), (3, 2.0)], [(3, 2.2)], tmp_path / "loss2.png")
    assert _opens(path)[0] > 100
    assert not list(tmp_path.glob(".*.tmp"))


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def mini_run(tmp_path_factory):
    """Run the mini quickstart once: first cut after the codec stage (an interrupted run),
    then the whole config (which must pick up after the codec)."""
    work = tmp_path_factory.mktemp("quickstart")
    old = os.getcwd()
    os.chdir(work)
    logs = {}
    try:
        import contextlib
        import io

        for name, extra in (("codec_only", ["--set", 'run.stages=["codec"]']), ("full", [])):
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                rc = main(["run", str(MINI), *extra])
            logs[name] = (rc, out.getvalue())
            if name == "codec_only":
                logs["after_codec"] = sorted(str(p.relative_to(work)) for p in (work / RUN).rglob("*")
                                             if p.is_file())
        yield work, logs
    finally:
        os.chdir(old)


def test_interrupted_after_codec_then_resumed(mini_run):
    work, logs = mini_run
    rc, out = logs["codec_only"]
    assert rc == 0
    assert "stage codec: running" in out
    files = logs["after_codec"]
    assert f"{RUN}/codec/vqgan.ckpt" in files and f"{RUN}/codec/vqgan.yaml" in files
    assert not any("checkpoints" in f or f.endswith("tokenizer.yttm") for f in files)
    rc, out = logs["full"]
    assert rc == 0, out
    assert "stage codec: complete, skipped" in out
    for stage in ("tokenizer", "transformer", "samples", "evaluate"):
        assert f"stage {stage}: running" in out
    assert "prompt fidelity (seen combinations)" in out  # the summary


def test_run_directory_holds_everything(mini_run):
    work, _ = mini_run
    run = work / RUN
    assert (run / "tokenizer.yttm").is_file()
    assert list((run / "checkpoints").glob("step-*/model.safetensors"))
    for name in ("samples.png", "reconstructions.png", "loss.png", "codec/vqgan.recon.png"):
        w, h = _opens(run / name)
        assert w >= 64 and h >= 64, name
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["analyser"]["accuracy"] >= 0.98
    assert set(metrics["fidelity"]) == {"seen", "withheld"}
    for group in metrics["fidelity"].values():
        assert group["images"] == 4 and 0.0 <= group["accuracy"] <= 1.0
    withheld = metrics["fidelity"]["withheld"]
    assert 0 <= withheld["captions_right"] <= withheld["captions"] == len(withheld["by_caption"]) > 0
    assert metrics["codec"]["psnr"] > 0 and 0 < metrics["codec"]["usage"] <= 1
    factors = metrics["codec_factors"]  # the colour x outline codec's own check
    assert set(factors["colour_codes"]) == {"red", "green", "blue", "yellow", "purple"}
    assert all(0 <= factors[k] <= 1 for k in ("same_codes_in_every_cell", "outline_same_across_colours"))
    assert metrics["loss"]["steps"] == 6 and "val_loss" in metrics["loss"]
    # what every dataset gets (minidalle/recipes/evaluation.py), beside the shapes fidelity
    assert metrics["heldout"]["source"] == "the dataset's val split"
    assert metrics["heldout_loss"]["image_loss"] > 0 and -1 <= metrics["codec"]["ssim"] <= 1
    assert "fid_weights" in metrics["fid"]["skipped"] and _opens(run / "evaluate_grid.png")[0] >= 64
    # trained with null captions (quickstart.toml): fidelity and loss at each cond_scale
    assert set(metrics["guidance"]) == {"1", "2"}
    for row in metrics["guidance"].values():
        assert 0 <= row["seen"] <= 1 and 0 <= row["withheld"] <= 1 and row["image_loss"] > 0
    assert metrics["guidance"]["1"]["image_loss"] != metrics["guidance"]["2"]["image_loss"]
    r = metrics["rerank"]
    assert r["candidates"] == 2 and r["group"] == "withheld" and 0 <= r["reranked"] <= 1
    assert not list(run.rglob("*.tmp"))


def test_from_stage_reruns_only_later_stages(mini_run, capsys):
    work, _ = mini_run
    run = work / "output" / "quickstart_mini"
    os.chdir(work)
    stamp = {p: p.stat().st_mtime_ns for p in (run / "codec/vqgan.ckpt", run / "tokenizer.yttm",
                                              run / "samples.png", run / "metrics.json")}
    (run / "metrics.json").write_text("{}")
    assert main(["run", str(MINI), "--from", "samples"]) == 0
    out = capsys.readouterr().out
    for stage in ("codec", "tokenizer", "transformer"):
        assert f"stage {stage}: complete, skipped" in out
    assert "stage samples: running" in out and "stage evaluate: running" in out
    assert (run / "codec/vqgan.ckpt").stat().st_mtime_ns == stamp[run / "codec/vqgan.ckpt"]
    assert (run / "tokenizer.yttm").stat().st_mtime_ns == stamp[run / "tokenizer.yttm"]
    assert (run / "samples.png").stat().st_mtime_ns != stamp[run / "samples.png"]
    assert "fidelity" in json.loads((run / "metrics.json").read_text())
    # a complete run is skipped entirely
    assert main(["run", str(MINI)]) == 0
    out = capsys.readouterr().out
    assert out.count("complete, skipped") == 5


def test_evaluate_command(mini_run, capsys):
    work, _ = mini_run
    os.chdir(work)
    assert main(["evaluate", str(RUN), "--set", "evaluate.seen_prompts=2",
                 "--set", "evaluate.withheld_prompts=0", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["fidelity"]["seen"]["images"] == 2 and "withheld" not in metrics["fidelity"]
    assert json.loads((work / RUN / "metrics.json").read_text()) == metrics


def test_evaluate_errors_are_one_line(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such run directory" in err[0]
    assert main(["evaluate", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no checkpoint" in err[0]


def test_codec_stage_checks_paths(tmp_path):
    from minidalle.errors import ConfigError
    from minidalle.recipes.stages import StageContext

    cfg = load_config(MINI, ["codec_training.out=elsewhere/vqgan.ckpt"])
    with pytest.raises(ConfigError, match="differs from codec.path"):
        cfg.registry.stage("codec").is_complete(StageContext(cfg=cfg, out_dir=tmp_path))
