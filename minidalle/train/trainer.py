"""The backend-agnostic training loop.

The trainer owns epochs, the data order, the LR schedule, checkpoints, logging, metrics and
resume; the backend's runner does the device work of one step (``samples_per_step`` samples,
see ``minidalle/train/backend.py``).

Determinism: the data order of epoch ``e`` is a permutation seeded by ``(run.seed, e)``; every
host and device RNG state goes into each checkpoint. Together with the ``cpu`` backend's
deterministic fp32 kernels, a run resumed from a checkpoint ends with the same weights as an
uninterrupted one.

Outputs in ``run.out_dir``: ``checkpoints/step-NNNNNNNN/`` (see ``minidalle/train/checkpoint.py``),
``metrics.jsonl`` (one JSON object per step: step, epoch, loss, lr, samples/sec; plus
``{"step", "val_loss"}`` lines when ``training.val_fraction`` > 0), and optional TensorBoard
event files in ``tensorboard/``.
"""
from __future__ import annotations

import itertools
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from minidalle.train.backend import Backend, StepResult
from minidalle.train.checkpoint import (
    absolute_paths,
    host_rng_state,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    set_host_rng_state,
)
from minidalle.config import Config, config_to_dict
from minidalle.errors import CheckpointError, DataError, TrainingDivergedError
from minidalle.fileio import atomic_write
from minidalle.train.optim import LrSchedule

METRICS_FILE = "metrics.jsonl"
# Config sections a checkpoint must agree on to be resumed (the rest may change).
RESUME_MUST_MATCH = ("model", "tokenizer", "codec")


@dataclass
class TrainResult:
    step: int
    epoch: int
    loss: float | None
    checkpoint: Path | None
    resumed_from: int | None = None


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic (train, val) index split of ``n`` items."""
    if val_fraction <= 0:
        return list(range(n)), []
    if val_fraction >= 1:
        raise DataError(f"training.val_fraction: expected a number below 1, got {val_fraction}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919)).tolist()
    n_val = max(1, int(round(n * val_fraction)))
    return sorted(perm[n_val:]), sorted(perm[:n_val])


def epoch_order(indices: Sequence[int], seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return [indices[i] for i in torch.randperm(len(indices), generator=g).tolist()]


class _Log:
    """Prints lines (through tqdm when a bar is shown) and writes optional TB / wandb."""

    def __init__(self, enabled: bool, show_bar: bool, total: int, initial: int) -> None:
        self.enabled = enabled
        self.bar = None
        if enabled and show_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
        self.tb = None
        self.wandb = None

    def line(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


class Trainer:
    def __init__(self, cfg: Config, *, model: torch.nn.Module, dataset, collate: Callable,
                 backend: Backend, out_dir: Path | str | None = None,
                 callbacks: Sequence[Callable] = (), show_progress: bool | None = None,
                 preview=None) -> None:
        """``callbacks``: called as ``cb(trainer, step, result)`` after each step (and after
        that step's checkpoint, if any). ``preview``: a :class:`minidalle.train.preview.
        Previewer`, drawn every ``training.sample_every`` steps and at the end (rank 0)."""
        self.cfg = cfg
        self.t = cfg.training
        self.model = model
        self.dataset = dataset
        self.collate = collate
        self.backend = backend
        self.out_dir = Path(out_dir or cfg.run.out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.metrics_path = self.out_dir / METRICS_FILE
        self.callbacks = list(callbacks)
        self.preview = preview
        self.show_progress = sys.stderr.isatty() if show_progress is None else show_progress
        self.step = 0
        self.epoch = 0
        self.batches_in_epoch = 0
        # Training items (not validation ones) get the null caption with this probability,
        # drawn per (run.seed, epoch, item): the same on every backend and after resume.
        self.train_dataset = dataset
        if self.t.null_caption_prob > 0:
            from minidalle.data import NullCaptions

            self.train_dataset = NullCaptions(dataset, self.t.null_caption_prob, cfg.run.seed)

    # ------------------------------------------------------------------ setup
    def _plan(self) -> None:
        t = self.t
        self.sps = self.backend.samples_per_step(t)
        self.train_idx, self.val_idx = split_indices(len(self.dataset), t.val_fraction, self.cfg.run.seed)
        # With several processes each reads its own 1/world_size of the data (the backend's
        # sampler); self.sps is per process.
        world = self.backend.world_size
        self.steps_per_epoch = len(self.train_idx) // world // self.sps
        if self.steps_per_epoch == 0:
            procs = f" x {world} processes" if world > 1 else ""
            raise DataError(
                f"the dataset has {len(self.train_idx)} training samples, fewer than one step's "
                f"{self.sps * world} (batch_size {t.batch_size} x gradient_accumulation "
                f"{t.gradient_accumulation} x replication_factor {t.replication_factor} x "
                f"device_iterations {t.device_iterations}{procs})")
        self.total_steps = t.epochs * self.steps_per_epoch
        if t.max_steps is not None:
            self.total_steps = min(self.total_steps, t.max_steps)

    def _loader(self, indices: list[int], batch_size: int, seed: int, *, train: bool = False,
                drop_last: bool = True):
        from torch.utils.data import DataLoader

        dataset = self.train_dataset if train else self.dataset
        make = getattr(self.backend, "make_loader", None)
        if train and make is not None:  # the backend's own (ipu: poptorch.DataLoader, async)
            return make(dataset, indices, collate_fn=self.collate)
        return DataLoader(dataset, batch_size=batch_size, sampler=indices,
                          collate_fn=self.collate, num_workers=self.t.dataloader_workers,
                          drop_last=drop_last, generator=torch.Generator().manual_seed(seed))

    def _step_batches(self, runner, order: list[int], seed: int):
        """One item per step: the step's whole batch, or (for runners that take them) an
        iterator over its micro-batches, loaded as the runner consumes them, so that a
        step of 24,576 images never sits in memory at once."""
        if getattr(self.backend, "make_loader", None) is not None or \
                not getattr(runner, "micro_batch_input", False):
            yield from self._loader(order, self.sps, seed, train=True)
            return
        per_step = self.sps // self.t.batch_size
        micros = iter(self._loader(order, self.t.batch_size, seed, train=True))
        for _ in range(len(order) // self.sps):
            yield itertools.islice(micros, per_step)

    def _resume(self, optimizer, schedule) -> dict | None:
        """Load the newest checkpoint into model/optimizer/schedule/RNGs; its runner state."""
        found = list_checkpoints(self.ckpt_dir)
        if not found:
            return None
        ck = load_checkpoint(found[-1], with_config=False)
        current = absolute_paths(config_to_dict(self.cfg))  # as the checkpoint has them
        stored = absolute_paths(ck.meta["config"])
        for section in RESUME_MUST_MATCH:
            if stored.get(section) != current.get(section):
                raise CheckpointError(
                    f"{ck.path}: was written with a different [{section}] section; resume "
                    f"with the same {section} settings or start over (minidalle run --from transformer)")
        try:
            self.model.load_state_dict(_without_codec(ck.state_dict, self.model))
            ts = ck.training_state
            optimizer.load_state_dict(ts["optimizer"])
            schedule.load_state_dict(ts["scheduler"])
            set_host_rng_state(ts["rng"])
            self.backend.set_rng_state(ts.get("backend_rng", {}))
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            raise CheckpointError(f"{ck.path}: cannot resume from it: {str(exc).splitlines()[0]}") from None
        info = ck.meta.get("info", {})
        self.step = ck.step
        self.epoch = int(ck.meta.get("epoch", 0))
        self.batches_in_epoch = int(info.get("batches_in_epoch", 0))
        if "samples_in_epoch" in info:
            # The job's position in the epoch order, valid for any process count (see
            # minidalle.train.distributed.ShardSampler); a step of this job may be a different
            # size, so round down (re-reading at most one step's worth of samples).
            done = int(info["samples_in_epoch"])
            self.batches_in_epoch = done // (self.sps * self.backend.world_size)
        self.resumed_from = ck.step
        if self.backend.is_main:
            self._truncate_metrics(self.step)
        return ts.get("runner", {})

    def _truncate_metrics(self, step: int) -> None:
        """Drop metric lines of steps after ``step`` (written before a crash)."""
        if not self.metrics_path.exists():
            return
        keep = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                pass  # a half-written last line
        text = "".join(line + "\n" for line in keep)
        atomic_write(self.metrics_path, lambda f: f.write(text.encode("utf-8")))

    # ------------------------------------------------------------------ checkpoints
    def save(self, optimizer, schedule, runner, *, final: bool = False) -> Path:
        runner.sync_to_host()
        model_state = _without_codec(self.model.state_dict(), self.model)
        for name, tensor in model_state.items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                # Never write a checkpoint of non-finite weights: the last good one stays.
                raise self._diverged(self.step, 1) from None
        state = {
            "optimizer": optimizer.state_dict(),
            "scheduler": schedule.state_dict(),
            "rng": host_rng_state(),
            "backend_rng": self.backend.rng_state(),
            "runner": runner.state_dict(),
        }
        info = {"batches_in_epoch": self.batches_in_epoch, "steps_per_epoch": self.steps_per_epoch,
                "samples_in_epoch": self.batches_in_epoch * self.sps * self.backend.world_size,
                "world_size": self.backend.world_size,
                "total_steps": self.total_steps, "samples_per_step": self.sps,
                "backend": self.backend.describe(), "final": final}
        return save_checkpoint(self.ckpt_dir, step=self.step, epoch=self.epoch,
                               model_state=model_state,
                               config=config_to_dict(self.cfg), training_state=state, info=info,
                               keep=self.t.keep_checkpoints)

    # ------------------------------------------------------------------ the main path
    def train(self, resume: bool = False) -> TrainResult:
        """setup, then for each batch: train_step, log_step and after_step (validation,
        periodic checkpoint, callbacks); the final checkpoint; cleanup whatever happens."""
        self.setup(resume)
        try:
            for batch in self._batches():
                result, loss, lr = self.train_step(batch)
                self.log_step(result, loss, lr)
                self.after_step(result)
            self.finish()
        finally:
            self.cleanup()
        return TrainResult(step=self.step, epoch=self.epoch, loss=self.last_loss,
                           checkpoint=self.last_ckpt, resumed_from=self.resumed_from)

    def setup(self, resume: bool = False) -> None:
        """Data split and step arithmetic, the model on its device, optimizer and LR
        schedule, the resumed state, the backend's runner, logging and the metrics file."""
        t, backend = self.t, self.backend
        self._plan()
        self.resumed_from = None
        self.model = backend.setup_model(self.model)
        self.optimizer = backend.build_optimizer(self.model, t)
        self.schedule = LrSchedule(self.optimizer, t, self.total_steps)
        runner_state = None
        if resume:
            runner_state = self._resume(self.optimizer, self.schedule)
        elif list_checkpoints(self.ckpt_dir):
            raise CheckpointError(f"{self.ckpt_dir}: holds checkpoints of an earlier run; pass "
                                  "--resume to continue it or use another run.out_dir")
        if backend.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if self.resumed_from is None:  # lines of a run killed before its first checkpoint
                self._truncate_metrics(0)
        self.runner = backend.prepare(self.model, self.optimizer, t)
        if runner_state:
            self.runner.load_state_dict(runner_state)

        self._log = log = _Log(backend.is_main, self.show_progress, self.total_steps, self.step)
        self._open_trackers(log)
        log.line(f"Training on {backend.describe()}: {len(self.train_idx)} samples, "
                 f"{self.sps * backend.world_size} per step"
                 + (f" ({self.sps} per process)" if backend.world_size > 1 else "")
                 + f", {self.steps_per_epoch} steps per epoch, "
                 f"{self.total_steps} steps"
                 + (f" (resumed at step {self.step})" if self.resumed_from is not None else ""))
        self._metrics = open(self.metrics_path, "a", encoding="utf-8") if backend.is_main else None
        self.last_loss, self.last_ckpt = None, None
        self._skipped_total = 0  # updates skipped by dynamic loss scaling (fp16 overflow)
        self._bad_steps, self._first_bad = 0, None  # non-finite steps in a row (max_bad_steps)
        self._window_start, self._window_samples = time.perf_counter(), 0

    def _batches(self):
        """The batches of the remaining steps, epoch after epoch, in the backend's sampler
        order (or the seeded one); the runner compiles on the first."""
        t, backend = self.t, self.backend
        compiled = False
        if self.batches_in_epoch >= self.steps_per_epoch:
            self.epoch, self.batches_in_epoch = self.epoch + 1, 0
        while self.step < self.total_steps and self.epoch < t.epochs:
            if hasattr(self.train_dataset, "set_epoch"):
                self.train_dataset.set_epoch(self.epoch)
            order = backend.sampler(len(self.train_idx), shuffle=True, seed=self.cfg.run.seed,
                                    epoch=self.epoch)
            order = ([self.train_idx[i] for i in order] if order is not None
                     else epoch_order(self.train_idx, self.cfg.run.seed, self.epoch))
            order = order[self.batches_in_epoch * self.sps: self.steps_per_epoch * self.sps]
            seed = self.cfg.run.seed * 1_000_003 + self.epoch
            for batch in self._step_batches(self.runner, order, seed):
                if not compiled:
                    compiled = True
                    batch = self._compile(batch)
                yield batch
                if self.step >= self.total_steps:
                    return
            self.epoch, self.batches_in_epoch = self.epoch + 1, 0

    def _compile(self, batch):
        first = batch
        if not isinstance(batch, dict):  # an iterator of micro-batches
            first = next(batch)
            batch = itertools.chain([first], batch)
        secs = self.runner.compile(first)
        if secs is not None:
            self._log.line(f"Compiled model in {secs:.1f} secs")
        self._window_start = time.perf_counter()
        return batch

    def train_step(self, batch) -> tuple[StepResult, float, float]:
        """One optimizer step: the runner's step, the loss averaged over processes and the
        LR schedule; returns (the runner's result, that loss, the step's learning rate)."""
        result: StepResult = self.runner.train_step(batch)
        if not isinstance(batch, dict) and next(batch, None) is not None:
            raise RuntimeError("the runner did not consume all of the step's micro-batches")
        self.step += 1
        self.batches_in_epoch += 1
        self._window_samples += self.sps * self.backend.world_size
        loss = self.backend.reduce_mean(result.loss)
        self.last_loss = loss
        if _non_finite(loss, result):
            self._bad_steps, self._first_bad = self._bad_steps + 1, self._first_bad or self.step
        else:
            self._bad_steps, self._first_bad = 0, None
        lr = self.schedule.lr
        if self.schedule.step(loss):
            self.runner.lr_changed()
        return result, loss, lr

    def log_step(self, result: StepResult, loss: float, lr: float) -> None:
        """The step's record in metrics.jsonl, TensorBoard/wandb and the progress bar; every
        ``log_every`` steps (and the last) a line with the throughput since the previous."""
        t, log = self.t, self._log
        now = time.perf_counter()
        record = {"step": self.step, "epoch": self.epoch, "loss": loss, "lr": lr,
                  "time": time.time()}
        if result.skipped_updates:
            record["skipped_updates"] = result.skipped_updates
            self._skipped_total += result.skipped_updates
        if result.grad_norm is not None:
            record["grad_norm"] = result.grad_norm
        record.update(result.extra)
        if self.step % t.log_every == 0 or self.step >= self.total_steps:
            throughput = self._window_samples / max(now - self._window_start, 1e-9)
            record["samples_per_sec"] = throughput
            log.line(f"Epoch {self.epoch + 1}/{t.epochs} step {self.step}/{self.total_steps} "
                     f"Loss: {loss:.6f} Throughput: {throughput:.3f} samples/sec "
                     f"lr: {lr:.3e}"
                     + (f" skipped updates: {self._skipped_total}" if self._skipped_total else ""))
            self._window_start, self._window_samples = time.perf_counter(), 0
        if self._metrics is not None:
            self._metrics.write(json.dumps(record) + "\n")
            self._metrics.flush()
        log.scalars(self.step, {"train/loss": loss, "train/lr": lr})
        if log.bar is not None:
            log.bar.update(1)
            log.bar.set_postfix(loss=f"{loss:.4f}")

    def after_step(self, result: StepResult) -> None:
        """Validation when due, the preview when due and the periodic checkpoint (rank 0),
        then the callbacks."""
        t = self.t
        is_last = self.step >= self.total_steps
        end_of_epoch = self.batches_in_epoch >= self.steps_per_epoch
        if self.val_idx and ((t.val_every and self.step % t.val_every == 0)
                             or (not t.val_every and end_of_epoch) or is_last):
            self._validate(self.runner, self._log, self._metrics)
        if self._bad_steps >= t.max_bad_steps:
            raise self._diverged(self._first_bad, self._bad_steps)
        if self.preview is not None and t.sample_every and (self.step % t.sample_every == 0 or is_last):
            self._preview(self.runner, self._log)
        if self.backend.is_main and not is_last and not self._bad_steps and t.checkpoint_every \
                and self.step % t.checkpoint_every == 0:
            self.last_ckpt = self.save(self.optimizer, self.schedule, self.runner)
        self.backend.barrier()
        for cb in self.callbacks:
            cb(self, self.step, result)

    def finish(self) -> None:
        """The final checkpoint (rank 0); every process waits for it."""
        if self.backend.is_main:
            self.last_ckpt = self.save(self.optimizer, self.schedule, self.runner, final=True)
            self._log.line(f"Saved checkpoint {self.last_ckpt}")
            if self.preview is not None and self.preview.last is not None:
                self._log.line(f"Last preview: {self.preview.last}")
        self.backend.barrier()

    def cleanup(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
        self._log.close()
        self.runner.close()

    def _diverged(self, first_bad: int, count: int) -> TrainingDivergedError:
        found = list_checkpoints(self.ckpt_dir)
        kept = f"the last good checkpoint is {found[-1]}" if found else "no checkpoint was written"
        return TrainingDivergedError(
            f"{self.out_dir}: training diverged: the loss or gradient went non-finite (inf/NaN) at "
            f"step {first_bad}, {count} step(s) in a row (training.max_bad_steps = "
            f"{self.t.max_bad_steps}); {kept}; try a lower training.lr (now {self.t.lr:g}), "
            f"training.max_grad_norm or more training.warmup_steps")

    def _validate(self, runner, log: _Log, metrics) -> float:
        size = self.t.batch_size * self.t.gradient_accumulation
        total, count = 0.0, 0
        loader = self._loader(self.val_idx, min(size, len(self.val_idx)), self.cfg.run.seed,
                              drop_last=False)  # every validation sample counts
        for batch in loader:
            n = batch["text"].shape[0]
            total += runner.eval_loss(batch) * n
            count += n
        val = self.backend.reduce_mean(total / max(count, 1))
        log.line(f"Validation step {self.step} Loss: {val:.6f}")
        if metrics is not None:
            metrics.write(json.dumps({"step": self.step, "epoch": self.epoch, "val_loss": val}) + "\n")
            metrics.flush()
        log.scalars(self.step, {"val/loss": val})
        return val

    def _preview(self, runner, log: _Log) -> None:
        """Rank 0: the preview grid of this step, its cost in the log line, TB / wandb."""
        if not self.backend.is_main:
            return
        runner.sync_to_host()
        path, grid, secs = self.preview.draw(self.model, self.step)
        log.line(f"Preview step {self.step}: {len(self.preview.prompts)} prompts in {secs:.2f} s "
                 f"-> {path}")
        if log.tb is not None:
            log.tb.add_image("samples", grid, self.step)
        if log.wandb is not None:
            log.wandb.log({"samples": log.wandb.Image(grid.permute(1, 2, 0).numpy(),
                                                      caption=f"step {self.step}")}, step=self.step)

    def _open_trackers(self, log: _Log) -> None:
        """TensorBoard and wandb when asked for and installed; a note when not installed."""
        if not log.enabled:
            return
        if self.t.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                log.tb = SummaryWriter(str(self.out_dir / "tensorboard"))
            except ImportError:
                log.line("note: training.tensorboard is on but the `tensorboard` package is not "
                         "installed; not writing TensorBoard logs")
        if self.t.wandb:
            try:
                import wandb

                log.wandb = wandb
                wandb.init(project="minidalle", name=self.cfg.run.name, dir=str(self.out_dir),
                           config=config_to_dict(self.cfg), resume="allow")
            except ImportError:
                log.line("note: training.wandb is on but `wandb` is not installed; not logging to wandb")


def _non_finite(loss: float, result: StepResult) -> bool:
    """A step whose loss or gradient norm is inf/NaN, unless loss scaling skipped its update
    (fp16 overflow: the scaler lowers the scale and tries again)."""
    if result.skipped_updates:
        return False
    norm = result.grad_norm
    return not math.isfinite(loss) or (norm is not None and not math.isfinite(norm))


def _without_codec(state: dict, model) -> dict:
    """The frozen codec is never saved with the model, even if it sits inside it."""
    if getattr(model, "codec", None) is None:
        return state
    return {k: v for k, v in state.items() if not k.startswith("codec.")}


def load_metrics(out_dir: Path | str) -> list[dict]:
    """The ``metrics.jsonl`` records of a run (for plots)."""
    path = Path(out_dir) / METRICS_FILE
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train_from_config(cfg: Config, *, resume: bool = False, registry=None,
                      callbacks: Sequence[Callable] = (), show_progress: bool | None = None) -> TrainResult:
    """Build everything from ``cfg`` and train (what the ``transformer`` stage runs)."""
    from minidalle.train.pipeline import Pipeline

    registry = registry or cfg.registry
    backend = registry.build("backend", cfg.backend.name, cfg.backend.params)
    # Seed before the model is built so that its initial weights depend only on the seed.
    seed_everything(cfg.run.seed)
    backend.seed(cfg.run.seed)
    pipe = Pipeline(cfg, registry)
    preview = None
    if cfg.training.sample_every and backend.is_main:
        from minidalle.train.preview import build_previewer

        _, val_idx = split_indices(len(pipe.dataset), cfg.training.val_fraction, cfg.run.seed)
        preview = build_previewer(cfg, pipe, pipe.dataset, val_idx, registry)
    trainer = Trainer(cfg, model=pipe.model, dataset=pipe.dataset, collate=pipe.collate,
                      backend=backend, callbacks=callbacks, show_progress=show_progress,
                      preview=preview)
    return trainer.train(resume=resume)
