"""Built-in device backends: ``cpu`` (the reference), ``cuda`` (``cuda_probe`` answers
``minidalle list`` without importing torch) and ``ipu/`` (Graphcore: the plan, the model
transforms and the PopTorch layer). Each implements :class:`minidalle.train.backend.Backend`.
May import ``config``, ``errors``, ``model`` and ``train`` (backend interface, distributed,
master weights).
"""
