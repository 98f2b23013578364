"""Our L16 training step against DALLE-pytorch 1.6.6's, in one process, steps interleaved.

    pip install --no-deps --target /tmp/dalle_pytorch dalle-pytorch==1.6.6 \\
        axial-positional-embedding==0.2.1 rotary-embedding-torch==0.1.5 einops
    PYTHONPATH=/tmp/dalle_pytorch python benchmarks/dalle_pytorch_ab.py [--rounds 6]   # from the repo root

Issue 3 says DALLE-pytorch 1.6.6 trains the L16 config at batch 3 in fp32 at 0.93
samples/sec on this machine and that our reference must be at least as fast. Both models
here are the same network (93,604,432 parameters, 88,645,632 of them in linear layers):
dim 512, 16 layers of 16 heads x 64, the recipe's axial_row/axial_col/full order, GEGLU,
LayerScale, text 80 tokens over 8192 ids, 16 x 16 image codes over 1024; DALLE-pytorch with
its later additions the recipe lacks switched off (``rotary_emb``, ``shift_tokens``).
One step = forward, backward and a fused Adam update (lr 5e-3, eps 1e-6) on one synthetic
batch of 3, the same batch for both. The two take turns step by step, so a slow spell of
the machine hits both. DALLE-pytorch's other dependencies are imported but not used (no VAE
is built: image codes go in directly); those that fail to import here (taming's VQGAN,
requests) are replaced by empty modules.
"""
from __future__ import annotations

import argparse
import sys
import time
import types


def _empty_modules() -> None:
    """Modules DALLE-pytorch imports at load time but does not use for token input."""
    def empty(name, **attrs):
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        sys.modules[name] = module
        return module

    try:
        import taming.models.vqgan  # noqa: F401
    except Exception:  # broken with modern pytorch-lightning
        for name in ("taming", "taming.models"):
            sys.modules.setdefault(name, types.ModuleType(name))
        empty("taming.models.vqgan", VQModel=None, GumbelVQ=None)
    for name, attrs in (("requests", {}), ("pkg_resources", {"get_distribution": lambda *a, **k: None})):
        try:
            __import__(name)
        except ImportError:
            empty(name, **attrs)


def dalle_pytorch_step(text, image, attn_types):
    import torch
    from dalle_pytorch import DALLE, DiscreteVAE

    class CodesOnly(DiscreteVAE):  # passes DALLE's isinstance check; no layers
        def __init__(self):
            torch.nn.Module.__init__(self)
            self.image_size, self.num_tokens, self.num_layers, self.channels = 256, 1024, 4, 3

    torch.manual_seed(0)
    model = DALLE(dim=512, vae=CodesOnly(), num_text_tokens=8192, text_seq_len=80, depth=16,
                  heads=16, dim_head=64, attn_types=tuple(attn_types), loss_img_weight=7,
                  attn_dropout=0.0, ff_dropout=0.0, reversible=False, rotary_emb=False,
                  shift_tokens=False, stable=False, sandwich_norm=False)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3, eps=1e-6, fused=True)

    def step() -> float:
        loss = model(text, image, return_loss=True)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return model, step


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=6, help="timed steps of each (default 6)")
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    _empty_modules()
    try:
        import dalle_pytorch  # noqa: F401
    except ImportError as exc:
        print(f"dalle_pytorch_ab: needs DALLE-pytorch 1.6.6 on PYTHONPATH ({exc}); see the docstring",
              file=sys.stderr)
        return 2
    import torch

    from dalle_pytorch.version import __version__ as their_version

    from minidalle.commands.run import load_run_config
    from minidalle.train.pipeline import build_model
    from minidalle.plugin.discovery import get_registry
    from minidalle.train.trainer import seed_everything

    # fp32 on both sides: the config's backend precision is "auto", which is bf16 on a CPU
    # with native bf16, and DALLE-pytorch's step here is fp32.
    cfg = load_run_config("configs/l16.toml", [], "cpu",
                          after=["training.gradient_accumulation=1", "backend.precision=fp32"])
    registry = get_registry()
    backend = registry.build("backend", cfg.backend.name, cfg.backend.params)
    seed_everything(0)
    ours = backend.setup_model(build_model(cfg, text_vocab=8192, num_image_tokens=1024, fmap_size=16,
                                           registry=registry))
    runner = backend.prepare(ours, backend.build_optimizer(ours, cfg.training), cfg.training)
    g = torch.Generator().manual_seed(0)
    text = torch.randint(1, 8192, (3, 80), generator=g)
    text[:, -20:] = 0
    image = torch.randint(0, 1024, (3, 256), generator=g)
    theirs, their_step = dalle_pytorch_step(text, image, cfg.model.attn_types)
    sizes = [sum(p.numel() for p in m.parameters()) for m in (ours, theirs)]
    print(f"parameters: minidalle {sizes[0]:,}, DALLE-pytorch {their_version} {sizes[1]:,}; "
          f"{torch.get_num_threads()} threads, batch 3, minidalle {backend.precision}, DALLE-pytorch fp32")
    steps = {"minidalle": lambda: runner.train_step({"text": text, "image": image}).loss,
             "DALLE-pytorch": their_step}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(args.warmup + args.rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)
    for name, ts in times.items():
        print(f"{name:14s} {3 * len(ts) / sum(ts):.3f} samples/sec (mean step {sum(ts) / len(ts):.3f} s, "
              f"best {min(ts):.3f} s)")
    ratio = sum(times["DALLE-pytorch"]) / sum(times["minidalle"])
    print(f"minidalle / DALLE-pytorch: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
