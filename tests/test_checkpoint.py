"""Checkpoints: atomic layout, pickle-free state, load_checkpoint, corrupt files, and
resume after SIGKILL ending bit-identical to an uninterrupted run."""
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import _tiny
from minidalle.train.checkpoint import (
    flatten_tree,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    unflatten_tree,
)
from minidalle.components.backends.cpu import CpuBackend, CpuConfig
from minidalle.errors import CheckpointError
from minidalle.train.pipeline import Pipeline
from minidalle.train.trainer import Trainer, seed_everything

ROOT = Path(__file__).resolve().parents[1]


def _train(out, *overrides, resume=False, callbacks=()):
    cfg = _tiny.tiny_config(out, *overrides)
    seed_everything(cfg.run.seed)
    pipe = Pipeline(cfg, _tiny.registry())
    trainer = Trainer(cfg, model=pipe.model, dataset=pipe.dataset, collate=pipe.collate,
                      backend=CpuBackend(CpuConfig()), show_progress=False, callbacks=callbacks)
    return trainer, trainer.train(resume=resume)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    _train(out, "training.max_steps=4", "training.checkpoint_every=2")
    return out


def test_layout_and_metadata(run_dir):
    steps = list_checkpoints(run_dir / "checkpoints")
    assert [p.name for p in steps] == ["step-00000002", "step-00000004"]
    meta = json.loads((steps[-1] / "meta.json").read_text())
    assert meta["step"] == 4 and meta["info"]["final"] is True
    assert meta["config"]["model"]["dim"] == 64 and meta["config"]["tokenizer"]["name"] == "tiny_chars"
    assert set(meta["versions"]) >= {"minidalle", "torch", "safetensors"}
    assert set(meta["training_state"]) == {"optimizer", "scheduler", "rng", "backend_rng", "runner"}
    assert meta["training_state"]["scheduler"]["step_count"] == 4
    assert set(meta["files"]) == {"model.safetensors", "state.safetensors"}
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))


def test_files_are_safetensors_and_json_only(run_dir):
    step = list_checkpoints(run_dir / "checkpoints")[-1]
    assert sorted(p.name for p in step.iterdir()) == ["meta.json", "model.safetensors", "state.safetensors"]
    from safetensors.torch import load_file

    state = load_file(str(step / "state.safetensors"))
    assert any(".exp_avg" in k for k in state) and any(k.startswith("s.rng.torch") for k in state)


@pytest.mark.parametrize("which", ["run", "checkpoints", "step"])
def test_load_checkpoint_accepts_run_checkpoints_or_step_dir(run_dir, which):
    path = {"run": run_dir, "checkpoints": run_dir / "checkpoints",
            "step": run_dir / "checkpoints" / "step-00000004"}[which]
    ck = load_checkpoint(path, registry=_tiny.registry())
    config, state, meta = ck
    assert meta["step"] == 4 and ck.path.name == "step-00000004"
    assert config.model.dim == 64 and config.tokenizer.name == "tiny_chars"
    assert "to_logits.weight" in state and state["to_logits.weight"].dtype == torch.float32
    model = Pipeline(config, _tiny.registry()).model
    model.load_state_dict(state)  # strict: every key matches


def test_tree_round_trip_without_pickle():
    tree = {"state": {0: {"step": torch.tensor(3.0), "m": torch.ones(2)}},
            "groups": [{"betas": (0.9, 0.99), "params": [0, 1], "name": None}], "x": float("inf")}
    tensors = {}
    skeleton = flatten_tree(tree, tensors, "s")
    json.dumps(skeleton)  # plain JSON
    back = unflatten_tree(json.loads(json.dumps(skeleton)), tensors)
    assert back["groups"][0]["betas"] == (0.9, 0.99) and 0 in back["state"]
    assert torch.equal(back["state"][0]["m"], torch.ones(2))
    with pytest.raises(TypeError, match="without pickle"):
        flatten_tree({"f": object()}, {}, "s")


def test_tied_weights_are_saved_once(tmp_path):
    w = torch.randn(3, 4)
    path = save_checkpoint(tmp_path, step=1, model_state={"a": w, "b": w}, config={})
    ck = load_checkpoint(path, with_config=False)
    assert torch.equal(ck.state_dict["a"], w) and torch.equal(ck.state_dict["b"], w)


def _copy_run(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return list_checkpoints(dst / "checkpoints")[-1]


def test_truncated_weights_are_a_clear_error(run_dir, tmp_path):
    step = _copy_run(run_dir, tmp_path / "r")
    f = step / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated or corrupt"):
        load_checkpoint(tmp_path / "r", with_config=False)


def test_flipped_bytes_are_a_clear_error(run_dir, tmp_path):
    step = _copy_run(run_dir, tmp_path / "r")
    f = step / "state.safetensors"
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"state\.safetensors: corrupt checkpoint file \(sha256"):
        load_checkpoint(step, with_config=False)


def test_corrupt_or_missing_meta_is_a_clear_error(run_dir, tmp_path):
    step = _copy_run(run_dir, tmp_path / "r")
    (step / "meta.json").write_text('{"step": 4, "conf')
    with pytest.raises(CheckpointError, match=r"meta\.json: corrupt checkpoint metadata"):
        load_checkpoint(step)
    (step / "meta.json").unlink()
    with pytest.raises(CheckpointError, match=r"meta\.json: missing: incomplete checkpoint"):
        load_checkpoint(tmp_path / "r")


def test_resume_from_a_corrupt_checkpoint_refuses_instead_of_restarting(run_dir, tmp_path):
    step = _copy_run(run_dir, tmp_path / "r")
    (step / "model.safetensors").write_bytes(b"\0" * 10)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        _train(tmp_path / "r", "training.max_steps=6", resume=True)


def test_a_second_run_into_the_same_dir_needs_resume(run_dir, tmp_path):
    _copy_run(run_dir, tmp_path / "r")
    with pytest.raises(CheckpointError, match="--resume"):
        _train(tmp_path / "r", "training.max_steps=6")


def test_no_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="no such"):
        load_checkpoint(tmp_path / "missing")


def test_resume_with_another_model_is_refused(run_dir, tmp_path):
    _copy_run(run_dir, tmp_path / "r")
    with pytest.raises(CheckpointError, match=r"different \[model\]"):
        _train(tmp_path / "r", "training.max_steps=6", "model.dim=32", resume=True)


def test_in_process_resume_matches_uninterrupted(run_dir, tmp_path):
    # run_dir trained 4 steps; resume it (in a copy) to 8 and compare with 8 straight.
    _copy_run(run_dir, tmp_path / "r")
    resumed, res = _train(tmp_path / "r", "training.max_steps=8", "training.checkpoint_every=2", resume=True)
    assert res.resumed_from == 4 and res.step == 8
    straight, _ = _train(tmp_path / "s", "training.max_steps=8", "training.checkpoint_every=2")
    a, b = resumed.model.state_dict(), straight.model.state_dict()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    steps = [json.loads(l)["step"] for l in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))


SCRIPT = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    import _tiny
    from minidalle.train.trainer import train_from_config as train

    out, resume, kill_at, precision = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), sys.argv[4]
    cfg = _tiny.tiny_config(out, "training.epochs=2", "training.checkpoint_every=3", "dataset.size=8",
                            "training.lr_scheduler=cosine", "training.warmup_steps=2",
                            "model.attn_dropout=0.1", "model.ff_dropout=0.1",
                            f"backend.precision={{precision}}")

    def kill(trainer, step, result):
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    train(cfg, resume=resume, registry=_tiny.registry(), callbacks=[kill], show_progress=False)
""")


@pytest.mark.parametrize("precision", ["fp32", "bf16-master"])
def test_resume_after_sigkill_is_bit_identical(tmp_path, precision):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.format(tests=str(ROOT / "tests")))
    env = {**os.environ, "OMP_NUM_THREADS": "2"}

    def run(out, resume, kill_at):
        return subprocess.run([sys.executable, str(script), str(out), "1" if resume else "0", str(kill_at),
                               precision], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)

    killed = run(tmp_path / "k", False, 5)  # 8 steps, checkpoints at 3 and 6; killed after step 5
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert [p.name for p in list_checkpoints(tmp_path / "k" / "checkpoints")][-1] == "step-00000003"
    # a crash in the middle of a checkpoint write leaves only a .tmp- directory
    junk = tmp_path / "k" / "checkpoints" / ".tmp-step-00000009-1"
    junk.mkdir()
    (junk / "model.safetensors").write_bytes(b"partial")
    resumed = run(tmp_path / "k", True, -1)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed at step 3" in resumed.stdout
    straight = run(tmp_path / "s", False, -1)
    assert straight.returncode == 0, straight.stderr

    a = load_checkpoint(tmp_path / "k", with_config=False)
    b = load_checkpoint(tmp_path / "s", with_config=False)
    assert a.step == b.step == 8
    for name, tensor in b.state_dict.items():
        assert torch.equal(a.state_dict[name], tensor), name
    opt_a, opt_b = a.training_state["optimizer"]["state"], b.training_state["optimizer"]["state"]
    for key in opt_b:
        assert torch.equal(opt_a[key]["exp_avg_sq"], opt_b[key]["exp_avg_sq"])
    assert not junk.exists()
