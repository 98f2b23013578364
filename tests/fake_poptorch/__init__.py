"""A recording fake of ``poptorch`` (and ``popdist``) for testing the thin IPU layer.

It implements only the documented API the layer uses (signatures from
``/work/shared/reference/poptorch.md``, SDK >= 2.4), records every call in ``calls``, and
rejects what real PopTorch rejects where that is cheap to check (unknown setters, partials
dtypes, memory-proportion keys, ``NoReduction``, the input batch rule, modifying frozen
options, wrapping a module twice). ``trainingModel`` *simulates* a training host call on
the CPU (micro-batches, Mean reduction over accumulation and replicas, static loss scaling,
one optimizer update per device iteration), so the backend's glue can be run end to end.
It proves nothing about PopTorch or an IPU.

Use :func:`install` inside a test (through ``monkeypatch``), never at import time, so
nothing outside the test believes PopTorch is installed.
"""
from __future__ import annotations

import contextlib
import enum
import importlib.machinery
import types

import torch

__version__ = "3.3.0+fake"


class ReductionType(enum.IntEnum):
    Sum = 0
    Mean = 1
    NoReduction = 2


class OutputMode(enum.IntEnum):
    Final = 0
    EveryN = 1
    All = 2
    Sum = 3
    Default = 4


class DataLoaderMode(enum.IntEnum):
    Sync = 0
    Async = 1
    AsyncRebatched = 2


class AutoStage(enum.IntEnum):
    SameAsIpu = 0
    AutoIncrement = 1


class MatMulSerializationMode(enum.Enum):
    InputChannels = "input_channels"
    ReducingDim = "reducing_dim"
    OutputChannels = "output_channels"
    Disabled = "none"


class _Recorded:
    """Base of the option groups: records ``(qualified setter name, *args)``."""

    def __init__(self, calls: list, prefix: str, root=None):
        self._calls, self._prefix, self._root = calls, prefix, root or self

    def _rec(self, name, *args):
        if getattr(self._root, "_frozen", False):
            raise RuntimeError("Can't modify frozen Options")
        self._calls.append((f"{self._prefix}{name}", *args))


class _Training(_Recorded):
    def __init__(self, calls, root):
        super().__init__(calls, "Training.", root)
        self.gradient_accumulation = 1
        self.reduction = ReductionType.Mean
        self.automatic_loss_scaling = False

    def gradientAccumulation(self, gradient_accumulation: int):
        self._rec("gradientAccumulation", gradient_accumulation)
        self.gradient_accumulation = gradient_accumulation
        return self

    def accumulationAndReplicationReductionType(self, reduction_type):
        if reduction_type not in (ReductionType.Sum, ReductionType.Mean):
            raise ValueError("reduction_type must be Sum or Mean")
        self._rec("accumulationAndReplicationReductionType", reduction_type)
        self.reduction = reduction_type
        return self

    def setAutomaticLossScaling(self, enabled: bool):
        self._rec("setAutomaticLossScaling", enabled)
        self.automatic_loss_scaling = enabled
        return self


class _Precision(_Recorded):
    def __init__(self, calls, root):
        super().__init__(calls, "Precision.", root)

    def enableStochasticRounding(self, enabled: bool):
        self._rec("enableStochasticRounding", enabled)
        return self

    def setPartialsType(self, dtype):
        if dtype not in (torch.float32, torch.float16):
            raise ValueError("setPartialsType: only torch.float32 and torch.float16")
        self._rec("setPartialsType", dtype)
        return self


class TensorLocationSettings:
    def __init__(self):
        self.settings = {}

    def useOnChipStorage(self, use: bool = True):
        self.settings["onChip"] = use
        return self

    def useReplicatedTensorSharding(self, use: bool = True):
        self.settings["useReplicatedTensorSharding"] = use
        return self


class _TensorLocations(_Recorded):
    def __init__(self, calls, root):
        super().__init__(calls, "TensorLocations.", root)

    def setOptimizerLocation(self, location: TensorLocationSettings):
        assert isinstance(location, TensorLocationSettings)
        self._rec("setOptimizerLocation", dict(location.settings))
        return self


class _Popart(_Recorded):
    def __init__(self, calls, root):
        super().__init__(calls, "_Popart.", root)

    def set(self, key: str, value):
        self._rec("set", key, value)
        return self


class PipelinedExecution:
    def __init__(self, *args):
        self.args = args

    def __eq__(self, other):
        return isinstance(other, PipelinedExecution) and self.args == other.args

    def __repr__(self):
        return f"PipelinedExecution{self.args}"


class Options(_Recorded):
    def __init__(self):
        self.calls: list = []
        super().__init__(self.calls, "")
        self._frozen = False
        self.replication_factor = 1
        self.device_iterations = 1
        self.output_mode = OutputMode.Default
        self.Training = _Training(self.calls, self)
        self.Precision = _Precision(self.calls, self)
        self.TensorLocations = _TensorLocations(self.calls, self)
        self._Popart = _Popart(self.calls, self)

    def replicationFactor(self, replication_factor: int):
        self._rec("replicationFactor", replication_factor)
        self.replication_factor = replication_factor
        return self

    def autoRoundNumIPUs(self, auto_round_num_ipus: bool = True):
        self._rec("autoRoundNumIPUs", auto_round_num_ipus)
        return self

    def deviceIterations(self, device_iterations: int):
        self._rec("deviceIterations", device_iterations)
        self.device_iterations = device_iterations
        return self

    def outputMode(self, output_mode, output_return_period=None):
        assert isinstance(output_mode, OutputMode)
        self._rec("outputMode", output_mode)
        self.output_mode = output_mode
        return self

    def randomSeed(self, random_seed: int):
        self._rec("randomSeed", random_seed)
        torch.manual_seed(random_seed)
        return self

    def setAvailableMemoryProportion(self, available_memory_proportion):
        for key, value in available_memory_proportion.items():
            if not key.startswith("IPU"):
                raise ValueError(f"bad key {key!r}")
            int(key[3:])
            assert 0 < value <= 1
        self._rec("setAvailableMemoryProportion", dict(available_memory_proportion))
        return self

    def setExecutionStrategy(self, strategy):
        self._rec("setExecutionStrategy", strategy)
        return self

    def enableExecutableCaching(self, path: str):
        self._rec("enableExecutableCaching", path)
        return self

    def useIpuModel(self, use_model: bool):
        self._rec("useIpuModel", use_model)
        return self

    def useOfflineIpuTarget(self, ipu_version: int = 2):
        self._rec("useOfflineIpuTarget", ipu_version)
        return self

    def enableSyntheticData(self, enabled: bool):
        self._rec("enableSyntheticData", enabled)
        return self

    def clone(self):
        import copy

        other = copy.copy(self)
        other._frozen = False
        return other


# --------------------------------------------------------------------------- ops

ops_calls: list = []


def BeginBlock(layer_to_call, user_id=None, ipu_id=None):
    if getattr(layer_to_call, "_fake_block", None) is not None:
        raise RuntimeError("module is already wrapped in a block")
    layer_to_call._fake_block = (user_id, ipu_id)
    ops_calls.append(("BeginBlock", user_id, ipu_id))
    return layer_to_call


@contextlib.contextmanager
def Block(user_id=None, ipu_id=None):
    ops_calls.append(("Block", user_id, ipu_id))
    yield


def recomputationCheckpoint(*tensors):
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            raise ValueError("recomputationCheckpoint takes tensors")
    ops_calls.append(("recomputationCheckpoint", len(tensors)))
    return tensors[0] if len(tensors) == 1 else tensors


def serializedMatMul(lhs, rhs, mode, factor=0, keep_precision=False):
    assert isinstance(mode, MatMulSerializationMode)
    if mode is MatMulSerializationMode.OutputChannels and rhs.shape[-1] % factor:
        raise ValueError("factor must divide the output channels")
    ops_calls.append(("serializedMatMul", mode, factor))
    return torch.matmul(lhs, rhs)


def identity_loss(x, reduction):
    ops_calls.append(("identity_loss", reduction))
    return {"sum": x.sum, "mean": x.mean, "none": lambda: x}[reduction]()


def ipuHardwareIsAvailable(num_ipus: int = 1) -> bool:
    return False


# --------------------------------------------------------------------------- optimizers


class VariableAttributes:
    def __init__(self, explicit):
        self.constant = set()
        self.variable = set(explicit)

    def markAsConstant(self, attr):
        self.constant.add(attr)
        self.variable.discard(attr)

    def markAsVariable(self, attr):
        self.variable.add(attr)
        self.constant.discard(attr)

    def isConstant(self, attr):
        return attr in self.constant


_IPU_ARGS = ("loss_scaling", "accum_type", "first_order_momentum_accum_type",
             "second_order_momentum_accum_type", "max_grad_norm")


def _optimizer(base, extra=()):
    class Optimizer(base):
        def __init__(self, params, lr=None, betas=None, eps=None, weight_decay=None, **kwargs):
            ipu = {k: kwargs.pop(k) for k in (*_IPU_ARGS, *extra) if k in kwargs}
            unknown = set(kwargs) - {"amsgrad", "foreach", "maximize", "capturable",
                                     "differentiable", "fused"}
            if unknown:
                raise TypeError(f"unexpected arguments {sorted(unknown)}")
            for key in ("accum_type", "first_order_momentum_accum_type",
                        "second_order_momentum_accum_type"):
                assert ipu.get(key, torch.float32) in (torch.float16, torch.float32), key
            explicit = {k for k, v in dict(lr=lr, betas=betas, eps=eps,
                                          weight_decay=weight_decay).items() if v is not None}
            torch_args = {k: v for k, v in dict(lr=lr, betas=betas, eps=eps,
                                               weight_decay=weight_decay).items() if v is not None}
            super().__init__(params, foreach=False, **torch_args)
            self.ipu_args = ipu
            self.loss_scaling = ipu.get("loss_scaling") or 1.0
            self.max_grad_norm = ipu.get("max_grad_norm")
            self.variable_attrs = VariableAttributes(explicit | set(ipu))

    Optimizer.__name__ = base.__name__
    return Optimizer


optim = types.SimpleNamespace(Adam=_optimizer(torch.optim.Adam),
                              AdamW=_optimizer(torch.optim.AdamW, ("bias_correction",)))


# --------------------------------------------------------------------------- wrappers


class PoplarExecutor:
    """Simulates ``trainingModel``'s host calls on the CPU."""

    def __init__(self, model, options, optimizer):
        if getattr(model, "_fake_wrapped", False):
            raise RuntimeError("model is already wrapped; call destroy() first")
        model._fake_wrapped = True
        self.model, self.options, self.optimizer = model, options, optimizer
        self.calls: list = []
        self._compiled = self._attached = False

    def _factors(self):
        o = self.options
        return o.device_iterations, o.replication_factor, o.Training.gradient_accumulation

    def _check_batch(self, *args):
        di, rf, ga = self._factors()
        for a in args:
            if a.shape[0] % (di * rf * ga):
                raise ValueError(
                    f"dim 0 ({a.shape[0]}) must be a multiple of device_iterations ({di}) x "
                    f"replication_factor ({rf}) x gradient_accumulation ({ga})")

    def compile(self, *args):
        self._check_batch(*args)
        self.calls.append(("compile", tuple(a.shape for a in args)))
        self._compiled = self._attached = True

    def __call__(self, *args):
        if not self._compiled:
            self.compile(*args)
        self._check_batch(*args)
        di, rf, ga = self._factors()
        n = args[0].shape[0]
        micro = n // (di * rf * ga)
        scale = self.optimizer.loss_scaling
        losses = []
        for d in range(di):
            self.optimizer.zero_grad(set_to_none=True)
            for m in range(rf * ga):
                start = (d * rf * ga + m) * micro
                loss = self.model(*(a[start:start + micro] for a in args))
                (loss.float() * (scale / (rf * ga))).backward()
                losses.append(loss.detach().float().reshape(()))
            params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
            for p in params:
                p.grad.div_(scale)
            if self.optimizer.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, self.optimizer.max_grad_norm)
            self.optimizer.step()
        self.calls.append(("call", n))
        out = torch.stack(losses)
        return out if self.options.output_mode == OutputMode.All else out[-1:]

    def setOptimizer(self, optimizer):
        self.calls.append(("setOptimizer", [g["lr"] for g in optimizer.param_groups]))

    def copyWeightsToHost(self):
        self.calls.append(("copyWeightsToHost",))

    def isCompiled(self):
        return self._compiled

    def isAttachedToDevice(self):
        return self._attached

    def detachFromDevice(self):
        assert self._compiled and self._attached
        self.calls.append(("detachFromDevice",))
        self._attached = False

    def destroy(self):
        self.model._fake_wrapped = False


executors: list = []


def trainingModel(model, options=None, optimizer=None):
    options = (options or Options()).clone()
    options._frozen = True
    if options.output_mode == OutputMode.Default:
        options.output_mode = OutputMode.Final
    ex = PoplarExecutor(model, options, optimizer)
    executors.append(ex)
    return ex


class DataLoader(torch.utils.data.DataLoader):
    def __init__(self, options, dataset, batch_size=1, shuffle=False, num_workers=0,
                 drop_last=True, persistent_workers=None, auto_distributed_partitioning=True,
                 mode=DataLoaderMode.Sync, async_options=None, rebatched_worker_size=None,
                 **kwargs):
        self.combinedBatchSize = (batch_size * options.device_iterations
                                  * options.replication_factor
                                  * options.Training.gradient_accumulation)
        if rebatched_worker_size is not None:
            assert mode is DataLoaderMode.AsyncRebatched
            assert rebatched_worker_size <= self.combinedBatchSize
        self.poptorch_args = dict(batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                                  drop_last=drop_last, persistent_workers=persistent_workers,
                                  auto_distributed_partitioning=auto_distributed_partitioning,
                                  mode=mode, async_options=async_options,
                                  rebatched_worker_size=rebatched_worker_size)
        options._frozen = True
        super().__init__(dataset, batch_size=self.combinedBatchSize, shuffle=shuffle,
                         num_workers=num_workers, drop_last=drop_last,
                         persistent_workers=bool(persistent_workers) and num_workers > 0, **kwargs)
        self.terminated = False

    def terminate(self):
        self.terminated = True


# --------------------------------------------------------------------------- install


def _module(name, attrs):
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    # a spec, so importlib.util.find_spec() sees it while it is installed
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    return module


def install(monkeypatch, *, popdist_env=None):
    """Put a fresh fake ``poptorch`` (and, with ``popdist_env``, a PopRun-like ``popdist``:
    a dict with total/local replicas, instances, index, ipus_per_replica) in
    ``sys.modules`` for the duration of one test. Returns the fake poptorch module."""
    import sys

    ops_calls.clear()
    executors.clear()
    public = {k: v for k, v in globals().items() if not k.startswith("_") or k == "__version__"}
    fake = _module("poptorch", public)
    monkeypatch.setitem(sys.modules, "poptorch", fake)
    if popdist_env is not None:
        env = popdist_env  # the same dict: a test may change it

        class PopdistOptions(Options):
            def __init__(self, ipus_per_replica=1):
                super().__init__()
                self.calls.append(("popdist.poptorch.Options", ipus_per_replica))
                self.replication_factor = env["local_replicas"]

        popdist_poptorch = _module("popdist.poptorch", {"Options": PopdistOptions})
        popdist = _module("popdist", {
            "isPopdistEnvSet": lambda: True,
            "getNumTotalReplicas": lambda: env["total_replicas"],
            "getNumLocalReplicas": lambda: env["local_replicas"],
            "getNumInstances": lambda: env["instances"],
            "getInstanceIndex": lambda: env["index"],
            "getNumIpusPerReplica": lambda: env["ipus_per_replica"],
            "poptorch": popdist_poptorch,
        })
        monkeypatch.setitem(sys.modules, "popdist", popdist)
        monkeypatch.setitem(sys.modules, "popdist.poptorch", popdist_poptorch)
    return fake
