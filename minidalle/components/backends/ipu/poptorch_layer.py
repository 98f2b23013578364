"""The thin PopTorch layer: turns an :class:`~minidalle.components.backends.ipu.plan.IpuPlan` into PopTorch calls.

Everything here is a direct mapping onto PopTorch's documented API (SDK >= 2.4:
``outputMode``, ``accumulationAndReplicationReductionType``); every decision was made in
the plan. ``poptorch`` (and ``popdist``/``horovod`` under PopRun) are imported only by the
functions that need them, when the ``ipu`` backend is built.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from minidalle.errors import ConfigError, UnavailableComponentError
from minidalle.components.backends.ipu import UNAVAILABLE


def import_poptorch():
    try:
        import poptorch
    except ImportError as exc:  # not installed, or the Poplar SDK is not enabled
        raise UnavailableComponentError(f"backend 'ipu' is unavailable: {UNAVAILABLE} "
                                        f"(import poptorch: {str(exc).splitlines()[0]})") from None
    return poptorch


def import_popdist():
    """``popdist`` when this process was started by PopRun, else None."""
    try:
        import popdist
        import popdist.poptorch  # noqa: F401  (the Options replacement)
    except ImportError:
        return None
    return popdist if popdist.isPopdistEnvSet() else None


# --------------------------------------------------------------------------- processes


@dataclass
class Instances:
    """Where this process sits in a PopRun job (one instance when not under PopRun)."""

    count: int = 1
    index: int = 0
    local_replicas: int = 1


def instances_from_popdist(plan, popdist) -> Instances:
    if popdist is None:
        return Instances(1, 0, plan.replication_factor)
    total, ipus = popdist.getNumTotalReplicas(), popdist.getNumIpusPerReplica()
    if total != plan.replication_factor:
        raise ConfigError(f"training.replication_factor: PopRun started {total} replicas "
                          f"(--num-replicas) but the config asks for {plan.replication_factor}")
    if ipus != plan.ipus_per_replica:
        raise ConfigError(f"backend.ipus_per_replica: PopRun gives {ipus} IPUs per replica "
                          f"(--ipus-per-replica) but the config asks for {plan.ipus_per_replica}")
    return Instances(popdist.getNumInstances(), popdist.getInstanceIndex(),
                     popdist.getNumLocalReplicas())


# --------------------------------------------------------------------------- graph ops


class PoptorchOps:
    """The device side of :mod:`minidalle.components.backends.ipu.transforms`' ops."""

    def __init__(self, poptorch):
        self.poptorch = poptorch

    def begin_block(self, module, name: str, ipu: int):
        # Newer PopTorch hooks the module and returns it; older returns a wrapper module
        # (annotate_pipeline puts a returned wrapper in the module's place).
        return self.poptorch.BeginBlock(module, user_id=name, ipu_id=ipu)

    def block(self, name: str, ipu: int):
        return self.poptorch.Block(user_id=name, ipu_id=ipu)

    def checkpoint(self, tensor):
        return self.poptorch.recomputationCheckpoint(tensor)

    def serialized_matmul(self, lhs, rhs, factor: int):
        return self.poptorch.serializedMatMul(
            lhs, rhs, self.poptorch.MatMulSerializationMode.OutputChannels, factor)


class LossModel(torch.nn.Module):
    """What PopTorch compiles: the model's training loss marked with ``identity_loss``."""

    def __init__(self, model, poptorch):
        super().__init__()
        self.model = model
        self._poptorch = poptorch

    def forward(self, text, image):
        loss = self.model(text, image, return_loss=True)
        return self._poptorch.identity_loss(loss, reduction="none")


# --------------------------------------------------------------------------- options


def _dtype(name: str):
    return torch.float16 if name == "float16" else torch.float32


def make_options(plan, poptorch, popdist=None):
    """``poptorch.Options`` for ``plan``; from ``popdist.poptorch.Options`` under PopRun (it
    sets the local replication factor and the process id/count itself)."""
    if popdist is not None:
        opts = popdist.poptorch.Options(ipus_per_replica=plan.ipus_per_replica)
    else:
        opts = poptorch.Options()
        opts.replicationFactor(plan.replication_factor)
    opts.autoRoundNumIPUs(plan.auto_round_num_ipus)
    opts.deviceIterations(plan.device_iterations)
    opts.randomSeed(plan.seed)
    opts.Training.gradientAccumulation(plan.gradient_accumulation)
    opts.Training.accumulationAndReplicationReductionType(poptorch.ReductionType.Mean)
    if plan.automatic_loss_scaling:
        opts.Training.setAutomaticLossScaling(True)
    # Every micro-batch's loss comes back, so a step reports the mean like the cpu backend.
    opts.outputMode(poptorch.OutputMode.All)
    opts.Precision.enableStochasticRounding(plan.stochastic_rounding)
    opts.Precision.setPartialsType(torch.float16 if plan.half_partials else torch.float32)
    opts.setAvailableMemoryProportion(dict(plan.available_memory_proportion))
    opts.TensorLocations.setOptimizerLocation(
        poptorch.TensorLocationSettings()
        .useOnChipStorage(not plan.optimizer_state_offchip)
        .useReplicatedTensorSharding(plan.enable_rts))
    if plan.pipelined:
        opts.setExecutionStrategy(poptorch.PipelinedExecution(poptorch.AutoStage.AutoIncrement))
    if plan.executable_cache_dir:
        opts.enableExecutableCaching(plan.executable_cache_dir)
    if plan.ipu_model:
        opts.useIpuModel(True)
    if plan.compile_only:
        opts.useOfflineIpuTarget(2)  # Mk2
    if plan.synthetic_data:
        opts.enableSyntheticData(True)
    # As the recipe: accumulated gradients stay on the device; outline repeated layers.
    opts._Popart.set("disableGradAccumulationTensorStreams", True)
    opts._Popart.set("outlineThreshold", 10.0)
    return opts


def make_optimizer(plan, model, training, poptorch):
    """``poptorch.optim.Adam``/``AdamW`` with the plan's loss scaling and state dtypes.

    The hyper-parameters are the cpu reference's (``minidalle.train.optim``): one parameter group,
    ``training.weight_decay``, betas, eps; AdamW keeps PyTorch's bias correction.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    kwargs = dict(
        lr=training.lr, betas=tuple(training.betas), eps=training.eps,
        weight_decay=training.weight_decay, loss_scaling=plan.loss_scaling,
        accum_type=_dtype(plan.accum_dtype),
        first_order_momentum_accum_type=_dtype(plan.first_order_momentum_dtype),
        second_order_momentum_accum_type=_dtype(plan.second_order_momentum_dtype),
    )
    if training.max_grad_norm is not None:
        kwargs["max_grad_norm"] = training.max_grad_norm
    cls = poptorch.optim.Adam if training.optimizer == "adam" else poptorch.optim.AdamW
    optimizer = cls(params, **kwargs)
    optimizer.variable_attrs.markAsConstant("weight_decay")  # never scheduled
    return optimizer


def make_dataloader(plan, options, dataset, poptorch, *, collate_fn=None, shuffle=False,
                    partition=True):
    """``poptorch.DataLoader``: one item per host call (``samples_per_step`` samples per
    instance), filled by a separate process in the async modes. ``partition``: let PopTorch
    split the dataset between PopRun instances (False when it is this instance's part)."""
    modes = {"sync": poptorch.DataLoaderMode.Sync, "async": poptorch.DataLoaderMode.Async,
             "async_rebatched": poptorch.DataLoaderMode.AsyncRebatched}
    kwargs = dict(batch_size=plan.micro_batch_size, shuffle=shuffle,
                  num_workers=plan.dataloader_workers, drop_last=True,
                  persistent_workers=plan.dataloader_workers > 0,
                  auto_distributed_partitioning=partition, mode=modes[plan.dataloader_mode])
    if collate_fn is not None:
        kwargs["collate_fn"] = collate_fn
    if plan.dataloader_mode != "sync":
        kwargs["async_options"] = {"early_preload": True, "load_indefinitely": True}
    if plan.dataloader_mode == "async_rebatched":
        kwargs["rebatched_worker_size"] = plan.rebatched_worker_size
    return poptorch.DataLoader(options, dataset, **kwargs)


def wrap_training(model, optimizer, options, poptorch):
    """``poptorch.trainingModel`` around the loss of ``model`` (parameters are shared)."""
    model.train()
    return poptorch.trainingModel(LossModel(model, poptorch), options=options, optimizer=optimizer)


def compile_executor(executor, text, image) -> float:
    """Compile (or load from the executable cache) and attach; seconds it took."""
    start = time.perf_counter()
    executor.compile(text, image)
    return time.perf_counter() - start
