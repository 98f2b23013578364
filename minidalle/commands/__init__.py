"""The ``minidalle`` subcommands, one thin module each with ``add_parser(subparsers)``,
registered through the ``minidalle_commands`` hook (``plugin.builtins``). They parse
arguments, load the config with the registry, and call into ``train``, ``inference``,
``recipes`` or ``bench``; they import nothing heavy at module level (``--help`` and
``list`` never import torch). May import anything.
"""
