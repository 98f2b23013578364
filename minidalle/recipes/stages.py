"""Stages of ``minidalle run``: ``cfg.run.stages`` executed in order, each writing into
``run.out_dir``.

A stage is a ``run(ctx)`` function plus an ``is_complete(ctx)`` check of its outputs (and
optionally ``clean(ctx)``, which removes them before a forced rerun), registered through the
``minidalle_stages`` hook like any component (:class:`minidalle.plugin.registry.Stage`).
``run_stages``:

- skips a stage whose outputs are complete, unless an earlier stage ran in this invocation
  (its inputs may have changed) or ``--from`` names it or an earlier stage;
- ``--from STAGE`` reruns that stage and every later one (their outputs are cleaned first,
  except with ``--resume``, which lets a stage continue from what it left);
- stops at the first stage that fails (the error says which).

Several processes (``minidalle run --nproc N`` or torchrun): a stage registered with
``parallel=True`` (the transformer: data parallel) runs in every process; any other stage
runs in rank 0 only, and the other processes wait for rank 0's word on it (a marker file
in ``run.out_dir/.stages/``, so the processes must share ``run.out_dir``) and then follow
its decision; only rank 0 prints stage lines.

Adding a stage is one function and one registration line in a plugin::

    @minidalle.hookimpl
    def minidalle_stages(register):
        register("paint", "my_plugin.stages:run_paint",
                 outputs="my_plugin.stages:paint_outputs",   # ctx -> [Path]
                 sections={"paint": "my_plugin.stages:PaintConfig"})

This module also holds the built-in ``transformer`` stage (registered by
:mod:`minidalle.plugin.builtins`).
"""
from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from minidalle.config import Config
from minidalle.errors import ConfigError
from minidalle.plugin.registry import Stage


@dataclass
class StageContext:
    cfg: Config
    out_dir: Path
    resume: bool = False
    registry: Any = None
    log: Callable[[str], None] = print
    options: dict[str, Any] = field(default_factory=dict)  # command-line extras, by name


def _process() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment, without importing torch."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _marker(ctx: StageContext, stage: Stage) -> Path:
    # One marker per stage and job: torchrun's run id plus the port its agent picked for
    # this launch's process group (a fresh one on every launch).
    job = "{}-{}".format(os.environ.get("TORCHELASTIC_RUN_ID", ""), os.environ.get("MASTER_PORT", ""))
    return ctx.out_dir / ".stages" / f"{stage.name}.{re.sub(r'[^A-Za-z0-9_.-]', '_', job)}"


def _tell_others(ctx: StageContext, stage: Stage, decision: str) -> None:
    """Rank 0: record that a non-parallel stage ran or was skipped, for the other ranks."""
    from minidalle.fileio import atomic_write

    atomic_write(_marker(ctx, stage), lambda f: f.write(decision.encode("utf-8")))


def _wait_for_rank0(ctx: StageContext, stage: Stage, poll_s: float = 1.0) -> str:
    """Other ranks: wait while rank 0 runs (or skips) a non-parallel stage; no timeout, as
    torchrun stops this process if rank 0 fails."""
    path = _marker(ctx, stage)
    while not path.exists():
        time.sleep(poll_s)
    return path.read_text(encoding="utf-8").strip()


def check_stages(cfg, registry, from_stage: str | None = None) -> list[Stage]:
    stages = []
    for i, name in enumerate(cfg.run.stages):
        if name not in registry.stages:
            raise ConfigError(f"{cfg.source}: run.stages[{i}]: unknown stage {name!r} "
                              f"(known: {', '.join(registry.stages)})")
        stages.append(registry.stages[name])
    if from_stage is not None and from_stage not in cfg.run.stages:
        raise ConfigError(f"--from {from_stage}: not one of this config's run.stages "
                          f"({', '.join(cfg.run.stages)})")
    return stages


def run_stages(cfg, *, registry=None, from_stage: str | None = None, resume: bool = False,
               log: Callable[[str], None] = print, options: dict | None = None) -> list[str]:
    """Run ``cfg.run.stages`` as ``registry`` (default: the config's) registers them;
    returns the names of the stages that ran."""
    registry = registry or cfg.registry
    stages = check_stages(cfg, registry, from_stage)
    rank, world = _process()
    if rank != 0:
        log = lambda line: None  # noqa: E731  (rank 0 prints for the job)
    elif world > 1:  # markers of earlier jobs
        shutil.rmtree(Path(cfg.run.out_dir) / ".stages", ignore_errors=True)
    ctx = StageContext(cfg=cfg, out_dir=Path(cfg.run.out_dir), resume=resume, registry=registry,
                       log=log, options=dict(options or {}))
    ran: list[str] = []
    forced = False
    for stage in stages:
        forced = forced or stage.name == from_stage
        tell = world > 1 and not stage.parallel  # rank 0 decides, the others follow
        if tell and rank != 0:
            if _wait_for_rank0(ctx, stage) == "ran":
                ran.append(stage.name)
            continue
        if not forced and not ran and stage.is_complete(ctx):
            log(f"stage {stage.name}: complete, skipped (--from {stage.name} reruns it)")
            if tell:
                _tell_others(ctx, stage, "skipped")
            continue
        if (forced or ran) and stage.clean is not None and not resume:
            stage.clean(ctx)
        log(f"stage {stage.name}: running")
        ctx.out_dir.mkdir(parents=True, exist_ok=True)
        stage.run(ctx)
        ran.append(stage.name)
        if tell:
            _tell_others(ctx, stage, "ran")
    return ran


# --------------------------------------------------------------------------- transformer


def run_transformer(ctx: StageContext) -> None:
    from minidalle.train.trainer import train_from_config

    train_from_config(ctx.cfg, resume=ctx.resume, registry=ctx.registry)


def transformer_complete(ctx: StageContext) -> bool:
    """Complete when the newest checkpoint is the final one of a finished run."""
    import json

    from minidalle.train.checkpoint import META_FILE, list_checkpoints

    found = list_checkpoints(ctx.out_dir / "checkpoints")
    if not found:
        return False
    try:
        meta = json.loads((found[-1] / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False  # the trainer reports the corrupt checkpoint when it tries to resume
    return bool(meta.get("info", {}).get("final"))


def clean_transformer(ctx: StageContext) -> None:
    from minidalle.train.trainer import METRICS_FILE

    for path in (ctx.out_dir / "checkpoints", ctx.out_dir / "tensorboard"):
        shutil.rmtree(path, ignore_errors=True)
    (ctx.out_dir / METRICS_FILE).unlink(missing_ok=True)


