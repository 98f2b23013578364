"""Measurement code behind ``minidalle bench``: ``settings`` (the ``[bench]`` section),
``training`` (timed training steps, FLOPs per sample, the matmul peak, MFU, peak memory)
and ``generate`` (``minidalle bench --generate``: image-generation latency, cached and
uncached, fp32 and bf16). Speed is measured here and in ``benchmarks/``, never asserted in
tests. May import ``train``, ``inference``, ``model``, ``config`` and ``api``; never ``commands``.
"""
