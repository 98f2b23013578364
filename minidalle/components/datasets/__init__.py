"""Built-in datasets: ``coco`` (MS COCO 2017 captions), ``folder`` (image + .txt pairs),
``shapes`` (procedural coloured shapes, offline) and ``codes`` (a cache of image codes that
``minidalle prepare codes`` writes). Each yields ``{"caption", "image"}`` (or ``"codes"``)
items; shared helpers live in ``minidalle.data``. May import ``config``, ``errors``,
``data``, ``fileio`` and ``train.pipeline`` (the codes cache encodes through it).
"""
