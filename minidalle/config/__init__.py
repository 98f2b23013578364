"""TOML configs: read with tomli, merged through ``extends``, structured into attrs classes.

A config file has fixed sections (``[run]``, ``[model]``, ``[training]``, ...) and component
sections (``[tokenizer]``, ``[codec]``, ``[dataset]``, ``[backend]``, ``[reranker]``) whose
``name`` picks a registered component and whose other keys are validated against that
component's own attrs config class. ``[attention.NAME]`` holds the parameters of attention
``NAME`` used in ``model.attn_types``. Other sections belong to a stage or command, which
registers the attrs class that validates it (``register(..., sections={"NAME": Class})``);
they are kept as plain tables in ``Config.extra`` and read with :func:`read_section`.

The registry is passed in: this package imports nothing from ``minidalle.plugin``.

Every error is a :class:`ConfigError` naming the file and the dotted key.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import attrs
import cattrs
import tomli
import tomli_w

from minidalle.errors import ConfigError, MinidalleError

COMPONENT_SECTIONS = ("tokenizer", "codec", "dataset", "backend", "reranker")
OVERRIDE_ORIGIN = "--set"


class FieldError(ValueError):
    """Raised by validators; ``structure_section`` prefixes the dotted path."""


def one_of(*choices):
    """attrs validator: the value must be one of ``choices``."""

    def check(instance, attribute, value):
        if value not in choices:
            raise FieldError(
                f"{attribute.name}: expected one of {', '.join(map(repr, choices))}, got {value!r}"
            )

    return check


def _check_finite(attribute, value) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise FieldError(f"{attribute.name}: expected a finite number, got {value!r}")


def positive(instance, attribute, value):
    _check_finite(attribute, value)
    if value is not None and value <= 0:
        raise FieldError(f"{attribute.name}: expected a positive number, got {value!r}")


def non_negative(instance, attribute, value):
    _check_finite(attribute, value)
    if value is not None and value < 0:
        raise FieldError(f"{attribute.name}: expected a number >= 0, got {value!r}")


def _seed_range(attribute, value) -> None:
    if not 0 <= value < 2**40:
        raise FieldError(f"{attribute.name}: expected an integer from 0 to 2**40 - 1, got {value!r}")


def betas(instance, attribute, value):
    """Adam's (beta1, beta2): two numbers in [0, 1)."""
    if len(value) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in value):
        raise FieldError(f"{attribute.name}: expected two numbers in [0, 1), e.g. [0.9, 0.999], "
                         f"got {value!r}")
def unit_interval(instance, attribute, value):
    if not 0 <= value < 1:
        raise FieldError(f"{attribute.name}: expected a number in [0, 1), got {value!r}")


# --------------------------------------------------------------------------- sections


@attrs.define
class RunConfig:
    name: str = "run"
    out_dir: str = "output/run"  # relative paths are relative to the working directory
    # Data order and RNG seeds are derived from it (seed * 1_000_003 + epoch fits in 64 bits).
    seed: int = attrs.field(default=42, validator=lambda i, a, v: _seed_range(a, v))
    # Stages `minidalle run` executes in order (see minidalle/recipes/stages.py).
    stages: list[str] = attrs.field(factory=lambda: ["transformer"])


@attrs.define
class ModelConfig:
    dim: int = attrs.field(default=512, validator=positive)
    depth: int = attrs.field(default=16, validator=positive)
    heads: int = attrs.field(default=16, validator=positive)
    dim_head: int = attrs.field(default=64, validator=positive)
    text_seq_len: int = attrs.field(default=80, validator=positive)
    # None: taken from the tokenizer / codec.
    text_vocab: Union[int, None] = None
    attn_types: list[str] = attrs.field(factory=lambda: ["full"])
    loss_img_weight: float = attrs.field(default=7.0, validator=non_negative)
    # With a factorised codec (colour x outline codes): the weight of each factor's cross
    # entropy in the image loss, in the codec's order. None = the joint cross entropy (which
    # is their sum with weights 1). A colour weight above 1 makes the rare positions where the
    # caption decides the colour count for more (RESULTS "robust quickstart").
    image_factor_weights: Union[list[float], None] = None
    ff_mult: int = attrs.field(default=4, validator=positive)
    attn_dropout: float = attrs.field(default=0.0, validator=non_negative)
    ff_dropout: float = attrs.field(default=0.0, validator=non_negative)
    sandwich_norm: bool = False
    byteio: bool = False


@attrs.define
class TrainingConfig:
    epochs: int = attrs.field(default=1, validator=positive)
    max_steps: Union[int, None] = attrs.field(default=None, validator=positive)
    batch_size: int = attrs.field(default=1, validator=positive)  # micro-batch
    gradient_accumulation: int = attrs.field(default=1, validator=positive)
    device_iterations: int = attrs.field(default=1, validator=positive)
    replication_factor: int = attrs.field(default=1, validator=positive)
    optimizer: str = attrs.field(default="adamw", validator=one_of("adam", "adamw"))
    lr: float = attrs.field(default=3e-4, validator=positive)
    betas: list[float] = attrs.field(factory=lambda: [0.9, 0.999], validator=betas)
    eps: float = attrs.field(default=1e-8, validator=positive)
    weight_decay: float = attrs.field(default=0.0, validator=non_negative)
    lr_scheduler: str = attrs.field(
        default="none", validator=one_of("none", "multi_step", "reduce_on_plateau", "cosine")
    )
    lr_milestones: list[int] = attrs.field(factory=list)  # multi_step, in optimizer steps
    lr_gamma: float = attrs.field(default=0.5, validator=positive)  # multi_step and plateau factor
    lr_patience: int = attrs.field(default=10, validator=non_negative)  # reduce_on_plateau
    min_lr: float = attrs.field(default=0.0, validator=non_negative)
    warmup_steps: int = attrs.field(default=0, validator=non_negative)
    loss_scaling: float = attrs.field(default=1.0, validator=positive)
    max_grad_norm: Union[float, None] = attrs.field(default=None, validator=positive)
    # Steps in a row with a non-finite loss or gradient that stop the run (fp16 overflow
    # steps skipped by loss scaling do not count).
    max_bad_steps: int = attrs.field(default=1, validator=positive)
    truncate_captions: bool = True
    dataloader_workers: int = attrs.field(default=0, validator=non_negative)
    checkpoint_every: Union[int, None] = attrs.field(default=None, validator=positive)
    keep_checkpoints: int = attrs.field(default=3, validator=positive)
    log_every: int = attrs.field(default=1, validator=positive)
    val_fraction: float = attrs.field(default=0.0, validator=non_negative)
    # Validation loss every N steps; None: at the end of each epoch (only with val_fraction > 0).
    val_every: Union[int, None] = attrs.field(default=None, validator=positive)
    tensorboard: bool = False
    wandb: bool = False
    # A preview grid every N steps (samples/step-NNNNNNNN.png): one cached sampling pass
    # over sample_prompts (default: a few validation captions). None: no previews.
    sample_every: Union[int, None] = attrs.field(default=None, validator=positive)
    sample_prompts: list[str] = attrs.field(factory=list)
    # Share of training captions replaced by the null caption (all padding), so that the
    # model also learns p(image) and sampling can use classifier-free guidance.
    null_caption_prob: float = attrs.field(default=0.0, validator=unit_interval)


@attrs.define
class GenerateConfig:
    filter_thres: float = attrs.field(default=0.5, validator=non_negative)
    top_p: Union[float, None] = attrs.field(default=None, validator=positive)
    temperature: float = attrs.field(default=1.0, validator=positive)
    num_images: int = attrs.field(default=4, validator=positive)
    batch_size: int = attrs.field(default=8, validator=positive)
    prime_fraction: float = attrs.field(default=0.4375, validator=non_negative)
    use_cache: bool = True
    # auto | fp32 | bf16 | bf16-weights: see minidalle.inference.decode.generation_precision
    precision: str = attrs.field(default="fp32", validator=one_of("auto", "fp32", "bf16", "bf16-weights"))
    prompts: list[str] = attrs.field(factory=list)
    # Classifier-free guidance: logits uncond + cond_scale * (cond - uncond); 1 = off. Needs a
    # checkpoint trained with training.null_caption_prob > 0.
    cond_scale: float = attrs.field(default=1.0, validator=non_negative)
    # Draw `candidates` images per prompt, keep the `keep` best by reranker `rerank`
    # ("likelihood", "clip" or a plugin's). None: candidates = num_images, keep all.
    candidates: Union[int, None] = attrs.field(default=None, validator=positive)
    keep: Union[int, None] = attrs.field(default=None, validator=positive)
    rerank: Union[str, None] = None


@attrs.define
class ComponentSpec:
    """A component section: the registered ``name`` and its validated parameters."""

    name: str
    params: Any = None  # instance of the component's config class, or None


@attrs.define
class Config:
    run: RunConfig = attrs.field(factory=RunConfig)
    model: ModelConfig = attrs.field(factory=ModelConfig)
    training: TrainingConfig = attrs.field(factory=TrainingConfig)
    generate: GenerateConfig = attrs.field(factory=GenerateConfig)
    tokenizer: Union[ComponentSpec, None] = None
    codec: Union[ComponentSpec, None] = None
    dataset: Union[ComponentSpec, None] = None
    backend: ComponentSpec = attrs.field(factory=lambda: ComponentSpec("cpu"))
    reranker: Union[ComponentSpec, None] = None
    # attention name -> its validated parameters (None when it takes none)
    attention: dict[str, Any] = attrs.field(factory=dict)
    # sections owned by stages and commands (e.g. [codec_training]); kept as plain tables
    # and validated by their owner with read_section()
    extra: dict[str, dict] = attrs.field(factory=dict)
    source: str = ""  # the file it came from, for messages
    # the registry it was validated against: what builds its components and model
    registry: Any = attrs.field(default=None, eq=False, repr=False)

# --------------------------------------------------------------------------- converter


def _type_name(tp) -> str:
    return {int: "an integer", float: "a float", bool: "a boolean", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _got(value) -> str:
    return f"{value!r}" if not isinstance(value, str) else f'"{value}"'


def _strict(tp):
    def structure(value, _):
        ok = isinstance(value, tp) and not (tp is not bool and isinstance(value, bool))
        if tp is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if not ok:
            raise FieldError(f"expected {_type_name(tp)}, got {_got(value)}")
        return value

    return structure


def _list_hook(tp, converter):
    (item_type,) = get_args(tp) or (Any,)

    def structure(value, _):
        if not isinstance(value, list):
            raise FieldError(f"expected a list, got {_got(value)}")
        out = []
        for i, item in enumerate(value):
            try:
                out.append(converter.structure(item, item_type))
            except FieldError as exc:
                raise FieldError(f"[{i}]: {exc}") from None
        return out

    return structure


def _make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=True)
    for tp in (int, float, bool, str):
        conv.register_structure_hook(tp, _strict(tp))
    conv.register_structure_hook_factory(
        lambda tp: get_origin(tp) is list, lambda tp: _list_hook(tp, conv)
    )
    return conv


converter = _make_converter()


def _flatten_errors(exc: BaseException, path: str) -> list[str]:
    """Turn cattrs' exception groups into ``dotted.path: message`` lines."""
    if isinstance(exc, cattrs.errors.ForbiddenExtraKeysError):
        return [f"{path}{'.' if path else ''}{k}: unknown key" for k in sorted(exc.extra_fields)]
    if isinstance(exc, BaseExceptionGroup):
        lines = []
        for sub in exc.exceptions:
            note = next(iter(getattr(sub, "__notes__", []) or []), "")
            name = getattr(note, "name", None)
            sub_path = f"{path}.{name}" if path and name else (name or path)
            lines.extend(_flatten_errors(sub, sub_path))
        return lines
    if isinstance(exc, KeyError) and exc.args:
        return [f"{path}: missing required key"]
    msg = str(exc)
    if isinstance(exc, FieldError) and msg.startswith("["):  # list item
        return [f"{path}{msg}"]
    if isinstance(exc, FieldError) and not msg.startswith("expected"):  # from a validator
        return [f"{path}.{msg}" if path else msg]
    return [f"{path}: {msg}"] if path else [msg]


def structure_section(params: dict, cls, where: str = ""):
    """Validate the table ``params`` against attrs class ``cls``; errors name ``where.key``."""
    if not isinstance(params, dict):
        raise ConfigError(f"{where}: expected a table, got {_got(params)}")
    try:
        return converter.structure(params, cls)
    except FieldError as exc:  # from a validator: "field: message"
        raise ConfigError(f"{where}.{exc}" if where else str(exc)) from None
    except (cattrs.BaseValidationError, cattrs.errors.ForbiddenExtraKeysError) as exc:
        raise ConfigError(_flatten_errors(exc, where)[0]) from None
    except TypeError as exc:  # e.g. missing required argument
        raise ConfigError(f"{where}: {exc}") from None


def unstructure(obj) -> Any:
    return converter.unstructure(obj)


# --------------------------------------------------------------------------- files


def _read_toml(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); TOML files are UTF-8") from None
    try:
        return tomli.loads(text)
    except tomli.TOMLDecodeError as exc:
        # tomli's message ends with "(at line L, column C)"
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None


def deep_merge(base: dict, over: dict) -> dict:
    """``over`` wins; tables merge key by key, everything else is replaced."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _leaf_origins(data: dict, origin: str, prefix: str = "") -> dict[str, str]:
    out = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_leaf_origins(value, origin, dotted + "."))
        out[dotted] = origin
    return out


def _load_chain(path: Path, seen: tuple[Path, ...]) -> tuple[dict, dict[str, str]]:
    path = path.resolve() if path.exists() else path
    if path in seen:
        chain = " -> ".join(str(p) for p in (*seen, path))
        raise ConfigError(f"{seen[-1]}: extends: cycle: {chain}")
    data = _read_toml(path)
    parent_ref = data.pop("extends", None)
    origins: dict[str, str] = {}
    if parent_ref is not None:
        if not isinstance(parent_ref, str):
            raise ConfigError(f"{path}: extends: expected a string, got {_got(parent_ref)}")
        parent_path = path.parent / parent_ref
        if not parent_path.exists():
            raise ConfigError(f"{path}: extends: file not found: {parent_path}")
        parent, origins = _load_chain(parent_path, (*seen, path))
        data = deep_merge(parent, data)
    origins.update(_leaf_origins(_read_toml(path), str(path)))
    origins.pop("extends", None)
    return data, origins


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b=value``: value is read as TOML (numbers, booleans, lists), else as a string."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. training.lr=1e-4")
    try:
        value = tomli.loads(f"v = {raw.strip()}")["v"]
    except tomli.TOMLDecodeError:
        value = raw.strip()
    return key.split("."), value


def apply_overrides(data: dict, overrides, origins: dict[str, str]) -> dict:
    data = copy.deepcopy(data)
    for item in overrides or ():
        keys, value = parse_override(item)
        if not all(k.strip() for k in keys):
            raise ConfigError(f"--set {item!r}: empty part in the dotted key {'.'.join(keys)!r}")
        node = data
        for i, key in enumerate(keys[:-1]):
            if key not in node:  # a table --set creates is --set's, in error messages too
                origins.setdefault(".".join(keys[: i + 1]), OVERRIDE_ORIGIN)
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item}: {'.'.join(keys[: i + 1])} is not a table")
            node = child
        node[keys[-1]] = value
        origins[".".join(keys)] = OVERRIDE_ORIGIN
    return data


def load_raw(path, overrides=()) -> tuple[dict, dict[str, str]]:
    """The merged table of ``path`` (with its ``extends`` chain) and ``--set`` overrides,
    plus the file each dotted key came from."""
    data, origins = _load_chain(Path(path), ())
    data = apply_overrides(data, overrides, origins)
    return data, origins


def _origin(origins: dict[str, str], dotted: str, default: str) -> str:
    parts = dotted.split(".")
    while parts:
        key = ".".join(parts)
        if key in origins:
            return origins[key]
        parts.pop()
    return default


def _with_origin(exc: ConfigError, origins: dict, default: str) -> ConfigError:
    msg = str(exc)
    dotted = msg.split(":", 1)[0].split("[", 1)[0]
    return ConfigError(f"{_origin(origins, dotted, default)}: {msg}")


def config_from_dict(data: dict, source: str = "<config>", origins: dict | None = None, registry=None) -> Config:
    """Validate a merged table into a :class:`Config` (component sections included).

    ``registry`` (:class:`minidalle.plugin.registry.Registry`, required) knows the
    components and the sections that stages and commands own."""
    if registry is None:
        raise TypeError("config_from_dict needs the registry "
                        "(minidalle.api.config_from_dict looks up the default one)")
    origins = origins or {}
    data = copy.deepcopy(data)
    owned = tuple(registry.sections)
    known = {f.name for f in attrs.fields(Config)} - {"extra", "source", "attention", "registry"}
    known |= {"attention", *owned}
    try:
        for key in data:
            if key not in known:
                raise ConfigError(f"{key}: unknown section (known: {', '.join(sorted(known))})")
        kwargs: dict[str, Any] = {"source": source, "registry": registry}
        for key, cls in (("run", RunConfig), ("model", ModelConfig), ("training", TrainingConfig),
                         ("generate", GenerateConfig)):
            kwargs[key] = structure_section(data.get(key, {}), cls, key)
        for kind in COMPONENT_SECTIONS:
            table = data.get(kind, {"name": "cpu"} if kind == "backend" else None)
            if table is None:
                continue
            if not isinstance(table, dict):
                raise ConfigError(f"{kind}: expected a table, got {_got(table)}")
            table = dict(table)
            name = table.pop("name", None)
            if not isinstance(name, str):
                raise ConfigError(f"{kind}.name: expected the name of a registered {kind}"
                                  f" (see `minidalle list {kind}`)")
            component = _get(registry, kind, name, f"{kind}.name")
            kwargs[kind] = ComponentSpec(name, component.make_config(table, where=kind))
        attention_tables = data.get("attention", {})
        if not isinstance(attention_tables, dict):
            raise ConfigError(f"attention: expected a table of attention names")
        attention = {}
        for i, name in enumerate(kwargs["model"].attn_types):
            component = _get(registry, "attention", name, f"model.attn_types[{i}]")
            attention[name] = component.make_config(attention_tables.get(name, {}), where=f"attention.{name}")
        for name in attention_tables:
            if name not in attention:
                raise ConfigError(f"attention.{name}: not used in model.attn_types")
        kwargs["attention"] = attention
        kwargs["extra"] = {k: data[k] for k in owned if k in data}
        return Config(**kwargs)
    except ConfigError as exc:
        raise _with_origin(exc, origins, source) from None
    except MinidalleError as exc:  # unknown / unavailable component
        raise ConfigError(f"{source}: {exc}") from None


def _get(registry, kind, name, where):
    from minidalle.errors import UnknownComponentError

    try:
        return registry.get(kind, name)
    except UnknownComponentError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def load_config(path, overrides=(), registry=None) -> Config:
    """Read, merge and validate a TOML config; ``registry`` is required (see
    :func:`config_from_dict`)."""
    data, origins = load_raw(path, overrides)
    return config_from_dict(data, str(path), origins, registry)


def read_section(cfg: Config, name: str, cls):
    """The validated ``[name]`` table of ``cfg`` (``cls`` defaults when absent); an error
    names the config file and the dotted key."""
    try:
        return structure_section(cfg.extra.get(name, {}), cls, name)
    except ConfigError as exc:
        raise ConfigError(f"{cfg.source}: {exc}") from None


def config_to_dict(cfg: Config) -> dict:
    """The resolved config as a plain table (what `config show` prints, what checkpoints keep)."""
    out: dict[str, Any] = {}
    for key in ("run", "model", "training", "generate"):
        out[key] = unstructure(getattr(cfg, key))
    for kind in COMPONENT_SECTIONS:
        spec = getattr(cfg, kind)
        if spec is not None:
            params = unstructure(spec.params) if spec.params is not None else {}
            out[kind] = {"name": spec.name, **params}
    attention = {n: unstructure(p) for n, p in cfg.attention.items() if p is not None}
    if attention:
        out["attention"] = attention
    out.update(copy.deepcopy(cfg.extra))
    return _drop_none(out)


def _drop_none(value):
    # TOML has no null: a None value means "the default", so it is left out.
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def to_toml(cfg: Config) -> str:
    return tomli_w.dumps(config_to_dict(cfg))
