"""Data parallel on torch.distributed (CPU, gloo) and the cuda backend's CPU-side parts.

The multi-process tests run the real command line (``minidalle run CONFIG --nproc 2``, i.e.
torchrun's launcher) in subprocesses. The tiny tokenizer and dataset of ``tests/_tiny.py``
reach those processes as an installed plugin would: a hand-written ``*.dist-info`` with a
``minidalle`` entry point on their ``PYTHONPATH``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from minidalle.train.distributed import DataParallel, ShardSampler
from minidalle.train.trainer import epoch_order

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


# --------------------------------------------------------------------------- in-process


@pytest.mark.parametrize("n", [32, 33, 35])
def test_shards_partition_the_single_process_epoch_order(n):
    world, seed, epoch = 3, 7, 2
    shards = []
    for rank in range(world):
        s = ShardSampler(n, num_replicas=world, rank=rank, shuffle=True, seed=seed)
        s.set_epoch(epoch)
        shards.append(list(s))
    per = n // world
    assert all(len(s) == per for s in shards)  # drop_last: every process runs as many steps
    order = epoch_order(list(range(n)), seed, epoch)
    # The i-th samples of all processes together are the i-th group of `world` samples of
    # the one-process order, so micro-batch i of N processes = micro-batch i of one process
    # with an N times larger batch.
    for i in range(per):
        assert sorted(s[i] for s in shards) == sorted(order[i * world:(i + 1) * world])
    assert len({x for s in shards for x in s}) == per * world


def test_shards_reshuffle_each_epoch_and_follow_the_seed():
    def shard(epoch, seed=0, shuffle=True):
        s = ShardSampler(20, num_replicas=2, rank=1, shuffle=shuffle, seed=seed)
        s.set_epoch(epoch)
        return list(s)

    assert shard(0) == shard(0)
    assert shard(0) != shard(1)
    assert shard(0) != shard(0, seed=1)
    assert shard(0, shuffle=False) == list(range(1, 20, 2))


def test_single_process_needs_no_process_group(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    dp = DataParallel("gloo")
    assert (dp.rank, dp.world_size, dp.active) == (0, 1, False)
    assert dp.reduce_mean(2.5) == 2.5
    dp.barrier()  # no-op


def test_process_count_replaces_the_replication_factor(monkeypatch):
    import attrs

    from minidalle.config import TrainingConfig
    from minidalle.errors import ConfigError

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    dp = DataParallel("gloo")
    dp.world_size = 4  # as if torchrun had started 4 processes
    t = TrainingConfig(batch_size=3, gradient_accumulation=8, replication_factor=4)
    assert attrs.asdict(dp.local_training(t)) == attrs.asdict(attrs.evolve(t, replication_factor=1))
    assert dp.local_training(attrs.evolve(t, replication_factor=1)).replication_factor == 1
    with pytest.raises(ConfigError, match="replication_factor: expected 1 or the process count"):
        dp.local_training(attrs.evolve(t, replication_factor=2))


def test_missing_rendezvous_address_is_a_clear_error(monkeypatch):
    from minidalle.train.distributed import DistributedError

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(DistributedError, match="MASTER_ADDR/MASTER_PORT are not set"):
        DataParallel("gloo")


LEAVING = """
import os, torch
from minidalle.train.distributed import DataParallel, end_process_group
dp = DataParallel("gloo", timeout_s=60)
torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))])  # after joining, as the trainer does
dp.reduce_mean(1.0)
end_process_group()
names = []
for task in os.listdir("/proc/self/task"):
    with open(f"/proc/self/task/{task}/comm") as f:
        names.append(f.read().strip())
print("threads:", ",".join(sorted(names)))
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(),
                    reason="needs /proc/self/task (Linux) to list a process's threads")
def test_leaving_the_process_group_stops_its_threads():
    """A process that leaves the group has no gloo threads left for the interpreter's exit.

    A group that stays referenced after destroy_process_group() keeps them: one that drops
    its last finished work while the interpreter shuts down aborts the process (SIGABRT) after
    a finished job. Building the optimizer once did that, through an import."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", LEAVING], cwd=ROOT, text=True,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for r in (0, 1)]
    outs = [p.communicate(timeout=180) for p in procs]
    for rank, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {rank}: {err[-2000:]}"
        threads = out.split("threads:")[-1].strip().split(",")
        assert not [t for t in threads if "gloo" in t], f"rank {rank} still runs {threads}"


def test_gradient_averaging_keeps_unused_parameters_without_gradient():
    import torch.distributed as dist

    from minidalle.train.distributed import all_reduce_gradients

    # A one-process gloo group stands in for the job: the all-reduce sums just this
    # process, so averaging "over 2" halves what is there.
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        used, unused = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
        frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)
        used.grad = torch.full((3,), 4.0)
        all_reduce_gradients([used, unused, frozen], world_size=2)
        assert used.grad.tolist() == [2.0, 2.0, 2.0]
        assert unused.grad is None and frozen.grad is None
    finally:
        dist.destroy_process_group()


def test_cuda_probe_is_cheap_and_names_the_reason():
    code = ("import sys; from minidalle.components.backends.cuda_probe import unavailable_reason as r; "
            "print(repr(r())); assert 'torch' not in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    reason = eval(out.stdout.strip())
    has_driver = any(os.path.exists(p) for p in ("/proc/driver/nvidia/version", "/dev/nvidiactl", "/dev/dxg"))
    assert (reason is None) == has_driver
    if reason is not None:
        assert "no NVIDIA GPU/driver found" in reason
    hidden = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert "CUDA_VISIBLE_DEVICES" in hidden.stdout


def test_cuda_backend_without_a_gpu_says_why():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: tests/equivalence/test_cuda.py covers the cuda backend")
    from minidalle.components.backends.cuda import CudaBackend, CudaConfig
    from minidalle.errors import UnavailableComponentError

    with pytest.raises(UnavailableComponentError, match="cuda"):
        CudaBackend(CudaConfig(precision="fp16"))


def test_cuda_config_validates_precision():
    from minidalle.components.backends.cuda import CudaConfig
    from minidalle.config import structure_section
    from minidalle.errors import ConfigError

    assert structure_section({"precision": "fp16"}, CudaConfig, "backend").precision == "fp16"
    with pytest.raises(ConfigError, match="backend.precision: expected one of"):
        structure_section({"precision": "fp8"}, CudaConfig, "backend")


def _fp16_cpu_backend():
    """The cpu backend with the cuda backend's runner and fp16 autocast: the GradScaler
    logic on the CPU (the runner takes its device from the backend)."""
    from minidalle.components.backends.cpu import CpuBackend
    from minidalle.components.backends.cuda import CudaRunner

    class Fp16Cpu(CpuBackend):
        precision = "fp16"

        def autocast(self):
            return torch.autocast("cpu", dtype=torch.float16)

        def prepare(self, model, optimizer, training):
            return CudaRunner(self, model, optimizer, training)

    return Fp16Cpu()


def _fp16_step(loss_scaling: float, state: dict | None = None):
    """One step of the cuda backend's runner with fp16 autocast and a GradScaler, on the CPU."""
    from minidalle.model import build_model
    from minidalle.testing.backend import fixed_batch, unit_test_config

    sizes = dict(text_vocab=64, num_image_tokens=32, fmap_size=4)
    cfg = unit_test_config(training={"loss_scaling": loss_scaling}, model={"text_seq_len": 8})
    backend = _fp16_cpu_backend()
    torch.manual_seed(0)
    model = backend.setup_model(build_model(cfg, **sizes))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    runner = backend.prepare(model, backend.build_optimizer(model, cfg.training), cfg.training)
    if state is not None:
        runner.load_state_dict(state)
    result = runner.train_step(fixed_batch(cfg, **sizes))
    runner.sync_to_host()
    changed = any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    return runner, result, changed


def test_fp16_overflow_is_skipped_counted_and_lowers_the_scale():
    runner, result, changed = _fp16_step(2.0**40)  # fp16 gradients overflow at this scale
    assert (result.skipped_updates, changed) == (1, False)
    assert result.extra["loss_scale"] == 2.0**39
    state = runner.state_dict()
    assert state["grad_scaler"]["scale"] == 2.0**39  # a plain number: checkpointable

    runner, result, changed = _fp16_step(2.0**8)
    assert (result.skipped_updates, changed) == (0, True)
    # A resumed runner continues from the checkpointed scale.
    runner, result, _ = _fp16_step(2.0**8, state={"grad_scaler": {**state["grad_scaler"]}})
    assert result.skipped_updates == 1 and result.extra["loss_scale"] == 2.0**38


def test_skipped_updates_are_counted_in_the_log_and_metrics(tmp_path, capsys):
    import _tiny

    from minidalle.train.pipeline import Pipeline
    from minidalle.train.trainer import Trainer, seed_everything

    cfg = _tiny.tiny_config(tmp_path, "training.max_steps=2", "training.loss_scaling=1099511627776.0",
                            "dataset.name=tiny_codes", "dataset.size=8", "model.text_seq_len=8")
    seed_everything(cfg.run.seed)
    pipe = Pipeline(cfg, _tiny.registry())
    Trainer(cfg, model=pipe.model, dataset=pipe.dataset, collate=pipe.collate,
            backend=_fp16_cpu_backend(), show_progress=False).train()
    records = _metrics(tmp_path)
    assert records[0]["skipped_updates"] == 1 and records[0]["loss_scale"] == 2.0**39
    assert "skipped updates: 1" in capsys.readouterr().out


# --------------------------------------------------------------------------- processes

DYING_PLUGIN = """
import os, signal
from pathlib import Path

import attrs

import _tiny
from minidalle import hookimpl


@attrs.define
class DyingConfig:
    size: int = 32
    die_rank: int = 1
    die_when_exists: str = ""  # this process signals itself at its next read once it exists
    signal: str = "SIGKILL"  # SIGSTOP: hangs instead of dying


class Dying(_tiny.TinyCodes):
    def __init__(self, config, seed):
        super().__init__(_tiny.TinyCodesConfig(size=config.size), seed)
        self.config = config

    def __getitem__(self, i):
        c = self.config
        if (c.die_when_exists and int(os.environ.get("RANK", "0")) == c.die_rank
                and Path(c.die_when_exists).exists()):
            os.kill(os.getpid(), getattr(signal, c.signal))
        return super().__getitem__(i)


class DyingPlugin:
    @staticmethod
    @hookimpl
    def minidalle_datasets(register):
        register("dying_codes", lambda config, *, image_size, split="train", seed=0: Dying(config, seed),
                 config=DyingConfig, summary="test dataset whose rank-1 process dies on cue")
"""


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory) -> Path:
    """A site dir where `tests/_tiny.py` and a dataset that dies on cue are installed
    `minidalle` plugins."""
    site = tmp_path_factory.mktemp("site")
    info = site / "minidalle_dist_test-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: minidalle-dist-test\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[minidalle]\ntiny = _tiny:Plugin\ndying = _dying:DyingPlugin\n")
    (site / "_dying.py").write_text(DYING_PLUGIN)
    return site


def _env(plugin_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(plugin_path), str(TESTS), env.get("PYTHONPATH")]))
    env["MINIDALLE_PLUGINS"] = "tiny,dying"
    return env


def _config(path: Path, out_dir: Path, die_when_exists: str = "", **training) -> Path:
    table = {"max_steps": 4, "batch_size": 4, "gradient_accumulation": 2,
             "dataloader_workers": 0, "checkpoint_every": 2, "keep_checkpoints": 10, **training}
    lines = [f'extends = "{ROOT / "configs" / "unit_test.toml"}"',
             f'[run]\nout_dir = "{out_dir}"',
             "[model]\ntext_seq_len = 16",
             "[training]", *(f"{k} = {json.dumps(v)}" for k, v in table.items()),
             '[tokenizer]\nname = "tiny_chars"',
             f'[dataset]\nname = "dying_codes"\nsize = 32\ndie_when_exists = "{die_when_exists}"',
             "[backend]\nthreads = 1\ndist_timeout_s = 60"]
    path.write_text("\n".join(lines) + "\n")
    return path


def _minidalle(env, *argv, timeout=240, ok=True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "minidalle", *map(str, argv)], env=env,
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _weights(out_dir: Path, step: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out_dir / "checkpoints" / f"step-{step:08d}" / "model.safetensors"))


def _assert_same_weights(a: dict, b: dict, atol=1e-6):
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= atol, f"weights differ by up to {worst:g}"


def _metrics(out_dir: Path) -> list[dict]:
    return [json.loads(l) for l in (out_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, plugin_path):
    """One process, micro-batch 4, gradient accumulation 2: checkpoints at steps 2 and 4.
    Trained in this process (the same `train` the command runs) to save a launch."""
    import importlib

    from minidalle.api import load_config
    from minidalle.plugin.discovery import load_registry
    from minidalle.train.trainer import train_from_config as train

    sys.path.insert(0, str(plugin_path))
    try:
        plugins = [importlib.import_module("_tiny").Plugin, importlib.import_module("_dying").DyingPlugin]
    finally:
        sys.path.remove(str(plugin_path))
    registry = load_registry(autoload="none", extra_plugins=plugins)
    d = tmp_path_factory.mktemp("one")
    cfg = load_config(_config(d / "cfg.toml", d / "out"), registry=registry)
    threads = torch.get_num_threads()
    try:
        train(cfg, registry=registry, show_progress=False)
    finally:
        torch.set_num_threads(threads)  # the backend pinned 1 thread, as in the workers
    return d / "out"


def test_two_processes_match_one_process_with_twice_the_batch(tmp_path, plugin_path, reference):
    """2 processes x micro-batch 2 reach the weights of 1 process x micro-batch 4 (fp32)."""
    out = tmp_path / "out"
    proc = _minidalle(_env(plugin_path), "run", _config(tmp_path / "cfg.toml", out, batch_size=2),
                      "--nproc", 2)
    for step in (2, 4):
        _assert_same_weights(_weights(out, step), _weights(reference, step))
    losses = [r["loss"] for r in _metrics(out)]
    assert losses == pytest.approx([r["loss"] for r in _metrics(reference)], abs=1e-6)
    # Only rank 0 logs and writes: one header, one metrics line per step.
    assert proc.stdout.count("Training on cpu fp32") == 1
    assert "rank 0/2 (gloo)" in proc.stdout
    assert "8 per step (4 per process)" in proc.stdout  # the whole job's samples per step
    assert [r["step"] for r in _metrics(out)] == [1, 2, 3, 4]


def test_a_dying_process_takes_the_run_down_and_it_resumes_in_one_process(
        tmp_path, plugin_path, reference):
    env = _env(plugin_path)
    out = tmp_path / "out"
    # Rank 1 SIGKILLs itself reading step 3's data, once rank 0 saved step 2.
    cue = out / "checkpoints" / "step-00000002"
    cfg = _config(tmp_path / "cfg.toml", out, die_when_exists=str(cue), batch_size=2)
    t0 = time.monotonic()
    proc = _minidalle(env, "run", cfg, "--nproc", 2, timeout=120, ok=False)
    assert proc.returncode != 0
    assert "process rank 1 of 2 failed" in proc.stderr and "SIGKILL" in proc.stderr
    assert time.monotonic() - t0 < 100  # rank 0 did not sit out its collective timeout
    assert [r["step"] for r in _metrics(out)] == [1, 2]
    _assert_same_weights(_weights(out, 2), _weights(reference, 2))

    # Resume from the last checkpoint with another process count (same global batch):
    # it ends where the uninterrupted one-process run ended.
    cfg1 = _config(tmp_path / "cfg1.toml", out, batch_size=4)
    resumed = _minidalle(env, "run", cfg1, "--resume")
    assert "resumed at step 2" in resumed.stdout
    _assert_same_weights(_weights(out, 4), _weights(reference, 4))
    assert [r["step"] for r in _metrics(out)] == [1, 2, 3, 4]


def test_nproc_checks_the_config_once_before_launching(tmp_path, plugin_path):
    cfg = _config(tmp_path / "cfg.toml", tmp_path / "out", replication_factor=3)
    proc = _minidalle(_env(plugin_path), "run", cfg, "--nproc", 2, ok=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"minidalle: error: {cfg}: training.replication_factor: expected 1 or the process "
        "count (2) with --nproc, got 3"]
