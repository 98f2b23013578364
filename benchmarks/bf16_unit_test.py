"""bf16 autocast and bf16-master vs fp32 on the `unit_test` recipe: the loss after N steps
(default 50).

The recipe's equivalence set-up (minidalle.testing.backend): the one-layer unit_test model
at the recipe's vocabularies (8192 text ids, 1024 codes on a 16 x 16 grid), one fixed
(text, codes) pair repeated over each step's samples, AdamW lr 3e-4, identical initial
weights on both sides. Prints both losses, their relative difference and the time per
step of each precision.

    .venv/bin/python benchmarks/bf16_unit_test.py [--steps 50]
"""
import argparse
import copy
import json
import time

import torch

from minidalle.components.backends.cpu import CpuBackend, CpuConfig
from minidalle.model import build_model
from minidalle.testing.backend import RECIPE_SIZES, fixed_batch, unit_test_config


def losses_for(precision, model, cfg, batch, steps):
    backend = CpuBackend(CpuConfig(precision=precision))
    m = backend.setup_model(copy.deepcopy(model))
    runner = backend.prepare(m, backend.build_optimizer(m, cfg.training), cfg.training)
    start = time.perf_counter()
    losses = [runner.train_step(batch).loss for _ in range(steps)]
    return losses, (time.perf_counter() - start) / steps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args()
    cfg = unit_test_config()
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg, **RECIPE_SIZES)
    batch = fixed_batch(cfg, **RECIPE_SIZES)
    fp32, t32 = losses_for("fp32", model, cfg, batch, args.steps)
    out = {"steps": args.steps, "fp32_final": fp32[-1]}
    print(f"unit_test, {args.steps} steps: fp32 loss {fp32[0]:.4f} -> {fp32[-1]:.4f} ({t32:.3f} s/step)")
    for precision in ("bf16", "bf16-master"):
        low, t16 = losses_for(precision, model, cfg, batch, args.steps)
        rel = abs(low[-1] - fp32[-1]) / abs(fp32[-1])
        print(f"{precision} loss {low[0]:.4f} -> {low[-1]:.4f} ({t16:.3f} s/step); relative difference "
              f"of the final loss: {100 * rel:.2f}% (target <= 2%)")
        out.update({f"{precision}_final": low[-1], f"{precision}_relative_difference": rel})
    print(json.dumps(out))

if __name__ == "__main__":
    main()
