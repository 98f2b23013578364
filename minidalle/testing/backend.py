"""Backend conformance: train the ``unit_test`` recipe on a backend and on the ``cpu``
reference and compare every step's loss (the recipe's CPU-vs-IPU test, for any backend).

::

    from minidalle.testing.backend import check_backend
    report = check_backend(lambda: registry.build("backend", "mine", {}))

Both sides start from the same weights and train ``steps`` optimizer steps on the same
fixed batch: one (text, image codes) pair repeated over the step's samples
(``batch_size x gradient_accumulation x replication_factor x device_iterations``, 2 in the
recipe), AdamW lr 3e-4. Each side goes through the backend interface exactly as the
trainer drives it (``setup_model``, ``build_optimizer``, ``prepare``, ``compile``,
``train_step``, ``sync_to_host``). :class:`AssertionError` names the first step whose
losses differ by more than ``atol``.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch

# configs/unit_test.toml's model and training numbers (tests check they agree), so that the
# check works from an installed package too.
UNIT_TEST = {
    "run": {"name": "unit_test", "seed": 42},
    "model": {"dim": 64, "depth": 1, "heads": 1, "dim_head": 64, "text_seq_len": 80,
              "attn_types": ["axial_row"], "loss_img_weight": 7.0},
    "training": {"epochs": 1, "batch_size": 1, "gradient_accumulation": 2,
                 "device_iterations": 1, "replication_factor": 1, "optimizer": "adamw",
                 "lr": 3e-4, "loss_scaling": 1.0, "lr_scheduler": "none"},
}
# The recipe's vocabularies: yttm BPE (8192 ids) and the f16-1024 VQGAN (16 x 16 codes).
RECIPE_SIZES = dict(text_vocab=8192, num_image_tokens=1024, fmap_size=16)


def unit_test_config(**sections):
    """The ``unit_test`` recipe as a Config; ``sections`` replace/extend its tables."""
    from minidalle.api import config_from_dict

    data = copy.deepcopy(UNIT_TEST)
    for key, table in sections.items():
        data[key] = {**data.get(key, {}), **table} if key in ("model", "training", "run") else table
    return config_from_dict(data, "<unit_test>")


def fixed_batch(cfg, *, text_vocab: int, num_image_tokens: int, fmap_size: int, seed: int = 0,
                samples: int | None = None) -> dict:
    """One (text, codes) pair repeated ``samples`` times (default: one step's samples)."""
    from minidalle.train.backend import samples_per_step

    g = torch.Generator().manual_seed(seed)
    seq = cfg.model.text_seq_len
    text = torch.randint(1, text_vocab, (1, seq), generator=g)
    text[:, seq * 3 // 4:] = 0  # trailing padding, as a tokenized caption has
    codes = torch.randint(0, num_image_tokens, (1, fmap_size**2), generator=g)
    n = samples or samples_per_step(cfg.training)
    return {"text": text.repeat(n, 1), "image": codes.repeat(n, 1)}


def train_losses(backend, model, cfg, batch, steps: int) -> tuple[list[float], dict]:
    """Drive ``backend`` as the trainer does for ``steps`` steps on ``batch``; the losses and
    the final host weights (fp32)."""
    t = cfg.training
    model = backend.setup_model(model)
    optimizer = backend.build_optimizer(model, t)
    runner = backend.prepare(model, optimizer, t)
    try:
        runner.compile(batch)
        losses = [float(runner.train_step(batch).loss) for _ in range(steps)]
        runner.sync_to_host()
        weights = {k: v.detach().float().cpu().clone() for k, v in runner.model.state_dict().items()}
    finally:
        runner.close()
    return losses, weights


def check_backend(make_backend: Callable, *, steps: int = 10, atol: float = 1e-6,
                  weights_atol: float | None = None, cfg=None, sizes: dict | None = None,
                  make_reference: Callable | None = None, registry=None) -> dict:
    """Compare ``make_backend()`` with the ``cpu`` reference (``make_reference()``).

    ``cfg`` defaults to the ``unit_test`` recipe, ``sizes`` to the recipe's vocabularies.
    Returns ``{"reference": [...], "backend": [...], "max_loss_diff", "max_weight_diff"}``.
    """
    from minidalle.model import build_model
    from minidalle.plugin.discovery import get_registry

    registry = registry or get_registry()
    cfg = cfg or unit_test_config()
    sizes = dict(sizes or RECIPE_SIZES)
    # The reference is the fp32 cpu backend, whatever "auto" would pick on this CPU.
    make_reference = make_reference or (lambda: registry.build("backend", "cpu", {"precision": "fp32"}))
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg, registry=registry, **sizes)
    batch = fixed_batch(cfg, **sizes)

    ref_losses, ref_weights = train_losses(make_reference(), copy.deepcopy(model), cfg, batch, steps)
    losses, weights = train_losses(make_backend(), copy.deepcopy(model), cfg, batch, steps)

    diffs = [abs(a - b) for a, b in zip(ref_losses, losses)]
    missing = sorted(set(ref_weights) ^ set(weights))
    if missing:
        raise AssertionError(f"state_dict keys differ from the reference's: {missing[:5]}")
    weight_diff = max(float((ref_weights[k] - weights[k]).abs().max()) for k in ref_weights)
    report = {"reference": ref_losses, "backend": losses, "max_loss_diff": max(diffs),
              "max_weight_diff": weight_diff}
    for step, (a, b, d) in enumerate(zip(ref_losses, losses, diffs), 1):
        if not d <= atol:  # also catches NaN
            raise AssertionError(f"step {step}: loss {b!r} differs from the cpu reference's "
                                 f"{a!r} by {d:.3g} (atol {atol:g}); all: {report}")
    if weights_atol is not None and not weight_diff <= weights_atol:
        raise AssertionError(f"after {steps} steps the weights differ from the cpu reference's "
                             f"by up to {weight_diff:.3g} (weights_atol {weights_atol:g})")
    return report
