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


# --------------------------------------------------------------------------- paths in the config

# Component parameters that name files; a checkpoint stores them so that it works from any
# working directory and inside a moved run directory.
PATH_KEYS = ("path", "config_path", "bpe_path", "root", "vgg_weights")
PATH_SECTIONS = ("tokenizer", "codec", "dataset", "reranker")
PATH_BASE = "step_dir"  # meta.json "path_base": relative paths are relative to the step dir


def _map_paths(config: dict, fn) -> dict:
    out = dict(config)
    for section in PATH_SECTIONS:
        table = out.get(section)
        if isinstance(table, dict):
            out[section] = {k: fn(v) if k in PATH_KEYS and isinstance(v, str) and v else v
                            for k, v in table.items()}
    return out


def absolute_paths(config: dict, base: Path | str = ".") -> dict:
    """``config`` with the relative file paths of its component sections resolved against ``base``."""
    return _map_paths(config, lambda v: str((Path(base) / v).resolve()) if not Path(v).is_absolute() else v)


def _portable_paths(config: dict, step_dir: Path) -> dict:
    """Paths inside the run directory relative to the step directory (the run dir can move),
    others absolute (the checkpoint works from any working directory)."""
    run_dir = step_dir.parent.parent.resolve()

    def portable(value: str) -> str:
        path = Path(value).resolve()
        if path == run_dir or run_dir in path.parents:
            return os.path.relpath(path, run_dir / step_dir.parent.name / step_dir.name)
        return str(path)

    return _map_paths(config, portable)


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
    try:
        _write_step_dir(tmp, step=step, model_state=model_state, epoch=epoch,
                        config=_portable_paths(config, final), training_state=training_state,
                        info=info)
    except BaseException:  # a full disk, an error: no .tmp- directory is left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    # replaces an existing step directory (e.g. the final save after a periodic one)
    replace_dir(tmp, final, aside=ckpt_dir / f".tmp-old-{final.name}-{os.getpid()}")
    _fsync_dir(ckpt_dir)
    if keep:
        for old in list_checkpoints(ckpt_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """``save_file``, with its I/O failures (a full disk) raised as the OSError they are."""
    try:
        save_file(tensors, str(path), metadata={"format": "pt"})
    except OSError:
        raise
    except Exception as exc:  # safetensors' SafetensorError wraps the OS error's text
        code = re.search(r"(?:code: |os error )(\d+)", str(exc))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None


def _write_step_dir(tmp: Path, *, step, model_state, config, epoch, training_state, info) -> None:
    weights, aliases = _dedupe_shared(model_state)
    _save_tensors(weights, tmp / MODEL_FILE)
    state_tensors: dict[str, torch.Tensor] = {}
    skeleton = flatten_tree(training_state or {}, state_tensors, "s")
    _save_tensors(state_tensors, tmp / STATE_FILE)

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
        "path_base": PATH_BASE,
    }
    meta_tmp = tmp / (META_FILE + ".part")
    with open(meta_tmp, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(meta_tmp, tmp / META_FILE)
    _fsync_dir(tmp)


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
    problem = _meta_problem(meta)
    if problem:
        raise CheckpointError(f"{meta_path}: corrupt checkpoint metadata: {problem}")
    if meta["format_version"] > FORMAT_VERSION:
        raise CheckpointError(f"{meta_path}: written by a newer minidalle "
                              f"(format {meta['format_version']}, this one reads {FORMAT_VERSION})")
    return meta


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _meta_problem(meta) -> str | None:
    """What is wrong with the shape of a ``meta.json`` (None: nothing): the schema every
    loader relies on, checked before any of it is used."""
    if not isinstance(meta, dict):
        return f"expected a JSON object, got {type(meta).__name__}"
    for key in ("format_version", "step", "config", "files"):
        if key not in meta:
            return f"no {key!r}"
    for key in ("format_version", "step", "epoch"):
        if key in meta and not (_is_int(meta[key]) and meta[key] >= (1 if key == "format_version" else 0)):
            return f"{key}: expected a {'positive' if key == 'format_version' else 'non-negative'} integer, got {meta[key]!r}"
    for key in ("config", "files", "model_aliases", "info", "training_state"):
        if key in meta and not isinstance(meta[key], dict):
            return f"{key}: expected an object, got {json.dumps(meta[key])[:40]}"
    if MODEL_FILE not in meta["files"]:
        return f"files: no entry for {MODEL_FILE}"
    for name, entry in meta["files"].items():
        if name not in (MODEL_FILE, STATE_FILE):
            return f"files: unknown file {name!r}"
        if not isinstance(entry, dict) or not _is_int(entry.get("bytes")) or entry["bytes"] < 0 \
                or not isinstance(entry.get("sha256"), str):
            return f"files.{name}: expected {{\"bytes\": integer, \"sha256\": string}}, got {json.dumps(entry)[:60]}"
    for alias, target in meta.get("model_aliases", {}).items():
        if not isinstance(target, str):
            return f"model_aliases.{alias}: expected a tensor name, got {target!r}"
    return None


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
    if meta.get("path_base") == PATH_BASE:  # older checkpoints: relative to the working dir
        meta["config"] = absolute_paths(meta["config"], step_dir)
    weights = _load_tensors(step_dir, MODEL_FILE, meta, verify)
    for alias, target in meta.get("model_aliases", {}).items():
        if target not in weights:
            raise CheckpointError(f"{step_dir / META_FILE}: corrupt checkpoint metadata: "
                                  f"model_aliases.{alias} names {target!r}, which is not in {MODEL_FILE}")
        weights[alias] = weights[target]
    for name, tensor in weights.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{step_dir / MODEL_FILE}: weight {name!r} holds inf or NaN values "
                                  "(a diverged run); use an earlier checkpoint (a step-N directory)")
    state_tensors = _load_tensors(step_dir, STATE_FILE, meta, verify) if STATE_FILE in meta["files"] else {}
    try:
        training_state = unflatten_tree(meta.get("training_state", {}), state_tensors)
    except (KeyError, TypeError, ValueError) as exc:
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
