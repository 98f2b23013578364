"""A/B of cached sampling between two source trees (e.g. a commit against the working tree).

    git worktree add /tmp/base <commit>
    python benchmarks/versions_ab.py /tmp/base . [--config configs/l16.toml]
        [--precision bf16|fp32|bf16-weights] [--images 1] [--threads 2] [--rounds 10]

Starts one worker process per tree (``PYTHONPATH`` set to it, so each loads its own
``minidalle`` and builds its own kernel), each with the same random model and prompts, then
asks them in turn, A B, B A, ..., to draw the same image(s) and prints each pair's time and
the median and range of B/A. Only one worker runs at a time; pairing adjacent runs is what
makes the ratio usable on a machine whose memory read rate moves within minutes (the
absolute times are not).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

WORKER = r"""
import sys, time, torch
from minidalle.api import load_config
from minidalle.bench.settings import bench_geometry
from minidalle.train.pipeline import build_model
from minidalle.inference.sampling import generate_image_codes
config, precision, images, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
cfg = load_config(config)
geo = bench_geometry(cfg)
torch.manual_seed(cfg.run.seed)
model = build_model(cfg, text_vocab=geo["text_vocab"], num_image_tokens=geo["num_image_tokens"],
                    fmap_size=geo["fmap_size"], registry=cfg.registry).eval()
if precision == "bf16":
    model = model.to(torch.bfloat16)
store = "bf16" if precision == "bf16-weights" else None
g = torch.Generator().manual_seed(0)
text = torch.randint(1, geo["text_vocab"], (images, cfg.model.text_seq_len), generator=g)
text[:, -cfg.model.text_seq_len // 4:] = 0
prime = torch.zeros(images, model.image_seq_len - 4, dtype=torch.long)
generate_image_codes(model, text, seed=0, prime_codes=prime, weight_store=store)  # warm-up
print("ready", flush=True)
for _ in sys.stdin:
    t0 = time.perf_counter()
    generate_image_codes(model, text, seed=0, weight_store=store)
    print(time.perf_counter() - t0, flush=True)
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/versions_ab.py")
    p.add_argument("a", help="source tree A (the base)")
    p.add_argument("b", help="source tree B")
    p.add_argument("--config", default="configs/l16.toml")
    p.add_argument("--precision", choices=("bf16", "fp32", "bf16-weights"), default="bf16")
    p.add_argument("--images", type=int, default=1, help="images drawn together")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=10)
    args = p.parse_args(argv)
    trees = {"A": Path(args.a).resolve(), "B": Path(args.b).resolve()}
    for name, tree in trees.items():
        if not (tree / "minidalle" / "__init__.py").is_file():
            print(f"versions_ab: {tree} (tree {name}) has no minidalle package", file=sys.stderr)
            return 2
    config = str(Path(args.config).resolve())
    workers = {}
    try:
        for name, tree in trees.items():
            env = dict(os.environ, PYTHONPATH=str(tree))
            workers[name] = subprocess.Popen(
                [sys.executable, "-c", WORKER, config, args.precision, str(args.images), str(args.threads)],
                cwd=tree, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for name, w in workers.items():
            if w.stdout.readline().strip() != "ready":
                print(f"versions_ab: the worker for tree {name} failed", file=sys.stderr)
                return 1
        ratios = []
        for r in range(args.rounds):
            times = {}
            for name in ("A", "B") if r % 2 == 0 else ("B", "A"):
                workers[name].stdin.write("go\n")
                workers[name].stdin.flush()
                times[name] = float(workers[name].stdout.readline())
            ratios.append(times["B"] / times["A"])
            print(f"A {times['A']:.3f} s  B {times['B']:.3f} s  B/A {ratios[-1]:.3f}", flush=True)
        print(f"{args.precision}, {args.images} image(s), {args.threads} threads: B/A median "
              f"{statistics.median(ratios):.3f} (range {min(ratios):.3f}-{max(ratios):.3f}, "
              f"{args.rounds} pairs)")
    finally:
        for w in workers.values():
            w.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
