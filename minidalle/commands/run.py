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
    p.add_argument("--nproc", type=int, metavar="N",
                   help="train data parallel in N local processes started by torchrun's launcher "
                        "(cpu: gloo; cuda: one GPU per process, NCCL). Across hosts run "
                        "`torchrun ... -m minidalle run CONFIG` instead")
    p.set_defaults(func=run)


def load_run_config(path, overrides=(), backend: str | None = None, registry=None, after=()):
    """The config with ``--set`` overrides and an optional ``--backend`` override applied
    (``after``: more ``KEY=VALUE`` overrides applied after the backend swap)."""
    from minidalle.api import config_from_dict
    from minidalle.config import apply_overrides, load_raw

    if backend is not None:
        # `--backend cuda --set backend.precision=bf16`: the --set belongs to the new backend
        late = [o for o in overrides if o.split("=", 1)[0].strip().startswith("backend.")]
        overrides = [o for o in overrides if o not in late]
        after = [*late, *after]
    data, origins = load_raw(path, overrides)
    if backend is not None:
        current = data.get("backend") if isinstance(data.get("backend"), dict) else {}
        # The config's backend parameters belong to its backend; keep them only if it is the same.
        data["backend"] = dict(current) if current.get("name") == backend else {"name": backend}
        data["backend"]["name"] = backend
        origins["backend"] = "--backend"
        origins["backend.name"] = "--backend"
    data = apply_overrides(data, after, origins)
    return config_from_dict(data, str(path), origins, registry)


def _child_argv(args) -> list[str]:
    """This command line without ``--nproc``: what each launched process runs."""
    argv = ["--debug"] if getattr(args, "debug", False) else []
    argv += ["run", args.config]
    for item in args.overrides:
        argv += ["--set", item]
    if args.backend:
        argv += ["--backend", args.backend]
    if args.resume:
        argv.append("--resume")
    if args.from_stage:
        argv += ["--from", args.from_stage]
    return argv


def _check_backend(cfg) -> None:
    """An unusable backend is reported before any stage runs or writes anything."""
    from minidalle.errors import UnavailableComponentError

    component = cfg.registry.get("backend", cfg.backend.name)
    reason = component.unavailable_reason(deep=True)
    if reason:
        raise UnavailableComponentError(f"backend {cfg.backend.name!r} is unavailable: {reason}")


def _check_before_launch(cfg, nproc: int) -> None:
    """Errors every launched process would hit, reported once before launching."""
    from minidalle.errors import ConfigError

    if cfg.training.replication_factor not in (1, nproc):
        raise ConfigError(f"{cfg.source}: training.replication_factor: expected 1 or the process "
                          f"count ({nproc}) with --nproc, got {cfg.training.replication_factor}")


def run(args) -> int:
    from minidalle.errors import ConfigError
    from minidalle.runlock import run_lock

    cfg = load_run_config(args.config, args.overrides, args.backend)
    if args.nproc is not None and args.nproc < 1:
        raise ConfigError(f"--nproc: expected a positive number of processes, got {args.nproc}")
    if "transformer" in cfg.run.stages or (args.nproc or 1) > 1:
        _check_backend(cfg)  # before the lock creates run.out_dir
    with run_lock(cfg.run.out_dir):
        return _run_locked(args, cfg)


def _run_locked(args, cfg) -> int:
    import os

    from minidalle.errors import ConfigError
    from minidalle.recipes.stages import run_stages

    if args.nproc is not None:
        if "LOCAL_RANK" in os.environ:  # already one of torchrun's processes
            raise ConfigError("--nproc: this process was started by torchrun, which already set "
                              "the process count; leave --nproc out")
        if args.nproc > 1:
            _check_before_launch(cfg, args.nproc)
            from minidalle.train.distributed import launch

            return launch(args.nproc, _child_argv(args))
    run_stages(cfg, from_stage=args.from_stage, resume=args.resume)
    from minidalle.train.distributed import end_process_group

    end_process_group()  # leave the job's process group together (nothing if none was joined)
    return 0
