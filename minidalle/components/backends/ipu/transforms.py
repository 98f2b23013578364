"""The model transforms an :class:`~minidalle.components.backends.ipu.plan.IpuPlan` asks for, as plain PyTorch.

- :class:`SerializedEmbedding` and :class:`SerializedLinear` split the text embedding and
  the logits projection into ``factor`` pieces (to cut the memory of one big gather or
  matmul on an IPU). They keep the original ``weight``/``bias`` parameters under the same
  names, so ``state_dict`` keys, checkpoints and code that reads ``to_logits.weight`` are
  unchanged, and they compute the same numbers as ``nn.Embedding``/``nn.Linear``.
- :func:`annotate_pipeline` marks where each pipeline block starts and registers a
  recomputation checkpoint on each transformer layer's output.

Device-specific operations come from an :class:`Ops` object. :class:`CpuOps` (the default)
makes annotations no-ops and serializes the matmul by output channels in PyTorch; the
PopTorch layer passes ops that call ``poptorch.BeginBlock``, ``poptorch.Block``,
``poptorch.recomputationCheckpoint`` and ``poptorch.serializedMatMul``.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from minidalle.errors import ConfigError

# Attribute set on modules that start a pipeline block (kept by CpuOps, for inspection).
BLOCK_ATTR = "_ipu_block"


class CpuOps:
    """Off the IPU: blocks and checkpoints are no-ops; serialized matmul is done in pieces."""

    def begin_block(self, module: nn.Module, name: str, ipu: int) -> nn.Module:
        # Only record the annotation: nothing changes how the module runs.
        object.__setattr__(module, BLOCK_ATTR, (name, ipu))
        return module

    def block(self, name: str, ipu: int):
        return contextlib.nullcontext()

    def checkpoint(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def serialized_matmul(self, lhs: torch.Tensor, rhs: torch.Tensor, factor: int) -> torch.Tensor:
        """``lhs @ rhs`` computed as ``factor`` matmuls over slices of the output channels
        (poptorch's ``MatMulSerializationMode.OutputChannels``)."""
        return torch.cat([lhs @ part for part in rhs.chunk(factor, dim=-1)], dim=-1)


class SerializedEmbedding(nn.Module):
    """``nn.Embedding`` looked up in ``factor`` equal slices of the table.

    Each slice gathers only the ids in its range (others are clamped and zeroed); the
    slices' results are summed, which adds exact zeros, so outputs and gradients equal the
    plain embedding's.
    """

    def __init__(self, embedding: nn.Embedding, factor: int):
        super().__init__()
        rows, dim = embedding.weight.shape
        if factor < 1 or rows % factor:
            raise ConfigError(f"embedding_serialization_factor: {factor} does not divide the "
                              f"{rows} rows of the embedding")
        if embedding.padding_idx is not None or embedding.max_norm is not None:
            raise ValueError("SerializedEmbedding supports plain embeddings only")
        self.weight = embedding.weight  # the same Parameter: state_dict key unchanged
        self.num_embeddings, self.embedding_dim = rows, dim
        self.factor = factor
        self.split = rows // factor

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = None
        for i in range(self.factor):
            local = ids - i * self.split
            inside = (local >= 0) & (local < self.split)
            table = self.weight[i * self.split:(i + 1) * self.split]
            part = F.embedding(local.clamp(0, self.split - 1), table)
            part = part * inside.unsqueeze(-1).to(part.dtype)
            out = part if out is None else out + part
        return out

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, factor={self.factor}"


class SerializedLinear(nn.Module):
    """``nn.Linear`` whose matmul is serialized over ``factor`` slices of the outputs."""

    # DALLE.loss then keeps the masked full-vocabulary logits (no per-modality weight slices)
    full_vocabulary_only = True

    def __init__(self, linear: nn.Linear, factor: int, ops=None):
        super().__init__()
        out_features, in_features = linear.weight.shape
        if factor < 1 or out_features % factor:
            raise ConfigError(f"embedding_serialization_factor: {factor} does not divide the "
                              f"{out_features} outputs of the projection")
        self.weight = linear.weight
        self.bias = linear.bias
        self.in_features, self.out_features = in_features, out_features
        self.factor = factor
        self.ops = ops or CpuOps()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ops.serialized_matmul(x, self.weight.t(), self.factor)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, factor={self.factor}"


class _BlockedCodec(nn.Module):
    """The frozen codec with its ``encode`` run inside a pipeline block (the codec is not a
    submodule of the model, and ``encode`` is not ``forward``, so a module hook would miss it)."""

    def __init__(self, codec: nn.Module, name: str, ipu: int, ops):
        super().__init__()
        self.inner = codec
        self.block_name, self.ipu, self.ops = name, ipu, ops

    def encode(self, images):
        with self.ops.block(self.block_name, self.ipu):
            return self.inner.encode(images)

    def decode(self, codes):
        return self.inner.decode(codes)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)


def serialize(model: nn.Module, factor: int, ops=None) -> nn.Module:
    """Replace ``model.text_emb`` and ``model.to_logits`` by serialized versions (in place)."""
    if factor > 1:
        model.text_emb = SerializedEmbedding(model.text_emb, factor)
        model.to_logits = SerializedLinear(model.to_logits, factor, ops)
    return model


def _layer_checkpoint(ops):
    def hook(module, args, output):
        return ops.checkpoint(output)

    return hook


def annotate_pipeline(model: nn.Module, plan, ops=None) -> list:
    """Start each of ``plan.blocks`` on its module and checkpoint every transformer layer's
    output (when ``plan.recompute_checkpoints``). Returns the hook handles."""
    ops = ops or CpuOps()
    handles = []
    for block in plan.blocks:
        if block.module == "codec":
            codec = getattr(model, "codec", None)
            if codec is not None and not isinstance(codec, _BlockedCodec):
                model.set_codec(_BlockedCodec(codec, block.name, block.ipu, ops))
            continue
        module = model.get_submodule(block.module)
        started = ops.begin_block(module, block.name, block.ipu)
        if started is not None and started is not module:  # a wrapper (older PopTorch)
            parent, _, name = block.module.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, name, started)
    if plan.recompute_checkpoints:
        for layer in model.transformer.layers:
            handles.append(layer.register_forward_hook(_layer_checkpoint(ops)))
    return handles


def apply_plan(model: nn.Module, plan, ops=None) -> nn.Module:
    """All the transforms of ``plan`` (serialization first: blocks hook the new modules)."""
    ops = ops or CpuOps()
    serialize(model, plan.embedding_serialization_factor, ops)
    annotate_pipeline(model, plan, ops)
    return model
