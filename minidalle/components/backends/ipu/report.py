"""The IPU plan as ``minidalle plan`` shows it: :func:`render` (the text report) and
:func:`plan_dict` (``--json``). Plain Python: no PopTorch, no torch."""
from __future__ import annotations

from minidalle.components.backends.ipu.plan import IPU_MEMORY_BYTES

MACHINES = {4: "one IPU-M2000", 16: "an IPU-POD16", 64: "an IPU-POD64", 256: "an IPU-POD256"}


def _mb(n: float) -> str:
    return f"{n / 1e6:,.0f}"


def _component(spec) -> str:
    return spec.name if spec is not None else "-"


def plan_dict(cfg, plan, sizes) -> dict:
    import attrs

    out = attrs.asdict(plan, recurse=True)
    for stage, obj in zip(out["stages"], plan.stages):
        stage["memory_bytes"] = obj.memory_bytes
        stage["over_memory"] = obj.over_memory
    out["components"] = {k: _component(getattr(cfg, k)) for k in
                         ("tokenizer", "codec", "dataset", "backend")}
    out["sizes"] = sizes
    return out


def render(cfg, plan, sizes, notes) -> str:
    lines = [f"Config: {cfg.source}"]
    vocab, tokens, fmap = sizes["text_vocab"], sizes["num_image_tokens"], sizes["fmap_size"]
    lines.append(
        f"Components: tokenizer {_component(cfg.tokenizer)} ({vocab:,} ids), codec "
        f"{_component(cfg.codec)} ({tokens:,} codes, {fmap}x{fmap}), dataset "
        f"{_component(cfg.dataset)}, backend {cfg.backend.name}, attention "
        f"{', '.join(dict.fromkeys(cfg.model.attn_types))}")
    m = cfg.model
    lines.append(f"Model: dim {m.dim}, depth {m.depth}, heads {m.heads} x {m.dim_head}, "
                 f"text {m.text_seq_len} + image {fmap * fmap} tokens")
    for note in notes:
        lines.append(f"  note: {note}")
    total = plan.total_ipus
    where = f" ({MACHINES[total]})" if total in MACHINES else ""
    lines.append(f"IPUs: {plan.replication_factor} replica(s) x {plan.ipus_per_replica} IPU(s) = "
                 f"{total} IPU(s){where}"
                 + (f", {plan.requested_ipus} reserved" if plan.requested_ipus != total else ""))
    lines.append(
        f"Samples per step: {plan.samples_per_step:,} = batch_size {plan.micro_batch_size} x "
        f"gradient_accumulation {plan.gradient_accumulation} x replication_factor "
        f"{plan.replication_factor} x device_iterations {plan.device_iterations}")
    if plan.steps_per_epoch is not None:
        lines.append(f"Steps per epoch: {plan.steps_per_epoch:,} ({plan.dataset_size:,} samples"
                     f"; {cfg.training.epochs} epochs = "
                     f"{plan.steps_per_epoch * cfg.training.epochs:,} steps)")
    else:
        lines.append("Steps per epoch: unknown (pass --dataset-size N)")
    if cfg.backend.name != "ipu":
        lines.append(f"Backend {cfg.backend.name!r} is not the IPU: planned on one IPU per "
                     "replica with the IPU defaults (set [backend] name = \"ipu\" and its keys "
                     "to plan a pipeline)")
    prec = "fp16" if plan.fp16 else "fp32"
    extras = [n for n, on in (("half partials", plan.half_partials),
                              ("stochastic rounding", plan.stochastic_rounding),
                              ("automatic loss scaling", plan.automatic_loss_scaling)) if on]
    lines.append(f"Precision: {prec} weights" + "".join(f", {e}" for e in extras)
                 + f"; loss scaling {plan.loss_scaling:g}")
    lines.append(
        f"Optimizer: {plan.optimizer} lr {plan.lr:g}; gradient accumulators {plan.accum_dtype}, "
        f"moments {plan.first_order_momentum_dtype}/{plan.second_order_momentum_dtype}"
        + ("; state sharded across replicas (RTS)" if plan.enable_rts else "")
        + ("; state off-chip" if plan.optimizer_state_offchip else ""))
    if plan.embedding_serialization_factor > 1:
        f = plan.embedding_serialization_factor
        lines.append(f"Serialization: text embedding ({plan.text_rows:,} rows) and output "
                     f"projection ({plan.logits_dim:,} logits) in {f} pieces")
    props = ", ".join(f"{k} {v:g}" for k, v in plan.available_memory_proportion.items())
    lines.append(f"Available memory proportion: {props}")
    loader = f"{plan.dataloader_mode}, {plan.dataloader_workers} workers"
    if plan.rebatched_worker_size:
        loader += f", worker batch {plan.rebatched_worker_size}"
    lines.append(f"Data loader: poptorch.DataLoader {loader}")
    lines.append(f"Executable cache: {plan.executable_cache_dir or 'off'}")
    lines.append("")
    blocks_by_ipu: dict[int, list[str]] = {}
    for b in plan.blocks:
        blocks_by_ipu.setdefault(b.ipu, []).append(f"{b.name}@{b.module}")
    rows = [("IPU", "HOLDS", "BLOCKS START AT", "PARAMS", "WEIGHTS MB", "OPT STATE MB", "TOTAL MB",
             f"OF {IPU_MEMORY_BYTES // 10**6} MB")]
    for s in plan.stages:
        rows.append((str(s.ipu), ", ".join(s.parts) or "-", ", ".join(blocks_by_ipu.get(s.ipu, [])) or "-",
                     f"{s.params:,}", _mb(s.weight_bytes), _mb(s.optimizer_bytes),
                     _mb(s.memory_bytes),
                     f"{100 * s.memory_bytes / IPU_MEMORY_BYTES:.0f}%" + (" !" if s.over_memory else "")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    lines.append("(estimate per IPU of each replica: weights, gradient accumulators and Adam "
                 "moments; activations, code and exchange buffers come on top)")
    lines.append("")
    lines.append("Checks:")
    lines.extend(f"  ok  {c}" for c in plan.checks)
    if plan.warnings:
        lines.append("Warnings:")
        lines.extend(f"  !   {w}" for w in plan.warnings)
    return "\n".join(lines)
