"""Data parallel training over several processes with ``torch.distributed``.

Processes are started by torchrun (``torch.distributed.run``): ``minidalle run CONFIG
--nproc N`` calls its launcher for N local processes, and ``torchrun ... -m minidalle run
CONFIG`` does the same across hosts. torchrun sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` and the rendezvous address in each process's environment; a backend
(``cpu`` with gloo, ``cuda`` with NCCL) reads them through :class:`DataParallel`.

What changes with N > 1 processes (the single-process path is untouched):

- every process runs the same model on its own shard of each epoch (:class:`ShardSampler`,
  a ``DistributedSampler`` over the single-process epoch order, reshuffled per epoch with
  ``set_epoch``); one step consumes ``batch_size x gradient_accumulation x
  device_iterations`` samples *per process*, so the process count takes the place of the
  recipe's replication factor;
- gradients are averaged over processes once per optimizer update, after the local
  gradient accumulation (:func:`all_reduce_gradients`), so every process applies the same
  update to the same weights: N processes with micro-batch b compute what one process
  with micro-batch N x b computes;
- the weights are broadcast from rank 0 when the runner is built, so all processes start
  identical whatever their RNG did;
- only rank 0 writes (the trainer asks ``backend.is_main``).

Failure handling: ``init_process_group`` and every collective get ``timeout_s``, and a
failed collective becomes a one-line :class:`DistributedError`; torchrun watches its
workers and stops the others as soon as one exits with an error, so a dead or hung process
takes the whole job down instead of leaving the others waiting.
"""
from __future__ import annotations

import atexit
import contextlib
import os
from datetime import timedelta
from typing import Iterable, Sequence

import attrs
import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

from minidalle.errors import ConfigError, MinidalleError

DEFAULT_TIMEOUT_S = 300.0


class DistributedError(MinidalleError):
    """The process group cannot be set up (rendezvous, environment, backend)."""


def env_world() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` as torchrun set them; ``(0, 1, 0)`` outside it."""
    try:
        rank = int(os.environ.get("RANK", "0"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError as exc:
        raise DistributedError(f"torchrun environment: {exc}") from None
    if world < 1 or not 0 <= rank < world:
        raise DistributedError(f"torchrun environment: RANK={rank} WORLD_SIZE={world} is inconsistent")
    return rank, world, local


class DataParallel:
    """This process's place in the job, and the collectives the trainer needs.

    With ``world_size == 1`` nothing is initialised and every method is a cheap no-op, so
    backends can hold one unconditionally.
    """

    def __init__(self, dist_backend: str, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 device=None) -> None:
        self.rank, self.world_size, self.local_rank = env_world()
        self.dist_backend = dist_backend
        self.timeout_s = float(timeout_s)
        self.device = device  # where collective tensors live (NCCL: the process's GPU)
        if self.world_size > 1:
            self._init_process_group()

    # ------------------------------------------------------------------ setup
    def _init_process_group(self) -> None:
        if not dist.is_available():
            raise DistributedError("this torch build has no torch.distributed")
        if dist.is_initialized():  # e.g. a second backend built in the same process
            return
        if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            raise DistributedError(
                "WORLD_SIZE > 1 but MASTER_ADDR/MASTER_PORT are not set: "
                "start the processes with torchrun or `minidalle run --nproc N`")
        # Imported before the group exists, as building the optimizer imports it anyway: its
        # import chain reaches modules (torch.distributed.nn, fsdp) whose functions take
        # `group.WORLD` as a default argument, evaluated at import. Imported after, they hold
        # the group for good, so destroy_process_group() cannot free it, gloo's worker threads
        # outlive the interpreter, and one that drops its last finished work during the exit
        # aborts a finished job (SIGABRT, "terminate called without an active exception").
        import torch._dynamo  # noqa: F401

        kwargs = {}
        if self.dist_backend == "nccl" and self.device is not None:
            kwargs["device_id"] = self.device  # binds the communicator to this GPU eagerly
        try:
            dist.init_process_group(self.dist_backend, timeout=timedelta(seconds=self.timeout_s),
                                    **kwargs)
        except (RuntimeError, ValueError) as exc:  # rendezvous timeout, bad backend, ...
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DistributedError(
                f"cannot join the {self.dist_backend} process group as rank {self.rank} of "
                f"{self.world_size}: {first}") from exc
        global _joined
        _joined = self
        atexit.register(_destroy)  # for the paths that leave without end_process_group()

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def describe(self) -> str:
        return f"rank {self.rank}/{self.world_size} ({self.dist_backend})" if self.active else ""

    def local_training(self, training):
        """The training config one process runs: the process count replaces the replication
        factor, so the per-process replication factor is 1."""
        if not self.active:
            return training
        if training.replication_factor not in (1, self.world_size):
            raise ConfigError(
                f"training.replication_factor: expected 1 or the process count "
                f"({self.world_size}) when running on torch.distributed, got "
                f"{training.replication_factor}")
        return attrs.evolve(training, replication_factor=1)

    # ------------------------------------------------------------------ data
    def shard(self, dataset_len: int, *, shuffle: bool, seed: int, epoch: int) -> list[int]:
        """This process's positions in the epoch (see :class:`ShardSampler`)."""
        sampler = ShardSampler(dataset_len, num_replicas=self.world_size, rank=self.rank,
                               shuffle=shuffle, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    # ------------------------------------------------------------------ collectives
    def _tensor(self, values: Sequence[float]):
        device = self.device if self.dist_backend == "nccl" else "cpu"  # NCCL: GPU tensors only
        return torch.tensor(list(values), dtype=torch.float64, device=device)

    def reduce_mean(self, value: float) -> float:
        if not self.active:
            return value
        t = self._tensor([value])
        with collective("averaging a logged value"):
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t[0]) / self.world_size

    def barrier(self) -> None:
        if not self.active:
            return
        with collective("waiting for the other processes"):
            if self.dist_backend == "nccl" and self.device is not None:
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def broadcast_module(self, module) -> None:
        """Copy rank 0's trainable parameters to every process (a frozen codec inside the
        model is loaded from the same file everywhere and left alone)."""
        if not self.active:
            return
        tensors = [p.data for p in module.parameters() if p.requires_grad]
        for bucket in _buckets(tensors):
            flat = _flatten(bucket)
            with collective("copying rank 0's weights"):
                dist.broadcast(flat, src=0)
            _unflatten_into(flat, bucket)

    def all_reduce_gradients(self, params: Iterable) -> None:
        all_reduce_gradients(params, self.world_size)


@contextlib.contextmanager
def collective(what: str):
    """Turn a failed collective (a peer died, or exceeded the timeout) into one clear line."""
    try:
        yield
    except RuntimeError as exc:  # DistBackendError, gloo "Connection reset", NCCL timeouts
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DistributedError(f"{what}: another process of the job failed or timed out "
                               f"({first[:200]})") from exc


# --------------------------------------------------------------------------- data


class ShardSampler(DistributedSampler):
    """``DistributedSampler`` (``drop_last``, process r takes positions r, r + N, ...) over
    the trainer's epoch order (``minidalle.train.trainer.epoch_order``) instead of its own
    permutation; ``set_epoch`` reshuffles.

    Using the single-process order means the i-th micro-batches of N processes together
    hold exactly the samples one process with an N times larger micro-batch would see, and
    after k steps the job has consumed the first ``k x samples_per_step x N`` positions of
    the epoch whatever N is, which is what lets a run resume with another process count.
    ``drop_last`` gives every process the same number of samples, so all run the same
    number of steps (a process left with an extra step would wait forever in a collective).
    """

    def __init__(self, dataset_len: int, *, num_replicas: int, rank: int, shuffle: bool = True,
                 seed: int = 0) -> None:
        super().__init__(range(dataset_len), num_replicas=num_replicas, rank=rank,
                         shuffle=shuffle, seed=seed, drop_last=True)

    def __iter__(self):
        from minidalle.train.trainer import epoch_order

        n = len(self.dataset)
        order = epoch_order(range(n), self.seed, self.epoch) if self.shuffle else list(range(n))
        return iter(order[self.rank:self.total_size:self.num_replicas])


# --------------------------------------------------------------------------- gradients

BUCKET_BYTES = 64 * 2**20


def _buckets(tensors: list) -> list[list]:
    """Group tensors by (device, dtype) into buckets of about ``BUCKET_BYTES``: one
    collective per bucket instead of one per tensor."""
    groups: dict = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    out = []
    for group in groups.values():
        bucket, size = [], 0
        for t in group:
            bucket.append(t)
            size += t.numel() * t.element_size()
            if size >= BUCKET_BYTES:
                out.append(bucket)
                bucket, size = [], 0
        if bucket:
            out.append(bucket)
    return out


def _flatten(tensors: list):
    return torch.cat([t.reshape(-1) for t in tensors])


def _unflatten_into(flat, tensors: list) -> None:
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t))
        offset += n


def all_reduce_gradients(params: Iterable, world_size: int) -> None:
    """Average ``.grad`` of ``params`` over all processes (in place).

    A parameter that has a gradient in some process but not in another gets a zero
    gradient there, so every process runs the same collectives; one that has none anywhere
    keeps ``grad = None`` (the optimizer skips it, as with a single process).
    """
    if world_size <= 1:
        return
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    used = torch.tensor([float(p.grad is not None) for p in params],
                        device=params[0].device)
    with collective("averaging gradients"):
        dist.all_reduce(used, op=dist.ReduceOp.MAX)
    params = [p for p, u in zip(params, used.tolist()) if u]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    for bucket in _buckets([p.grad for p in params]):
        flat = _flatten(bucket)
        with collective("averaging gradients"):
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(world_size)
        _unflatten_into(flat, bucket)


class DataParallelRunner:
    """Runner mixin: average gradients over processes before each optimizer update.

    Put it before a ``TorchRunner`` subclass in the bases; the runner's backend must have a
    ``dp`` (:class:`DataParallel`).
    """

    def optimizer_update(self):
        self.backend.dp.all_reduce_gradients(
            p for g in self.optimizer.param_groups for p in g["params"])
        return super().optimizer_update()


def make_runner(runner_cls, backend, model, optimizer, training):
    """Build ``runner_cls`` for this process: unchanged with one process; with several,
    weights broadcast from rank 0, per-process training config and gradient averaging."""
    dp = backend.dp
    if not dp.active:
        return runner_cls(backend, model, optimizer, training)
    local = dp.local_training(training)
    dp.broadcast_module(model)
    cls = type(f"DataParallel{runner_cls.__name__}", (DataParallelRunner, runner_cls), {})
    return cls(backend, model, optimizer, local)


class DataParallelBackend:
    """Backend mixin wiring :class:`DataParallel` into the ``Backend`` process hooks.

    Use as ``class CpuBackend(DataParallelBackend, Backend)`` and set ``self.dp`` in
    ``__init__``; then build runners with :func:`make_runner`.
    """

    dp: DataParallel

    @property
    def rank(self) -> int:
        return self.dp.rank

    @property
    def world_size(self) -> int:
        return self.dp.world_size

    def sampler(self, dataset_len: int, *, shuffle: bool, seed: int, epoch: int):
        if not self.dp.active:
            return super().sampler(dataset_len, shuffle=shuffle, seed=seed, epoch=epoch)
        return self.dp.shard(dataset_len, shuffle=shuffle, seed=seed, epoch=epoch)

    def reduce_mean(self, value: float) -> float:
        return self.dp.reduce_mean(value)

    def barrier(self) -> None:
        self.dp.barrier()

    def samples_per_step(self, training) -> int:
        return super().samples_per_step(self.dp.local_training(training))


_joined: DataParallel | None = None  # the process group this process joined, if any


def end_process_group() -> None:
    """The end of a job: wait for every process, then leave the process group while the
    interpreter is whole, so that its threads stop before the exit (torch's advice for the
    end of main; the atexit hook is the fallback for the paths that never get here)."""
    global _joined
    if _joined is None or not dist.is_initialized():  # never joined, or already left
        return
    _joined.barrier()
    _joined = None
    dist.destroy_process_group()


def _destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # exiting anyway; a peer may already be gone
            pass


# --------------------------------------------------------------------------- launching


def launch(nproc: int, argv: list[str]) -> int:
    """Run ``python -m minidalle <argv>`` in ``nproc`` local processes with torchrun's own
    launcher (``--standalone``: a private rendezvous on localhost) and wait for them.

    Returns 0 when all succeeded; otherwise raises :class:`DistributedError` naming the
    failed ranks and their exit codes (torchrun has already stopped the others).
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    # torchrun would set 1 thread per process (with a warning); share the cores instead.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    parser = get_args_parser()
    # SIGTERM-then-SIGKILL grace for the survivors; the option is newer than torch 2.9.
    grace = (["--shutdown-timeout=10"]
             if any(a.dest == "shutdown_timeout" for a in parser._actions) else [])
    args = parser.parse_args([
        "--standalone", f"--nproc-per-node={nproc}", "--max-restarts=0",
        "--monitor-interval=0.5", *grace, "--module", "minidalle", *argv])
    try:
        run(args)
    except ChildFailedError as exc:
        # Every rank seen failed in the same poll: a killed rank's peers often abort too
        # (SIGABRT from gloo) and may carry the earlier timestamp, so name them all.
        failed = [f"process rank {rank} of {nproc} failed with exit code {failure.exitcode}"
                  f"{_signal_note(failure.exitcode)}"
                  for rank, failure in sorted(exc.failures.items())]
        raise DistributedError(f"{', '.join(failed)}; the others were stopped "
                               "(see the output above)") from None
    return 0


def _signal_note(exitcode: int) -> str:
    if exitcode is not None and exitcode < 0:
        import signal

        try:
            return f" (killed by {signal.Signals(-exitcode).name})"
        except ValueError:
            pass
    return ""
