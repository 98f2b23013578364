"""The ``minidalle`` command line.

Each subcommand is a module with ``add_parser(subparsers)``, registered through the
``minidalle_commands`` hook (the built-ins: ``minidalle/commands/``, named in
:mod:`minidalle.plugin.builtins`); those modules import nothing heavy at module level, so
``--help`` and ``list`` stay fast.
A user error (:class:`MinidalleError`) prints one line and exits 2; ``--debug`` shows the
traceback instead.
"""
from __future__ import annotations

import argparse
import sys

from minidalle import __version__
from minidalle.errors import MinidalleError

def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """CONFIG plus ``--set`` overrides: every command that takes a config uses this."""
    parser.add_argument("config", help="TOML config file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set training.lr=1e-4 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minidalle", description="Train and sample a mini DALL-E built from plugins.")
    parser.add_argument("--version", action="version", version=f"minidalle {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    from minidalle.plugin.discovery import get_registry

    for command in get_registry().commands.values():
        command.add_parser(sub)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser()  # loads the registry: the commands are plugins too
    except MinidalleError as exc:  # e.g. two plugins register the same name
        if "--debug" in argv:
            raise
        print(f"minidalle: error: {exc}", file=sys.stderr)
        return exc.exit_code
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except MinidalleError as exc:
        if args.debug:
            raise
        print(f"minidalle: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("minidalle: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
