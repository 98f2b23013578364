"""The IPU plan: everything the ``ipu`` backend decides before touching PopTorch.

Pure Python (attrs only, no torch), so it is tested on any machine and printed by
``minidalle plan``. :class:`IpuConfig` holds the IPU-only keys of ``[backend]`` when
``name = "ipu"``; :func:`build_plan` combines it with ``[model]`` and ``[training]`` into an
:class:`IpuPlan`: pipeline blocks and stages, serialization, precision, replication,
accumulation, memory proportions, data loading, and a memory estimate per IPU. Invalid
combinations raise :class:`~minidalle.errors.ConfigError` before anything runs.
"""
from __future__ import annotations

from typing import Any, Union

import attrs

from minidalle.config import FieldError, non_negative, one_of, positive
from minidalle.errors import ConfigError, DataError

#: In-processor memory of one Mk2 IPU (GC200, in an IPU-M2000 / Bow-2000), bytes.
IPU_MEMORY_BYTES = 900 * 10**6
#: PopTorch's documented default available-memory proportion.
DEFAULT_MATMUL_PROPORTION = 0.6
DATALOADER_MODES = ("sync", "async", "async_rebatched")


def _proportion(instance, attribute, value):
    """A float in (0, 1] or a non-empty list of them (one per IPU of a replica)."""
    items = value if isinstance(value, list) else [value]
    if isinstance(value, list) and not value:
        raise FieldError(f"{attribute.name}: expected a float in (0, 1] or a list of them, got []")
    for i, v in enumerate(items):
        where = f"{attribute.name}[{i}]" if isinstance(value, list) else attribute.name
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise FieldError(f"{where}: expected a float in (0, 1], got {v!r}")
        if not 0 < v <= 1:
            raise FieldError(f"{where}: expected a float in (0, 1], got {v!r}")


def _layer_list(instance, attribute, value):
    if value is None:
        return
    if not value:
        raise FieldError(f"{attribute.name}: expected a non-empty list of layer counts, got []")
    for i, v in enumerate(value):
        if v < 0:
            raise FieldError(f"{attribute.name}[{i}]: expected a number >= 0, got {v!r}")


@attrs.define
class IpuConfig:
    """The ``[backend]`` keys of ``name = "ipu"`` (see README "IPU (Graphcore)")."""

    # Model parallelism: IPUs per replica and transformer layers on each of them.
    ipus_per_replica: int = attrs.field(default=4, validator=positive)
    # None: layers spread evenly over IPUs 1..n-1 (IPU 0 keeps the codec and embeddings).
    layers_per_ipu: Union[list[int], None] = attrs.field(default=None, validator=_layer_list)
    # The IPU of the image/text embeddings (the codec is always on IPU 0).
    embedding_ipu: int = attrs.field(default=0, validator=non_negative)
    # The IPU of the output LayerNorm + projection; None: with the last transformer layers.
    output_ipu: Union[int, None] = attrs.field(default=None, validator=non_negative)
    # Split the text embedding and the logits projection into this many pieces.
    embedding_serialization_factor: int = attrs.field(default=1, validator=positive)
    # Share of tile memory for matmul temporaries: one float, or one per IPU of a replica.
    matmul_proportion: Any = attrs.field(default=DEFAULT_MATMUL_PROPORTION, validator=_proportion)
    # Precision.
    fp16: bool = False
    enable_half_partials: bool = False
    stochastic_rounding: bool = False
    half_first_order_momentum: bool = False
    automatic_loss_scaling: bool = False  # PopTorch's experimental ALS
    # Optimizer state: sharded across replicas (RTS) and/or kept in streaming memory.
    enable_rts: bool = False
    optimizer_state_offchip: bool = False
    # Mark each transformer layer's output as a recomputation checkpoint.
    recompute_checkpoints: bool = True
    # Where compiled executables are cached (also POPTORCH_CACHE_DIR); None: no cache.
    executable_cache_dir: Union[str, None] = None
    # poptorch.DataLoader mode and the worker batch size of "async_rebatched"
    # (None: max(gradient_accumulation // 4, batch_size), as in the recipe).
    dataloader_mode: str = attrs.field(default="async_rebatched", validator=one_of(*DATALOADER_MODES))
    rebatched_worker_size: Union[int, None] = attrs.field(default=None, validator=positive)
    # IPU requests must be a power of two; round up instead of failing.
    auto_round_num_ipus: bool = True
    # Run on the IPU Model (Poplar's CPU simulator) instead of hardware.
    ipu_model: bool = False
    # Compile for an offline Mk2 target and stop (no IPU attached).
    compile_only: bool = False
    # Random data generated on the device: measures compute without host I/O.
    synthetic_data: bool = False

    def __attrs_post_init__(self):
        # Checks between these keys alone, so `config show`/`run` name the file at load
        # time; the ones that need [model] or [training] are in build_plan.
        n = self.ipus_per_replica
        if self.layers_per_ipu is not None and len(self.layers_per_ipu) > n:
            raise FieldError(f"layers_per_ipu: {len(self.layers_per_ipu)} entries "
                             f"{self.layers_per_ipu} but backend.ipus_per_replica is {n}")
        for key in ("embedding_ipu", "output_ipu"):
            value = getattr(self, key)
            if value is not None and value >= n:
                raise FieldError(f"{key}: IPU {value} does not exist: "
                                 f"backend.ipus_per_replica is {n}")
        mp = self.matmul_proportion
        if isinstance(mp, list) and len(mp) not in (1, n):
            raise FieldError(f"matmul_proportion: {len(mp)} values but backend.ipus_per_replica "
                             f"is {n} (give one value, or one per IPU)")
        if self.compile_only and self.ipu_model:
            raise FieldError("compile_only: offline compilation cannot be combined with "
                             "backend.ipu_model")


# --------------------------------------------------------------------------- the plan


@attrs.frozen
class Block:
    """One ``poptorch.BeginBlock``: the module (attribute path in the model) that starts it."""

    module: str
    name: str
    ipu: int


@attrs.frozen
class Stage:
    """What one IPU of a replica holds, with its parameters and estimated memory."""

    ipu: int
    parts: tuple[str, ...]
    layers: tuple[int, ...]
    trainable_params: int
    frozen_params: int
    weight_bytes: int
    optimizer_bytes: int

    @property
    def params(self) -> int:
        return self.trainable_params + self.frozen_params

    @property
    def memory_bytes(self) -> int:
        return self.weight_bytes + self.optimizer_bytes

    @property
    def over_memory(self) -> bool:
        return self.memory_bytes > IPU_MEMORY_BYTES


@attrs.frozen
class IpuPlan:
    # topology
    ipus_per_replica: int
    replication_factor: int
    total_ipus: int
    requested_ipus: int  # what is asked of the IPU allocator (power of two when rounded)
    layers_per_ipu: tuple[int, ...]
    blocks: tuple[Block, ...]
    stages: tuple[Stage, ...]
    embedding_ipu: int
    output_ipu: int
    codec_on_device: bool
    recompute_checkpoints: bool
    # batching
    micro_batch_size: int
    gradient_accumulation: int
    device_iterations: int
    samples_per_step: int
    dataset_size: Union[int, None]
    steps_per_epoch: Union[int, None]
    # serialization
    embedding_serialization_factor: int
    text_rows: int
    logits_dim: int
    # precision and optimizer
    fp16: bool
    half_partials: bool
    stochastic_rounding: bool
    automatic_loss_scaling: bool
    loss_scaling: float
    optimizer: str
    lr: float
    accum_dtype: str
    first_order_momentum_dtype: str
    second_order_momentum_dtype: str
    enable_rts: bool
    optimizer_state_offchip: bool
    # execution
    available_memory_proportion: dict
    executable_cache_dir: Union[str, None]
    auto_round_num_ipus: bool
    ipu_model: bool
    compile_only: bool
    synthetic_data: bool
    seed: int
    # data loading
    dataloader_mode: str
    dataloader_workers: int
    rebatched_worker_size: Union[int, None]
    # what was checked, and what looks risky but is allowed
    checks: tuple[str, ...]
    warnings: tuple[str, ...]

    @property
    def pipelined(self) -> bool:
        return len({b.ipu for b in self.blocks}) > 1


# --------------------------------------------------------------------------- parameters


def parameter_counts(model, *, text_vocab: int, num_image_tokens: int, fmap_size: int) -> dict:
    """Trainable parameters of each part of the DALL-E network, from ``[model]`` alone.

    Follows the recipe's architecture (minidalle/model): unique padding ids
    in the text table, axial image positions, LayerScale, GEGLU feed-forward, biasless
    q/k/v. ``layer`` is one transformer layer (attention + feed-forward).
    """
    dim, seq = model.dim, model.text_seq_len
    inner = model.heads * model.dim_head
    norm = 2 * dim
    sandwich = norm if model.sandwich_norm else 0
    attn = norm + dim * 3 * inner + inner * dim + dim + sandwich + dim  # + LayerScale
    hidden = model.ff_mult * dim
    ff = norm + (dim * 2 * hidden + 2 * hidden) + (hidden * dim + dim) + sandwich + dim
    logits = text_vocab + seq + num_image_tokens
    return {
        "text_emb": (text_vocab + seq) * dim,
        "text_pos_emb": (seq + 1) * dim,
        "image_emb": num_image_tokens * dim,
        "image_pos_emb": 2 * fmap_size * dim,
        "layer": attn + ff,
        "to_logits": norm + dim * logits + logits,
    }


# --------------------------------------------------------------------------- building


def _fail(source: str, key: str, message: str):
    raise ConfigError(f"{source}: {key}: {message}")


def default_layers_per_ipu(depth: int, ipus: int) -> list[int]:
    """IPU 0 keeps the codec and embeddings; layers go evenly over the other IPUs."""
    if ipus == 1:
        return [depth]
    rest = ipus - 1
    return [0] + [depth // rest + (1 if i < depth % rest else 0) for i in range(rest)]


def padded_text_vocab(text_vocab: int, text_seq_len: int, num_image_tokens: int,
                      factor: int) -> Union[int, None]:
    """The smallest text vocabulary >= ``text_vocab`` whose text table and logits ``factor``
    divides (unused ids are harmless), or None when the image vocabulary rules it out."""
    if num_image_tokens % factor:
        return None
    return text_vocab + (-(text_vocab + text_seq_len)) % factor


def _power_of_two_ceil(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p


def build_plan(
    cfg,
    *,
    text_vocab: int,
    num_image_tokens: int,
    fmap_size: int,
    dataset_size: Union[int, None] = None,
    codec_params: int = 0,
    codec_on_device: Union[bool, None] = None,
    counts: Union[dict, None] = None,
) -> IpuPlan:
    """The plan for ``cfg`` (a :class:`~minidalle.config.Config` whose backend is ``ipu``;
    any other backend is planned with the IPU defaults).

    ``codec_params`` is the frozen codec's parameter count when it runs on IPU 0
    (``codec_on_device``: default, when a codec is configured and the dataset is not
    pre-computed codes). ``counts``: parameters per part as :func:`parameter_counts` gives
    them (``layers`` may list each layer's count), e.g. measured on the built model.
    Raises ConfigError (or DataError for ``dataset_size``).
    """
    src = cfg.source or "<config>"
    # another backend: plan one IPU per replica with the IPU defaults
    ipu = (cfg.backend.params if isinstance(cfg.backend.params, IpuConfig)
           else IpuConfig(ipus_per_replica=1))
    model, tr = cfg.model, cfg.training
    checks: list[str] = []
    warnings: list[str] = []
    n_ipus = ipu.ipus_per_replica
    if codec_on_device is None:
        codec_on_device = cfg.codec is not None and not (
            cfg.dataset is not None and cfg.dataset.name == "codes")

    layers, output_ipu, blocks, used = _placement(src, ipu, model.depth, codec_on_device,
                                                  checks, warnings)
    replicas = tr.replication_factor
    samples_per_step, steps_per_epoch = _batching(src, tr, len(used), dataset_size, checks)
    text_rows, logits_dim, factor = _serialization(src, ipu, model, text_vocab, num_image_tokens,
                                                   checks)
    proportion = _memory_proportion(ipu)
    total, requested = _replication(src, ipu, replicas, warnings)
    # --- precision and optimizer state
    if ipu.fp16 and tr.loss_scaling == 1 and not ipu.automatic_loss_scaling:
        warnings.append("fp16 with training.loss_scaling = 1: small gradients may underflow")
    dtype = "float16" if ipu.fp16 else "float32"
    first_dtype = "float16" if ipu.half_first_order_momentum else "float32"
    rebatched = _rebatched_size(src, ipu, tr, samples_per_step)
    if counts is None:
        counts = parameter_counts(model, text_vocab=text_vocab,
                                  num_image_tokens=num_image_tokens, fmap_size=fmap_size)
    stages = _memory_stages(ipu, tr, model.depth, counts, layers, output_ipu, codec_on_device,
                            codec_params, checks, warnings)
    e = ipu.embedding_ipu

    return IpuPlan(
        ipus_per_replica=n_ipus, replication_factor=replicas, total_ipus=total,
        requested_ipus=requested if ipu.auto_round_num_ipus else total,
        layers_per_ipu=tuple(layers), blocks=tuple(blocks), stages=tuple(stages),
        embedding_ipu=e, output_ipu=output_ipu, codec_on_device=codec_on_device,
        recompute_checkpoints=ipu.recompute_checkpoints,
        micro_batch_size=tr.batch_size, gradient_accumulation=tr.gradient_accumulation,
        device_iterations=tr.device_iterations, samples_per_step=samples_per_step,
        dataset_size=dataset_size, steps_per_epoch=steps_per_epoch,
        embedding_serialization_factor=factor, text_rows=text_rows, logits_dim=logits_dim,
        fp16=ipu.fp16, half_partials=ipu.enable_half_partials,
        stochastic_rounding=ipu.stochastic_rounding,
        automatic_loss_scaling=ipu.automatic_loss_scaling, loss_scaling=tr.loss_scaling,
        optimizer=tr.optimizer, lr=tr.lr, accum_dtype=dtype,
        first_order_momentum_dtype=first_dtype, second_order_momentum_dtype="float32",
        enable_rts=ipu.enable_rts, optimizer_state_offchip=ipu.optimizer_state_offchip,
        available_memory_proportion=proportion, executable_cache_dir=ipu.executable_cache_dir,
        auto_round_num_ipus=ipu.auto_round_num_ipus, ipu_model=ipu.ipu_model,
        compile_only=ipu.compile_only, synthetic_data=ipu.synthetic_data, seed=cfg.run.seed,
        dataloader_mode=ipu.dataloader_mode, dataloader_workers=tr.dataloader_workers,
        rebatched_worker_size=rebatched, checks=tuple(checks), warnings=tuple(warnings),
    )


# --------------------------------------------------------------------------- build_plan's steps


def _placement(src, ipu: IpuConfig, depth: int, codec_on_device: bool, checks, warnings):
    """Pipeline placement: (layers per IPU, the output IPU, the blocks, the IPUs used)."""
    n_ipus = ipu.ipus_per_replica
    if ipu.layers_per_ipu is None:
        layers = default_layers_per_ipu(depth, n_ipus)
    else:
        layers = list(ipu.layers_per_ipu)
        if sum(layers) != depth:
            _fail(src, "backend.layers_per_ipu",
                  f"{layers} places {sum(layers)} layers but model.depth is {depth}")
        layers += [0] * (n_ipus - len(layers))
    checks.append(f"layers_per_ipu {layers} sums to model.depth {depth}")
    last_layer_ipu = max(i for i, n in enumerate(layers) if n > 0)
    output_ipu = ipu.output_ipu if ipu.output_ipu is not None else last_layer_ipu

    blocks: list[Block] = []
    if codec_on_device:
        blocks.append(Block("codec", "codec", 0))
    # The model embeds text first (text_emb, text_pos_emb), then the image; a block
    # starts at the first module called and runs until the next block starts.
    blocks.append(Block("text_emb", "embeddings", ipu.embedding_ipu))
    first = 0
    for i, n in enumerate(layers):
        if n:
            blocks.append(Block(f"transformer.layers.{first}", f"transformer_{first}", i))
        first += n
    if ipu.output_ipu is not None:
        blocks.append(Block("norm_out", "output", ipu.output_ipu))  # then to_logits
    used = {b.ipu for b in blocks} | {output_ipu}
    for i in range(n_ipus):
        if i not in used:
            warnings.append(f"IPU {i} of each replica has nothing placed on it")
    checks.append("every block is placed on an IPU of the replica")
    return layers, output_ipu, blocks, used


def _batching(src, tr, n_pipeline: int, dataset_size, checks):
    """(samples per step, steps per epoch or None); the pipeline must be filled."""
    replicas = tr.replication_factor
    samples_per_step = tr.batch_size * tr.gradient_accumulation * replicas * tr.device_iterations
    if n_pipeline > 1 and tr.gradient_accumulation < 2 * n_pipeline - 1:
        _fail(src, "training.gradient_accumulation",
              f"{tr.gradient_accumulation} is too small for a pipeline over {n_pipeline} IPUs: "
              f"it must be at least {2 * n_pipeline - 1} (2 x IPUs - 1 pipeline stages)")
    if n_pipeline > 1:
        checks.append(f"gradient_accumulation {tr.gradient_accumulation} fills the "
                      f"{2 * n_pipeline - 1}-stage training pipeline")
    steps_per_epoch = None
    if dataset_size is not None:
        if dataset_size < samples_per_step:
            raise DataError(
                f"{src}: the dataset has {dataset_size:,} samples, fewer than one step's "
                f"{samples_per_step:,} (batch_size {tr.batch_size} x gradient_accumulation "
                f"{tr.gradient_accumulation} x replication_factor {replicas} x "
                f"device_iterations {tr.device_iterations})")
        steps_per_epoch = dataset_size // samples_per_step  # poptorch.DataLoader drops the rest
        checks.append(f"dataset of {dataset_size:,} samples holds {steps_per_epoch} steps")
    return samples_per_step, steps_per_epoch


def _serialization(src, ipu: IpuConfig, model, text_vocab: int, num_image_tokens: int, checks):
    """(text embedding rows, logits width, serialization factor); the factor must divide both."""
    text_rows = text_vocab + model.text_seq_len
    logits_dim = text_rows + num_image_tokens
    factor = ipu.embedding_serialization_factor
    if factor > 1 and (text_rows % factor or logits_dim % factor):
        what = (f"the {text_rows} rows of the text embedding (text vocabulary {text_vocab} + "
                f"text_seq_len {model.text_seq_len})" if text_rows % factor else
                f"the {logits_dim} output logits ({text_rows} text + {num_image_tokens} image tokens)")
        padded = padded_text_vocab(text_vocab, model.text_seq_len, num_image_tokens, factor)
        hint = (f"; pad the vocabulary with model.text_vocab = {padded}" if padded else "")
        _fail(src, "backend.embedding_serialization_factor", f"{factor} does not divide {what}{hint}")
        checks.append(f"embedding_serialization_factor {factor} divides the text embedding "
                      f"({text_rows}) and the logits ({logits_dim})")
    return text_rows, logits_dim, factor


def _memory_proportion(ipu: IpuConfig) -> dict[str, float]:
    mp = ipu.matmul_proportion
    if isinstance(mp, list):
        mp = mp * ipu.ipus_per_replica if len(mp) == 1 else mp  # length checked by IpuConfig
    else:
        mp = [mp] * ipu.ipus_per_replica
    return {f"IPU{i}": float(v) for i, v in enumerate(mp)}


def _replication(src, ipu: IpuConfig, replicas: int, warnings) -> tuple[int, int]:
    """(IPUs used, IPUs reserved: the next power of two)."""
    if ipu.enable_rts and replicas < 2:
        _fail(src, "backend.enable_rts",
              "replicated tensor sharding needs training.replication_factor > 1, "
              f"got {replicas}")
    total = ipu.ipus_per_replica * replicas
    requested = _power_of_two_ceil(total)
    if requested != total:
        if not ipu.auto_round_num_ipus:
            _fail(src, "backend.auto_round_num_ipus",
                  f"{ipu.ipus_per_replica} IPUs x {replicas} replicas = {total} IPUs is not a power of two; "
                  "set backend.auto_round_num_ipus = true to reserve "
                  f"{requested}")
        warnings.append(f"{total} IPUs is not a power of two: {requested} are reserved, "
                        f"{requested - total} stay idle")
    if total > 64:
        warnings.append(f"{total} IPUs is more than one IPU-POD64: launch with PopRun "
                        "across hosts (see README)")
    return total, requested


def _rebatched_size(src, ipu: IpuConfig, tr, samples_per_step: int):
    if ipu.dataloader_mode != "async_rebatched":
        return None
    rebatched = ipu.rebatched_worker_size or max(tr.gradient_accumulation // 4, tr.batch_size)
    if rebatched > samples_per_step:
        _fail(src, "backend.rebatched_worker_size",
              f"{rebatched} is larger than one step's {samples_per_step} samples")
    return rebatched


def _memory_stages(ipu: IpuConfig, tr, depth: int, counts: dict, layers, output_ipu: int,
                   codec_on_device: bool, codec_params: int, checks, warnings) -> list[Stage]:
    """What each IPU holds: parts, parameters, weight and optimizer-state bytes."""
    n_ipus, replicas = ipu.ipus_per_replica, tr.replication_factor
    layer_params = list(counts.get("layers") or [counts["layer"]] * depth)
    w_bytes = 2 if ipu.fp16 else 4
    accum_bytes = (2 if ipu.fp16 else 4) if tr.gradient_accumulation > 1 else 0
    moment_bytes = (2 if ipu.half_first_order_momentum else 4) + 4  # Adam m and v
    if ipu.optimizer_state_offchip:
        moment_bytes = 0
    elif ipu.enable_rts:
        moment_bytes = moment_bytes / replicas

    parts: dict[int, list[str]] = {i: [] for i in range(n_ipus)}
    trainable = dict.fromkeys(range(n_ipus), 0)
    frozen = dict.fromkeys(range(n_ipus), 0)
    if codec_on_device:
        parts[0].append("codec")
        frozen[0] += codec_params
    e = ipu.embedding_ipu
    parts[e].append("embeddings")
    trainable[e] += (counts["text_emb"] + counts["text_pos_emb"] + counts["image_emb"]
                     + counts["image_pos_emb"])
    layer_ids: dict[int, tuple[int, ...]] = {}
    first = 0
    for i, n in enumerate(layers):
        layer_ids[i] = tuple(range(first, first + n))
        if n:
            parts[i].append(f"layers {first}-{first + n - 1}" if n > 1 else f"layer {first}")
            trainable[i] += sum(layer_params[first:first + n])
        first += n
    parts[output_ipu].append("output")
    trainable[output_ipu] += counts["to_logits"]
    stages = []
    for i in range(n_ipus):
        stage = Stage(
            ipu=i, parts=tuple(parts[i]), layers=layer_ids[i],
            trainable_params=trainable[i], frozen_params=frozen[i],
            # the model keeps its frozen codec in fp32
            weight_bytes=trainable[i] * w_bytes + frozen[i] * 4,
            optimizer_bytes=int(trainable[i] * (accum_bytes + moment_bytes)),
        )
        stages.append(stage)
        if stage.over_memory:
            warnings.append(
                f"IPU {i}: estimated {stage.memory_bytes / 1e6:,.0f} MB of weights and "
                f"optimizer state exceeds the {IPU_MEMORY_BYTES / 1e6:,.0f} MB of a Mk2 IPU")
    checks.append(f"weights + optimizer state fit in {IPU_MEMORY_BYTES // 10**6} MB per IPU"
                  if not any(s.over_memory for s in stages)
                  else "weights + optimizer state per IPU: see warnings")
    return stages
