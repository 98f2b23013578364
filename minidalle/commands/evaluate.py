"""``minidalle evaluate RUN_DIR``: held-out losses, codec quality, FID/KID, CLIP score, a
caption grid and the dataset's own metrics of a trained run (any dataset)."""
from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser(
        "evaluate", help="measure a trained run: held-out loss, codec, FID/KID, CLIP, grid",
        description="Load the newest checkpoint of RUN_DIR (its config included) and measure, "
                    "on held-out data: text and image loss and bits per image token; the codec's "
                    "PSNR, SSIM, codebook use and perplexity; FID and KID of generated images "
                    "(Inception weights from evaluate.fid_weights) and CLIP score "
                    "(evaluate.clip_weights), skipped without local weights; a caption grid "
                    "(evaluate.prompts); and the dataset's own metrics (shapes: prompt fidelity). "
                    "Writes RUN_DIR/metrics.json, RUN_DIR/loss.png and RUN_DIR/evaluate_grid.png.")
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
    from minidalle.recipes.evaluation import evaluate_run

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
