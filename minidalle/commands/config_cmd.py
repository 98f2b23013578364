"""`minidalle config show CONFIG`: the resolved config (extends + --set) as TOML."""


def add_parser(sub):
    from minidalle.cli import add_config_arguments

    p = sub.add_parser("config", help="inspect configs")
    csub = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show = csub.add_parser("show", help="print the resolved config as TOML")
    add_config_arguments(show)
    show.set_defaults(func=show_config)


def show_config(args) -> int:
    from minidalle.api import load_config
    from minidalle.config import to_toml

    cfg = load_config(args.config, args.overrides)
    print(to_toml(cfg), end="")
    return 0
