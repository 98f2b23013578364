"""The built-in components, one module per component, in a folder per kind:
``tokenizers/``, ``codecs/`` (with codec training), ``datasets/``, ``backends/`` (with
``backends/ipu/``: the IPU plan, its report, the model transforms and the PopTorch layer) and ``attention.py``. Each registers through :mod:`minidalle.plugin.builtins`
exactly as a third-party plugin would. A component may import ``config``, ``errors``,
``model`` (the attention API, linear layers), ``train.backend`` (backends) and the root
helpers (``data``, ``fileio``, ``images``); never ``commands``, ``recipes`` or another kind's
folder.
"""
