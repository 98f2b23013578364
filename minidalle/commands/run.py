"""``minidalle run CONFIG``: execute the config's stages (``run.stages``) in order."""
from __future__ import annotations


def add_parser(sub) -> None:
    from minidalle.cli import add_config_arguments

    p = sub.add_parser(
        "run", help="run a config's stages (train the transformer, ...)",
        description="Run the stages listed in run.stages (default: transformer) in order, "
                    "writing into run.out_dir. A stage whose outputs are complete is skipped.")
    add_config_arguments(p)
    p.add_argument("--backend", metavar="NAME",
                   help="use this backend instead of the config's [backend] (see `minidalle list backend`)")
    p.add_argument("--resume", action="store_true",
                   help="continue training from the newest complete checkpoint in run.out_dir")
    p.add_argument("--from", dest="from_stage", metavar="STAGE",
                   help="rerun this stage and every later one, even if complete")
    p.set_defaults(func=run)


def load_run_config(path, overrides=(), backend: str | None = None, registry=None):
    """The config with ``--set`` overrides and an optional ``--backend`` override applied."""
    from minidalle.config import config_from_dict, load_raw

    data, origins = load_raw(path, overrides)
    if backend is not None:
        current = data.get("backend") if isinstance(data.get("backend"), dict) else {}
        # The config's backend parameters belong to its backend; keep them only if it is the same.
        data["backend"] = dict(current) if current.get("name") == backend else {"name": backend}
        data["backend"]["name"] = backend
        origins["backend"] = "--backend"
        origins["backend.name"] = "--backend"
    return config_from_dict(data, str(path), origins, registry)


def run(args) -> int:
    from minidalle.stages import run_stages

    cfg = load_run_config(args.config, args.overrides, args.backend)
    run_stages(cfg, from_stage=args.from_stage, resume=args.resume)
    return 0
