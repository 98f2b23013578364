"""The ``ipu`` backend: Graphcore IPUs through PopTorch.

How it runs a config (see ``minidalle plan CONFIG`` for what it will do):

1. ``setup_model`` casts the model to fp16 when ``backend.fp16`` (the frozen codec stays
   fp32, as the model keeps it).
2. ``build_optimizer`` makes the :class:`~minidalle.components.backends.ipu.plan.IpuPlan` from the
   ``[backend]`` keys, the training config and the built model, and a
   ``poptorch.optim.Adam``/``AdamW`` with its loss scaling and state dtypes.
3. ``prepare`` applies the plan's transforms (serialized embedding/projection, pipeline
   blocks, recomputation checkpoints) with PopTorch's ops, builds ``poptorch.Options``
   (from PopDist under PopRun) and wraps the model with ``poptorch.trainingModel``.
4. The runner's ``compile`` compiles (the trainer prints ``Compiled model in X secs``);
   ``train_step`` hands PopTorch one host call's worth of samples
   (``batch_size x gradient_accumulation x replicas x device_iterations`` per instance) and
   reports the mean of every micro-batch loss (``OutputMode.All``); ``lr_changed`` calls
   ``setOptimizer``; ``sync_to_host`` copies the weights back before checkpoints.

``make_loader`` gives the ``poptorch.DataLoader`` (asynchronous by default) over the
trainer's sample order. ``eval_loss`` (validation) runs on the host CPU in fp32.
"""
from __future__ import annotations

import copy

import torch

from minidalle.train.backend import Backend, Runner, StepResult, samples_per_step, split_batch
from minidalle.errors import ConfigError, MinidalleError, UnavailableComponentError
from minidalle.components.backends.ipu.plan import IpuConfig, build_plan
from minidalle.components.backends.ipu.poptorch_layer import (
    Instances,
    PoptorchOps,
    compile_executor,
    import_popdist,
    import_poptorch,
    instances_from_popdist,
    make_dataloader,
    make_optimizer,
    make_options,
    wrap_training,
)
from minidalle.components.backends.ipu.transforms import apply_plan


def model_counts(model) -> dict:
    """Parameters per part of a built DALLE, in the shape ``build_plan(counts=...)`` takes."""
    def n(module):
        return sum(p.numel() for p in module.parameters())

    return {
        "text_emb": n(model.text_emb), "text_pos_emb": n(model.text_pos_emb),
        "image_emb": n(model.image_emb), "image_pos_emb": n(model.image_pos_emb),
        "layers": [n(layer) for layer in model.transformer.layers],
        "to_logits": n(model.norm_out) + n(model.to_logits),
    }


def codec_encoder_params(codec) -> int:
    if codec is None:
        return 0
    parts = [getattr(codec, k, None) for k in ("encoder", "quant_conv", "quantize")]
    modules = parts if all(p is not None for p in parts) else [codec]
    return sum(p.numel() for m in modules for p in m.parameters())


def plan_for_model(ipu_config, model, training, *, seed: int = 0, source: str = "the config"):
    """The plan for a built model (sizes and parameter counts measured on it)."""
    from minidalle.config import ComponentSpec, Config, ModelConfig, RunConfig

    cfg = Config(
        model=ModelConfig(dim=model.dim, depth=len(model.transformer.layers),
                          text_seq_len=model.text_seq_len),
        training=training, run=RunConfig(seed=seed),
        backend=ComponentSpec("ipu", ipu_config), source=source)
    codec = getattr(model, "codec", None)
    return build_plan(cfg, text_vocab=model.text_vocab, num_image_tokens=model.num_image_tokens,
                      fmap_size=model.fmap_size, codec_on_device=codec is not None,
                      codec_params=codec_encoder_params(codec), counts=model_counts(model))


class CompileOnlyDone(MinidalleError):
    """Raised after compiling when ``backend.compile_only`` is set: the run stops there."""


class IpuRunner(Runner):
    def __init__(self, backend, model, optimizer, training, executor, plan):
        super().__init__(backend, model, optimizer, training)
        self.executor = executor
        self.plan = plan

    def compile(self, batch):
        return compile_executor(self.executor, batch["text"], batch["image"])

    def train_step(self, batch) -> StepResult:
        if self.plan.compile_only:
            raise CompileOnlyDone("backend.compile_only: compiled for an offline Mk2 target "
                                  "(cached when backend.executable_cache_dir is set); nothing "
                                  "runs without an IPU attached: unset it to train")
        losses = self.executor(batch["text"], batch["image"])
        # OutputMode.All: one loss per micro-batch (x replicas x device iterations).
        return StepResult(loss=float(torch.as_tensor(losses).float().mean()))

    @torch.no_grad()
    def eval_loss(self, batch) -> float:
        # On the host in fp32: an inference executable per batch size is not worth it here.
        self.sync_to_host()
        host = copy.deepcopy(self.model).float().eval()
        total, count = 0.0, 0
        for micro in split_batch(batch, self.training.batch_size):
            n = micro["text"].shape[0]
            total += float(host(micro["text"], micro["image"], return_loss=True)) * n
            count += n
        return total / max(count, 1)

    def lr_changed(self) -> None:
        self.executor.setOptimizer(self.optimizer)

    def sync_to_host(self) -> None:
        if self.executor.isCompiled():
            self.executor.copyWeightsToHost()

    def close(self) -> None:
        if self.executor.isCompiled() and self.executor.isAttachedToDevice():
            self.executor.detachFromDevice()
        loader = getattr(self.backend, "_loader", None)
        if loader is not None and hasattr(loader, "terminate"):
            loader.terminate()


class IpuBackend(Backend):
    name = "ipu"

    def __init__(self, config: IpuConfig | None = None) -> None:
        super().__init__(config or IpuConfig())
        self.poptorch = import_poptorch()
        self.popdist = import_popdist()
        self.plan = None
        self.options = None
        self._seed = 0
        self._loader = None
        self._hvd = None
        self.instances = Instances()
        if self.popdist is not None:
            self.instances = Instances(self.popdist.getNumInstances(),
                                       self.popdist.getInstanceIndex(),
                                       self.popdist.getNumLocalReplicas())
            if self.instances.count > 1:
                try:
                    import horovod.torch as hvd
                except ImportError:
                    raise UnavailableComponentError(
                        "backend 'ipu': PopRun started several instances; averaging their "
                        "losses needs horovod (pip install horovod)") from None
                hvd.init()
                self._hvd = hvd

    # ---------------------------------------------------------------- description
    def describe(self) -> str:
        version = getattr(self.poptorch, "__version__", "?")
        if self.plan is None:
            return f"ipu (poptorch {version})"
        p = self.plan
        where = "IPU Model" if p.ipu_model else f"{p.total_ipus} IPUs"
        return (f"ipu {where}: {p.replication_factor} x {p.ipus_per_replica} IPUs, "
                f"{'fp16' if p.fp16 else 'fp32'}, poptorch {version}"
                + (f", instance {self.instances.index}/{self.instances.count}"
                   if self.instances.count > 1 else ""))

    # ---------------------------------------------------------------- processes
    @property
    def rank(self) -> int:
        return self.instances.index

    @property
    def world_size(self) -> int:
        return self.instances.count

    def sampler(self, dataset_len, *, shuffle, seed, epoch):
        if self.instances.count == 1:
            return None
        from minidalle.train.distributed import ShardSampler

        s = ShardSampler(dataset_len, num_replicas=self.instances.count, rank=self.instances.index,
                         shuffle=shuffle, seed=seed)
        s.set_epoch(epoch)
        return list(s)

    def reduce_mean(self, value: float) -> float:
        if self._hvd is None:
            return value
        return float(self._hvd.allreduce(torch.tensor([value], dtype=torch.float64),
                                         average=True)[0])

    def barrier(self) -> None:
        if self._hvd is not None:
            self._hvd.allreduce(torch.zeros(1))

    def samples_per_step(self, training) -> int:
        """Per instance: under PopRun each instance feeds its own local replicas."""
        total = samples_per_step(training)
        if self.instances.count > 1:
            if training.replication_factor % self.instances.count:
                raise ConfigError(
                    f"training.replication_factor: {training.replication_factor} replicas do not "
                    f"split evenly over {self.instances.count} PopRun instances")
            return total // self.instances.count
        return total

    # ---------------------------------------------------------------- setup
    def seed(self, seed: int) -> None:
        super().seed(seed)
        self._seed = seed  # the device RNG gets it through Options.randomSeed

    def setup_model(self, model):
        from minidalle.model.linear import use_plain_linear

        use_plain_linear(model)  # PopTorch traces standard ops only, not oneDNN's
        if self.config.fp16:
            model = model.half()
        return model

    def _plan(self, model, training):
        if self.plan is None:
            self.plan = plan_for_model(self.config, model, training, seed=self._seed)
            instances_from_popdist(self.plan, self.popdist)  # PopRun agrees with the config
        return self.plan

    def build_optimizer(self, model, training):
        return make_optimizer(self._plan(model, training), model, training, self.poptorch)

    def prepare(self, model, optimizer, training) -> IpuRunner:
        plan = self._plan(model, training)
        apply_plan(model, plan, PoptorchOps(self.poptorch))
        self.options = make_options(plan, self.poptorch, self.popdist)
        if self._hvd is not None:  # every instance starts from rank 0's weights
            self._hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        executor = wrap_training(model, optimizer, self.options, self.poptorch)
        return IpuRunner(self, model, optimizer, training, executor, plan)

    def make_loader(self, dataset, indices, *, collate_fn=None):
        """A ``poptorch.DataLoader`` over ``dataset[indices]`` in that order (after ``prepare``):
        each item is one step's samples for this instance."""
        if self.options is None or self.plan is None:
            raise RuntimeError("make_loader is called after prepare()")
        if self._loader is not None and hasattr(self._loader, "terminate"):
            self._loader.terminate()  # the previous epoch's worker process
        subset = torch.utils.data.Subset(dataset, list(indices))
        # ``indices`` is already this instance's share (``sampler``): no second split.
        self._loader = make_dataloader(self.plan, self.options, subset, self.poptorch,
                                       collate_fn=collate_fn, partition=False)
        return self._loader


def build(config: IpuConfig | None = None) -> IpuBackend:
    return IpuBackend(config)
