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
    return _tiny.tiny_config_file(tmp_path, extra, checkpoint_every=1)


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
    from minidalle.train.trainer import train_from_config as train

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
    from minidalle.train.trainer import train_from_config as train

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


def test_steps_skipped_by_fp16_loss_scaling_are_not_bad_steps():
    from minidalle.train.backend import StepResult
    from minidalle.train.trainer import _non_finite

    assert _non_finite(float("nan"), StepResult(loss=float("nan")))
    assert _non_finite(1.0, StepResult(loss=1.0, grad_norm=float("inf")))
    assert not _non_finite(float("inf"), StepResult(loss=float("inf"), skipped_updates=1))
    assert not _non_finite(1.0, StepResult(loss=1.0, grad_norm=3.0))


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
    from test_generate_cli import RerankerPlugin

    return _tiny.use_tiny_registry(RerankerPlugin)


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


# --------------------------------------------------------------------------- 4. OS errors


def test_full_disk_mid_checkpoint_is_one_line_and_leaves_no_tmp(tmp_path):
    """A real write failure (RLIMIT_FSIZE: the file-size limit a full disk also hits) in a
    subprocess: one line naming the file, exit 2, no .tmp- directory."""
    cfg = _config(tmp_path)
    script = f"""
import resource, signal, sys
sys.path.insert(0, {str(ROOT / 'tests')!r})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
import _tiny
from minidalle.cli import main
_tiny.use_tiny_registry()
resource.setrlimit(resource.RLIMIT_FSIZE, (60000, 60000))
sys.exit(main(["run", {str(cfg)!r}]))
"""
    env = dict(os.environ, PYTHONPATH=str(ROOT), MINIDALLE_TEST="1")
    env.pop("MINIDALLE_RUN_LOCK", None)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          timeout=300)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(err) == 1 and "Traceback" not in proc.stderr, err
    assert "File too large" in err[0] and ".safetensors" in err[0]
    ckpts = tmp_path / "out" / "checkpoints"
    assert not [p for p in ckpts.iterdir() if p.name.startswith(".tmp")]


def test_out_dir_that_cannot_be_created_is_one_line(tmp_path, tiny_registry, capsys):
    (tmp_path / "file").write_text("x")
    line = _one_line_error(capsys, 2, main(["run", str(_config(tmp_path)),
                                            "--set", f"run.out_dir={tmp_path / 'file' / 'out'}"]))
    assert str(tmp_path / "file") in line and "Not a directory" in line


def test_read_only_out_dir_is_one_line(tmp_path, tiny_registry, capsys):
    if os.geteuid() == 0:
        pytest.skip("needs a non-root user: root writes into read-only folders")
    cfg = _config(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out").chmod(0o555)
    try:
        for argv in (["run", str(cfg)], ["run", str(cfg), "--resume"]):
            line = _one_line_error(capsys, 2, main(argv))
            assert "Permission denied" in line and str(tmp_path / "out") in line
    finally:
        (tmp_path / "out").chmod(0o755)


def test_os_errors_anywhere_become_one_line(tmp_path, tiny_registry, capsys, monkeypatch):
    """The CLI's one translation point: an OSError from deep inside (here: writing the
    metrics file of a read-only folder, as root cannot be refused) is one line, exit 2."""
    import builtins

    real_open = builtins.open
    target = str(tmp_path / "out" / "metrics.jsonl")

    def fake_open(file, *a, **k):
        if str(file) == target:
            raise PermissionError(13, "Permission denied", target)
        return real_open(file, *a, **k)

    monkeypatch.setattr(builtins, "open", fake_open)
    line = _one_line_error(capsys, 2, main(["run", str(_config(tmp_path))]))
    assert line == f"minidalle: error: {target}: Permission denied"


def test_a_fault_that_is_not_the_users_is_one_line_exit_1(tmp_path, tiny_registry, capsys, monkeypatch):
    import minidalle.train.trainer as trainer_mod

    def broken(*a, **k):
        raise TypeError("unsupported operand")

    monkeypatch.setattr(trainer_mod, "epoch_order", broken)
    line = _one_line_error(capsys, 1, main(["run", str(_config(tmp_path))]))
    assert "internal error (TypeError: unsupported operand)" in line and "--debug" in line
    with pytest.raises(TypeError):
        main(["--debug", "run", str(_config(tmp_path)), "--resume"])


def test_config_that_is_not_utf8(tmp_path, tiny_registry, capsys):
    cfg = tmp_path / "latin1.toml"
    cfg.write_bytes('[run]\nname = "caf\xe9"\n'.encode("latin-1"))
    line = _one_line_error(capsys, 2, main(["config", "show", str(cfg)]))
    assert str(cfg) in line and "UTF-8" in line


def test_generate_out_that_is_a_file_fails_before_sampling(tmp_path, gen_registry, capsys, monkeypatch):
    import minidalle.inference.sampling as sampling

    run, _ = _gen_checkpoint(tmp_path, gen_registry)
    (tmp_path / "taken").write_text("keep me")
    monkeypatch.setattr(sampling, "generate_image_codes", lambda *a, **k: pytest.fail("sampled"))
    line = _one_line_error(capsys, 2, main(["generate", "--checkpoint", str(run), "--text", "a",
                                            "--out", str(tmp_path / "taken")]))
    assert "--out" in line and "not a folder" in line
    assert (tmp_path / "taken").read_text() == "keep me"


def test_generate_warns_before_replacing_an_earlier_grid(tmp_path, gen_registry, capsys):
    run, _ = _gen_checkpoint(tmp_path, gen_registry)
    argv = ["generate", "--checkpoint", str(run), "--text", "a", "--out", str(tmp_path / "o"),
            "--num-images", "1"]
    assert main(argv) == 0
    assert "earlier run" not in capsys.readouterr().err
    assert main(argv) == 0
    assert "holds images of an earlier run" in capsys.readouterr().err


# --------------------------------------------------------------------------- 5. other bad input


@pytest.mark.parametrize("argv, expect", [
    (["--seed", str(2**70)], "--seed"),
    (["--seed", "-1"], "--seed"),
    (["--num-images", "100000000000"], "--num-images"),
    (["--threads", "0"], "--threads"),
    (["--text", "caf\udce9"], "not valid UTF-8"),
])
def test_generate_bad_arguments_are_one_line(tmp_path, gen_registry, capsys, argv, expect):
    run, _ = _gen_checkpoint(tmp_path, gen_registry)
    text = [] if "--text" in argv else ["--text", "a"]
    line = _one_line_error(capsys, 2, main(["generate", "--checkpoint", str(run), *text, *argv,
                                            "--out", str(tmp_path / "o")]))
    assert expect in line


def test_decompression_bomb_prime_image(tmp_path, gen_registry, capsys):
    from PIL import Image

    run, _ = _gen_checkpoint(tmp_path, gen_registry)
    bomb = tmp_path / "bomb.png"
    Image.new("1", (20000, 20000)).save(bomb)  # 400 Mpx: twice PIL's bomb limit, 50 KB on disk
    line = _one_line_error(capsys, 2, main(["generate", "--checkpoint", str(run), "--text", "a",
                                            "--prime-image", str(bomb), "--out", str(tmp_path / "o")]))
    assert str(bomb) in line and "decompression bomb" in line.lower()


@pytest.mark.parametrize("override", ["model.dim=1099511627776", "model.text_seq_len=1099511627776"])
def test_allocation_failure_is_one_line(tmp_path, tiny_registry, capsys, override):
    line = _one_line_error(capsys, 2, main(["run", str(_config(tmp_path)), "--set", override]))
    assert "out of memory" in line and "model.dim" in line


def test_huge_run_seed_is_a_config_error(tmp_path, tiny_registry, capsys):
    line = _one_line_error(capsys, 2, main(["config", "show", str(_config(tmp_path)),
                                            "--set", f"run.seed={2**70}"]))
    assert "run.seed" in line


# --------------------------------------------------------------------------- 6. plugins


def _plugin_module(name, **hooks):
    import types

    from minidalle import hookimpl

    mod = types.ModuleType(name)
    for hook, fn in hooks.items():
        setattr(mod, hook, hookimpl(fn))
    return mod


def test_plugin_factory_that_raises_is_one_line_naming_it(tmp_path, capsys):
    import minidalle.plugin.discovery as plugins
    from minidalle.plugin.discovery import load_registry

    def reg(register):
        register("boom", lambda: 1 / 0, summary="raises")

    plugins._registry = load_registry(autoload="none", extra_plugins=[
        _tiny.Plugin, _plugin_module("boom_plugin", minidalle_rerankers=reg)])
    run, _ = _gen_checkpoint(tmp_path, plugins._registry)
    line = _one_line_error(capsys, 1, main(["generate", "--checkpoint", str(run), "--text", "a",
                                            "--rerank", "boom", "--out", str(tmp_path / "o")]))
    assert "reranker 'boom' (boom_plugin) failed to build: ZeroDivisionError" in line


def test_plugin_raising_system_exit_at_import_is_a_failed_plugin(tmp_path):
    pkg = tmp_path / "site"
    (pkg / "exit_plugin").mkdir(parents=True)
    (pkg / "exit_plugin" / "__init__.py").write_text("raise SystemExit('bye')\n")
    dist = pkg / "exit_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: exit-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[minidalle]\nexit_plugin = exit_plugin\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(pkg), str(ROOT)]))
    env.pop("MINIDALLE_PLUGINS", None)
    proc = subprocess.run([sys.executable, "-m", "minidalle", "list", "--json"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    failures = json.loads(proc.stdout)["failed_plugins"]
    assert any(f["provider"] == "exit-plugin" and "SystemExit: bye" in f["error"] for f in failures)


# --------------------------------------------------------------------------- 8. leftovers and names


def test_restart_after_a_kill_before_the_first_checkpoint_logs_each_step_once(tmp_path, tiny_registry):
    cfg = _config(tmp_path, "").read_text().replace("checkpoint_every = 1", "checkpoint_every = 100")
    (tmp_path / "tiny.toml").write_text(cfg)
    out = tmp_path / "out"
    out.mkdir()
    # What a run killed at step 3, before any checkpoint, leaves behind:
    (out / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 9.0}) + "\n" for s in (1, 2, 3)))
    assert main(["run", str(tmp_path / "tiny.toml")]) == 0
    steps = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


@pytest.mark.parametrize("item, expect", [
    ("foo.bar=1", "--set: foo: unknown section"),
    ("training..lr=1", "--set 'training..lr=1': empty part"),
    ("training.lr.x=1", "--set training.lr.x=1: training.lr is not a table"),
    ("model.nope=1", "--set: model.nope: unknown key"),
])
def test_set_errors_blame_set(tmp_path, tiny_registry, capsys, item, expect):
    line = _one_line_error(capsys, 2, main(["config", "show", str(_config(tmp_path)), "--set", item]))
    assert expect in line, line


def test_dataset_root_not_found_names_the_config(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'extends = "{ROOT / "configs" / "unit_test.toml"}"\n[run]\nout_dir = "{tmp_path / "o"}"\n'
                   f'[tokenizer]\nname = "yttm"\npath = "{tmp_path / "none.yttm"}"\n'
                   f'[dataset]\nname = "folder"\nroot = "{tmp_path / "nowhere"}"\n')
    from minidalle.api import load_config
    from minidalle.train.pipeline import build_dataset

    with pytest.raises(Exception) as info:
        build_dataset(load_config(cfg))
    assert str(info.value).startswith(f"{cfg}: dataset.root: folder not found")


def test_caption_too_long_names_the_config(tmp_path, tiny_registry, capsys):
    cfg = _config(tmp_path, "")
    line = _one_line_error(capsys, 2, main(["run", str(cfg), "--set", "training.truncate_captions=false",
                                            "--set", "model.text_seq_len=2"]))
    assert line.startswith(f"minidalle: error: {cfg}: ") and "truncate_captions" in line


# --------------------------------------------------------------------------- 7. silent bad data


def test_16_bit_png_keeps_its_brightness(tmp_path):
    import numpy as np
    from PIL import Image

    from minidalle.data import load_image

    grey = np.full((8, 8), 32896, dtype=np.uint16)  # 50% grey in 16 bits
    grey[:4] = 0
    path = tmp_path / "grey16.png"
    Image.fromarray(grey).save(path)
    assert Image.open(path).mode.startswith("I")
    image = load_image(path, 8)
    assert image.shape == (3, 8, 8)
    assert int(image[:, :4].max()) == 0 and 126 <= int(image[:, 6:].float().mean()) <= 130


def test_caption_files_bom_and_non_utf8(tmp_path, caplog):
    from minidalle.data import read_caption_lines

    bom = tmp_path / "bom.txt"
    bom.write_bytes("\ufeffa red circle\n".encode("utf-8"))
    assert read_caption_lines(bom) == ["a red circle"]
    latin = tmp_path / "latin.txt"
    latin.write_bytes("un caf\xe9 rouge\n".encode("latin-1"))
    with caplog.at_level("WARNING"):
        assert read_caption_lines(latin) == ["un caf\ufffd rouge"]
    assert str(latin) in caplog.text and "not UTF-8" in caplog.text


def test_checkpoint_paths_work_from_anywhere_and_after_a_move(tmp_path, gen_registry, capsys, monkeypatch):
    """Component paths in a checkpoint: inside the run dir relative to it (the run dir can
    move), outside it absolute (any working directory); a missing file is named."""
    import shutil

    import torch

    from minidalle.components.tokenizers import yttm
    from minidalle.config import config_from_dict, config_to_dict
    from minidalle.model import build_model
    from minidalle.train.checkpoint import load_checkpoint, save_checkpoint

    pytest.importorskip("youtokentome")
    monkeypatch.chdir(tmp_path)
    tok = yttm.train(["a red circle", "a blue square"] * 5, 30, Path("run") / "bpe.yttm")
    table = {"model": {"dim": 32, "depth": 1, "heads": 2, "dim_head": 8, "text_seq_len": 8},
             "tokenizer": {"name": "yttm", "path": "run/bpe.yttm"}, "codec": {"name": "grey"},
             "dataset": {"name": "folder", "root": "data/pictures"}}
    cfg = config_from_dict(table, registry=gen_registry)
    model = build_model(cfg, text_vocab=tok.vocab_size, num_image_tokens=8, fmap_size=4,
                        registry=gen_registry)
    save_checkpoint(Path("run") / "checkpoints", step=1, model_state=model.state_dict(),
                    config=config_to_dict(cfg))

    shutil.move(tmp_path / "run", tmp_path / "moved")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    ck = load_checkpoint(tmp_path / "moved", registry=gen_registry)
    assert Path(ck.config.tokenizer.params.path) == (tmp_path / "moved" / "bpe.yttm").resolve()
    assert ck.config.dataset.params.root == str((tmp_path / "data" / "pictures").resolve())
    argv = ["generate", "--checkpoint", str(tmp_path / "moved"), "--text", "a red circle",
            "--num-images", "1", "--out", str(tmp_path / "o")]
    assert main(argv) == 0, capsys.readouterr().err
    (tmp_path / "moved" / "bpe.yttm").unlink()
    line = _one_line_error(capsys, 2, main(argv))
    assert str((tmp_path / "moved" / "bpe.yttm").resolve()) in line and "not found" in line
