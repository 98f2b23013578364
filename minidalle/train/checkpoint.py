"""Checkpoints: safetensors weights + JSON metadata, written atomically, loaded without pickle.

Layout::

    <run.out_dir>/checkpoints/step-00000100/
        model.safetensors       the model's state_dict (the frozen codec is not part of it)
        state.safetensors       optimizer, runner and RNG tensors
        meta.json               resolved config, step, epoch, optimizer/scheduler state
                                (non-tensor parts), RNG states, versions, file sizes and
                                sha256 of both .safetensors files; written last

A checkpoint is written into ``checkpoints/.tmp-...`` and renamed into place, so a step
directory either is complete or does not exist. A crash while writing leaves only a
``.tmp-`` directory, which is ignored (and removed by the next save). A step directory whose
files do not match ``meta.json`` is corrupt: loading it raises :class:`CheckpointError`
naming the file, never silently falls back to another checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import random
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from minidalle import __version__
from minidalle.errors import CheckpointError
from minidalle.fileio import replace_dir

FORMAT_VERSION = 1
STEP_DIR = re.compile(r"^step-(\d{8})$")
MODEL_FILE, STATE_FILE, META_FILE = "model.safetensors", "state.safetensors", "meta.json"


# --------------------------------------------------------------------------- pickle-free trees


def flatten_tree(obj: Any, tensors: dict[str, torch.Tensor], prefix: str) -> Any:
    """A JSON skeleton of ``obj`` with every tensor moved into ``tensors`` (by name).

    Handles dicts (any scalar keys), lists, tuples, numbers, strings, None and tensors: enough
    for optimizer, GradScaler and RNG states."""
    if isinstance(obj, torch.Tensor):
        name = f"{prefix}"
        tensors[name] = obj.detach().cpu().contiguous()
        return {"__tensor__": name}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: flatten_tree(v, tensors, f"{prefix}.{k}") for k, v in obj.items()}
        return {"__items__": [[k, flatten_tree(v, tensors, f"{prefix}.{i}")]
                              for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, tuple):
        return {"__tuple__": [flatten_tree(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [flatten_tree(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, (bool, int, float, str)) or obj is None:
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot store {type(obj).__name__} in a checkpoint without pickle")


def unflatten_tree(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__items__" in obj:
            return {k: unflatten_tree(v, tensors) for k, v in obj["__items__"]}
        if "__tuple__" in obj:
            return tuple(unflatten_tree(v, tensors) for v in obj["__tuple__"])
        return {k: unflatten_tree(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [unflatten_tree(v, tensors) for v in obj]
    return obj


# --------------------------------------------------------------------------- RNG


def host_rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "python": [list(random.getstate()[1]), random.getstate()[0], random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }


def set_host_rng_state(state: dict[str, Any]) -> None:
    internal, version, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])


# --------------------------------------------------------------------------- helpers


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _dedupe_shared(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """safetensors refuses tensors that share memory (tied weights): keep one, alias the rest."""
    out, aliases, seen = {}, {}, {}
    for name, t in state.items():
        t = t.detach().cpu()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype) \
            if t.numel() else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        out[name] = t.contiguous()
    return out, aliases


def versions() -> dict[str, str]:
    import safetensors

    return {"minidalle": __version__, "torch": torch.__version__,
            "safetensors": safetensors.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


# --------------------------------------------------------------------------- save


def save_checkpoint(ckpt_dir: Path | str, *, step: int, model_state: dict[str, torch.Tensor],
                    config: dict, epoch: int = 0, training_state: dict[str, Any] | None = None,
                    info: dict[str, Any] | None = None, keep: int | None = None) -> Path:
    """Write ``ckpt_dir/step-<step>`` atomically and return its path.

    ``training_state`` is any pickle-free tree (see :func:`flatten_tree`): optimizer,
    scheduler, runner and RNG state. ``info`` is plain JSON (e.g. the position in the epoch).
    ``keep``: remove all but the newest ``keep`` step directories afterwards.
    """
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"step-{step:08d}"
    tmp = ckpt_dir / f".tmp-step-{step:08d}-{os.getpid()}"
    for stale in ckpt_dir.glob(".tmp-*"):  # left by a crash mid-write
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir()

    weights, aliases = _dedupe_shared(model_state)
    save_file(weights, str(tmp / MODEL_FILE), metadata={"format": "pt"})
    state_tensors: dict[str, torch.Tensor] = {}
    skeleton = flatten_tree(training_state or {}, state_tensors, "s")
    save_file(state_tensors, str(tmp / STATE_FILE), metadata={"format": "pt"})

    files = {}
    for name in (MODEL_FILE, STATE_FILE):
        path = tmp / name
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
        files[name] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    meta = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "epoch": epoch,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": versions(),
        "config": config,
        "model_aliases": aliases,
        "training_state": skeleton,
        "info": info or {},
        "files": files,
    }
    meta_tmp = tmp / (META_FILE + ".part")
    with open(meta_tmp, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(meta_tmp, tmp / META_FILE)
    _fsync_dir(tmp)

    # replaces an existing step directory (e.g. the final save after a periodic one)
    replace_dir(tmp, final, aside=ckpt_dir / f".tmp-old-{final.name}-{os.getpid()}")
    _fsync_dir(ckpt_dir)
    if keep:
        for old in list_checkpoints(ckpt_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


# --------------------------------------------------------------------------- find and load


def list_checkpoints(ckpt_dir: Path | str) -> list[Path]:
    """Step directories in ``ckpt_dir``, oldest first (``.tmp-`` directories excluded)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    steps = [p for p in ckpt_dir.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
    return sorted(steps, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def resolve_checkpoint(path: Path | str) -> Path:
    """A run dir, a checkpoints dir or a step dir -> the step dir to load (the newest)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint, run or checkpoints directory")
    if (path / META_FILE).exists() or STEP_DIR.match(path.name):
        return path
    for candidate in (path / "checkpoints", path):
        found = list_checkpoints(candidate)
        if found:
            return found[-1]
    raise CheckpointError(f"{path}: no checkpoint found (expected {path}/checkpoints/step-NNNNNNNN/)")


@dataclass
class Checkpoint:
    """A loaded checkpoint. Unpacks as ``config, state_dict, meta = load_checkpoint(...)``."""

    path: Path
    meta: dict
    state_dict: dict[str, torch.Tensor]
    config: Any = None  # minidalle.config.Config
    training_state: dict[str, Any] = field(default_factory=dict)

    def __iter__(self):
        return iter((self.config, self.state_dict, self.meta))

    @property
    def step(self) -> int:
        return int(self.meta["step"])


def _read_meta(step_dir: Path) -> dict:
    meta_path = step_dir / META_FILE
    if not meta_path.exists():
        raise CheckpointError(f"{meta_path}: missing: incomplete checkpoint (delete {step_dir} to use an older one)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{meta_path}: corrupt checkpoint metadata: {exc}") from None
    for key in ("format_version", "step", "config", "files"):
        if key not in meta:
            raise CheckpointError(f"{meta_path}: corrupt checkpoint metadata: no {key!r}")
    if meta["format_version"] > FORMAT_VERSION:
        raise CheckpointError(f"{meta_path}: written by a newer minidalle "
                              f"(format {meta['format_version']}, this one reads {FORMAT_VERSION})")
    return meta


def _load_tensors(step_dir: Path, name: str, meta: dict, verify: bool) -> dict[str, torch.Tensor]:
    path = step_dir / name
    expected = meta["files"].get(name)
    if not path.exists():
        raise CheckpointError(f"{path}: missing from the checkpoint")
    if expected is not None:
        size = path.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(f"{path}: truncated or corrupt checkpoint file "
                                  f"({size} bytes, expected {expected['bytes']})")
        if verify and _sha256(path) != expected["sha256"]:
            raise CheckpointError(f"{path}: corrupt checkpoint file (sha256 mismatch)")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: corrupt checkpoint file: {exc}") from None


def load_checkpoint(path: Path | str, *, with_config: bool = True, verify: bool = True,
                    registry=None) -> Checkpoint:
    """Load a checkpoint for inference or resume; never executes code from it.

    ``path``: a run dir, its ``checkpoints`` dir (the newest step is taken) or a step dir.
    Returns a :class:`Checkpoint` with the resolved ``config`` (a Config), the model
    ``state_dict``, ``meta`` (the JSON) and ``training_state`` (optimizer etc.).
    """
    step_dir = resolve_checkpoint(path)
    meta = _read_meta(step_dir)
    weights = _load_tensors(step_dir, MODEL_FILE, meta, verify)
    for alias, target in meta.get("model_aliases", {}).items():
        weights[alias] = weights[target]
    state_tensors = _load_tensors(step_dir, STATE_FILE, meta, verify) if STATE_FILE in meta["files"] else {}
    try:
        training_state = unflatten_tree(meta.get("training_state", {}), state_tensors)
    except KeyError as exc:
        raise CheckpointError(f"{step_dir / STATE_FILE}: corrupt checkpoint file: no tensor {exc}") from None
    config = None
    if with_config:
        from minidalle.api import config_from_dict
        from minidalle.errors import ConfigError

        try:
            config = config_from_dict(meta["config"], source=str(step_dir / META_FILE), registry=registry)
        except ConfigError as exc:
            raise CheckpointError(f"checkpoint config does not load: {exc}") from None
    return Checkpoint(path=step_dir, meta=meta, state_dict=weights, config=config,
                      training_state=training_state)
