"""The ``minidalle`` command line.

Each subcommand is a module with ``add_parser(subparsers)``, registered through the
``minidalle_commands`` hook (the built-ins: ``minidalle/commands/``, named in
:mod:`minidalle.plugin.builtins`); those modules import nothing heavy at module level, so
``--help`` and ``list`` stay fast.
A user error (:class:`MinidalleError`, or an OS, allocation or decoding error) prints one
line and exits 2, any other failure one line and exit 1 (:func:`minidalle.errors.one_line`);
``--debug`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import sys

from minidalle import __version__
from minidalle.errors import one_line


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
    except Exception as exc:  # e.g. a plugin's command that fails to add its parser
        if "--debug" in argv:
            raise
        message, status = one_line(exc)
        print(f"minidalle: error: {' '.join(message.split())}", file=sys.stderr)
        return status
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("minidalle: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the one place errors become one line (minidalle.errors.one_line)
        if args.debug:
            raise
        message, status = one_line(exc)
        print(f"minidalle: error: {' '.join(message.split())}", file=sys.stderr)
        return status


if __name__ == "__main__":
    sys.exit(main())
