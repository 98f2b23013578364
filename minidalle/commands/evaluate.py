"""``minidalle evaluate RUN_DIR``: prompt fidelity, codec PSNR and losses of a trained run."""
from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser(
        "evaluate", help="measure a trained run: prompt fidelity, codec PSNR, losses",
        description="Load the newest checkpoint of RUN_DIR (its config included), check the "
                    "shapes analyser on real images, draw images for held-out prompts (seen and "
                    "withheld attribute combinations) and report the share that match their "
                    "prompt, the codec's PSNR and codebook use and the losses. Writes "
                    "RUN_DIR/metrics.json and RUN_DIR/loss.png.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by `minidalle run`")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override an [evaluate] or [generate] setting of the run's config, e.g. "
                        "--set evaluate.seen_prompts=128 (repeatable)")
    p.add_argument("--json", action="store_true", help="print metrics.json instead of the summary")
    p.set_defaults(func=run)


def run(args) -> int:
    import json
    from pathlib import Path

    from minidalle.errors import ConfigError

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: no such run directory")
    cfg = None
    if args.overrides:
        cfg = _config_with_overrides(run_dir, args.overrides)
    from minidalle.recipes.quickstart.evaluation import evaluate_run

    log = (lambda line: None) if args.json else print
    metrics = evaluate_run(run_dir, cfg=cfg, log=log)
    if args.json:
        print(json.dumps(metrics, indent=2))
    return 0


def _config_with_overrides(run_dir, overrides):
    """The run's stored config with ``--set`` applied (only evaluate/generate keys)."""
    from minidalle.train.checkpoint import load_checkpoint
    from minidalle.api import config_from_dict
    from minidalle.config import apply_overrides
    from minidalle.errors import ConfigError

    ck = load_checkpoint(run_dir, verify=False)
    for item in overrides:
        section = item.partition("=")[0].split(".")[0].strip()
        if section not in ("evaluate", "generate"):
            raise ConfigError(f"--set {item}: evaluate only takes [evaluate] and [generate] "
                              "settings (the model is the run's)")
    data = apply_overrides(ck.meta["config"], overrides, {})
    return config_from_dict(data, source=str(ck.path / "meta.json"))
