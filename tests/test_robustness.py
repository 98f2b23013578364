"""Issue 17: nothing breaks badly. Divergence stops a run, one writer per run directory,
corrupt metadata and ordinary OS errors are one line (exit 2; exit 1 for faults that are
not the user's), and nothing already written is lost."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import _tiny
from minidalle.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _config(tmp_path, extra=""):
    path = tmp_path / "tiny.toml"
    path.write_text(f"""
extends = "{ROOT / 'configs' / 'unit_test.toml'}"
[run]
out_dir = "{tmp_path / 'out'}"
[model]
text_seq_len = 16
[training]
dataloader_workers = 0
checkpoint_every = 1
[tokenizer]
name = "tiny_chars"
[dataset]
name = "tiny_codes"
size = 8
{extra}
""")
    return path


@pytest.fixture
def tiny_registry():
    return _tiny.use_tiny_registry()


def _one_line_error(capsys, code_expected, rc):
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == code_expected, err
    assert len(err) == 1 and err[0].startswith("minidalle: error: "), err
    assert "Traceback" not in err[0]
    return err[0]


# --------------------------------------------------------------------------- 1. divergence


@pytest.mark.parametrize("bad", ["training.lr=inf", "training.lr=nan", "training.lr=-inf",
                                 "training.betas=[1.5, 0.99]", "training.eps=nan",
                                 "model.loss_img_weight=inf", "training.max_bad_steps=0"])
def test_non_finite_or_out_of_range_hyperparameters_are_config_errors(tmp_path, tiny_registry, capsys, bad):
    cfg = _config(tmp_path)
    line = _one_line_error(capsys, 2, main(["config", "show", str(cfg), "--set", bad]))
    assert bad.split("=")[0] in line and "--set" in line
    assert not (tmp_path / "out").exists()


class _Poison:
    """A callback that makes the loss non-finite from step ``at`` on, as a diverging run does."""

    def __init__(self, at):
        self.at = at

    def __call__(self, trainer, step, result):
        import torch

        if step + 1 >= self.at:
            with torch.no_grad():
                for p in trainer.model.parameters():
                    p.fill_(float("nan"))


def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, tiny_registry, capsys):
    from minidalle.config import load_config
    from minidalle.errors import TrainingDivergedError
    from minidalle.train.checkpoint import load_checkpoint
    from minidalle.train.trainer import train

    cfg = load_config(_config(tmp_path), ["training.epochs=3"], registry=tiny_registry)
    with pytest.raises(TrainingDivergedError) as info:
        train(cfg, registry=tiny_registry, callbacks=[_Poison(at=3)], show_progress=False)
    msg = str(info.value)
    assert "\n" not in msg and "step 3" in msg and "training.lr" in msg
    ckpts = sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir())
    assert ckpts[-1] == "step-00000002", ckpts  # nothing saved from the NaN weights
    assert "step-00000002" in msg
    import torch
    ck = load_checkpoint(tmp_path / "out", registry=tiny_registry)
    assert all(torch.isfinite(t).all() for t in ck.state_dict.values())


def test_max_bad_steps_allows_isolated_bad_steps(tmp_path, tiny_registry):
    """A single non-finite step leaves the weights untouched and, with max_bad_steps = 2,
    the run goes on."""
    import torch

    from minidalle.config import load_config
    from minidalle.train.trainer import train

    cfg = load_config(_config(tmp_path), ["training.max_bad_steps=2"], registry=tiny_registry)

    class Once:
        def __init__(self):
            self.done = False

        def __call__(self, trainer, step, result):
            if step == 1 and not self.done:  # the next batch's loss goes NaN once
                self.done = True
                real = trainer.model.forward

                def forward(*a, **k):
                    trainer.model.forward = real
                    return real(*a, **k) * float("nan")

                trainer.model.forward = forward

    result = train(cfg, registry=tiny_registry, callbacks=[Once()], show_progress=False)
    assert result.step == 4 and result.checkpoint is not None
    metrics = [json.loads(l) for l in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[1]["step"] == 2 and metrics[1]["loss"] != metrics[1]["loss"]  # NaN
    assert all(m["loss"] == m["loss"] for m in metrics if m["step"] != 2)
    assert not (tmp_path / "out" / "checkpoints" / "step-00000002").exists()


def test_diverged_cli_run_exits_nonzero_with_one_line(tmp_path, tiny_registry, capsys, monkeypatch):
    import minidalle.train.trainer as trainer_mod

    real = trainer_mod.Trainer.__init__

    def init(self, *a, **k):
        real(self, *a, **k)
        self.callbacks.append(_Poison(at=2))

    monkeypatch.setattr(trainer_mod.Trainer, "__init__", init)
    line = _one_line_error(capsys, 2, main(["run", str(_config(tmp_path))]))
    assert "diverged" in line and "step 2" in line


# --------------------------------------------------------------------------- 2. run-directory lock

_HOLD = """
import sys, time
from minidalle.runlock import run_lock
with run_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(60)
"""


def _holder(out_dir):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("MINIDALLE_RUN_LOCK", None)
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(out_dir)], stdout=subprocess.PIPE,
                            text=True, env=env)
    assert proc.stdout.readline().strip() == "locked"
    return proc


@pytest.mark.parametrize("resume", [False, True])
def test_second_run_on_a_locked_out_dir_is_refused_naming_the_pid(tmp_path, tiny_registry, capsys, resume):
    cfg = _config(tmp_path)
    holder = _holder(tmp_path / "out")
    try:
        argv = ["run", str(cfg)] + (["--resume"] if resume else [])
        line = _one_line_error(capsys, 2, main(argv))
        assert f"pid {holder.pid}" in line and str(tmp_path / "out") in line
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".minidalle.lock"]
    finally:
        holder.kill()
        holder.wait()
    # The kernel released the killed holder's lock: the run goes ahead.
    assert main(["run", str(cfg)]) == 0
    assert (tmp_path / "out" / "checkpoints").is_dir()


def test_lock_is_exclusive_within_one_process_too(tmp_path):
    from minidalle.errors import RunLockedError
    from minidalle.runlock import run_lock

    with run_lock(tmp_path / "run"):
        env = os.environ.pop("MINIDALLE_RUN_LOCK")  # as a second, unrelated caller
        try:
            with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
                with run_lock(tmp_path / "run"):
                    pass
        finally:
            os.environ["MINIDALLE_RUN_LOCK"] = env
    with run_lock(tmp_path / "run"):  # released
        pass


# --------------------------------------------------------------------------- 3. checkpoint metadata


@pytest.fixture
def gen_registry():
    import minidalle.plugin.discovery as plugins
    from minidalle.plugin.discovery import load_registry
    from test_generate_cli import Plugin

    plugins._registry = load_registry(autoload="none", extra_plugins=[Plugin])
    return plugins._registry


def _gen_checkpoint(tmp_path, registry):
    from test_generate_cli import _checkpoint

    run = _checkpoint(tmp_path, registry)
    return run, next((run / "checkpoints").iterdir()) / "meta.json"


def _edit_meta(meta_path, edit):
    meta = json.loads(meta_path.read_text())
    meta = edit(meta)
    meta_path.write_text(json.dumps(meta))


META_CASES = {
    "null": lambda m: None,
    "list": lambda m: [1, 2],
    "version string": lambda m: {**m, "format_version": "1"},
    "version bool": lambda m: {**m, "format_version": True},
    "step negative": lambda m: {**m, "step": -3},
    "files list": lambda m: {**m, "files": []},
    "files empty": lambda m: {**m, "files": {}},
    "no bytes": lambda m: {**m, "files": {k: {"sha256": v["sha256"]} for k, v in m["files"].items()}},
    "alias to nothing": lambda m: {**m, "model_aliases": {"to_logits.1.weight": "no.such.tensor"}},
    "config null": lambda m: {**m, "config": None},
    "info list": lambda m: {**m, "info": [1]},
}


@pytest.mark.parametrize("case", sorted(META_CASES))
def test_corrupt_meta_json_is_one_line_naming_the_file(tmp_path, gen_registry, capsys, case):
    run, meta_path = _gen_checkpoint(tmp_path, gen_registry)
    _edit_meta(meta_path, META_CASES[case])
    rc = main(["generate", "--checkpoint", str(run), "--text", "a", "--out", str(tmp_path / "o")])
    line = _one_line_error(capsys, 2, rc)
    assert str(meta_path) in line and "corrupt checkpoint metadata" in line
    assert not (tmp_path / "o").exists()


def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, gen_registry, capsys):
    import torch
    from safetensors.torch import load_file, save_file

    from minidalle.train.checkpoint import save_checkpoint

    run, meta_path = _gen_checkpoint(tmp_path, gen_registry)
    weights = load_file(str(meta_path.parent / "model.safetensors"))
    weights = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in weights.items()}
    meta = json.loads(meta_path.read_text())
    save_checkpoint(run / "checkpoints", step=4, model_state=weights, config=meta["config"])
    rc = main(["generate", "--checkpoint", str(run), "--text", "a", "--out", str(tmp_path / "o")])
    line = _one_line_error(capsys, 2, rc)
    assert "step-00000004" in line and "inf or NaN" in line


def test_truncated_tokenizer_file_is_named(tmp_path):
    from minidalle.components.tokenizers import yttm
    from minidalle.errors import DataError

    pytest.importorskip("youtokentome")
    path = tmp_path / "bpe.yttm"
    yttm.train(["a red circle", "a blue square", "a green triangle"] * 5, 40, path)
    assert yttm.YttmTokenizer(path).vocab_size == 40
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    path.write_text("".join(lines[: len(lines) // 2]), encoding="utf-8")
    with pytest.raises(DataError, match=f"{path}: truncated youtokentome model file"):
        yttm.YttmTokenizer(path)
    assert not list(tmp_path.glob(".yttm-*"))


def test_stale_yttm_temp_dirs_of_dead_processes_are_removed(tmp_path):
    from minidalle.components.tokenizers import yttm

    pytest.importorskip("youtokentome")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (tmp_path / f".yttm-{dead}-abc").mkdir()
    (tmp_path / f".yttm-{os.getpid()}-live").mkdir()  # a live process's: kept
    yttm.train(["a red circle", "a blue square"] * 5, 30, tmp_path / "bpe.yttm")
    assert sorted(p.name for p in tmp_path.glob(".yttm-*")) == [f".yttm-{os.getpid()}-live"]
