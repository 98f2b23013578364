"""The offline quickstart recipe (``configs/quickstart.toml``): its stages (``codec``,
``tokenizer``, ``samples``, ``evaluate``), the ``minidalle evaluate`` measurements
(``evaluation``: prompt fidelity, codec ceiling, losses) and the pixel analyser of the
``shapes`` dataset that those measurements use. May import ``train``, ``inference``,
``components`` and ``config``; nothing outside ``recipes`` imports it except
``commands.evaluate`` and the registrations in ``plugin.builtins``.
"""
