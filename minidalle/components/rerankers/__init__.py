"""Built-in rerankers: ``likelihood`` (the generating model's own log-likelihood of the
sampled image codes given the caption, optionally minus that given the null caption) and
``clip`` (open_clip similarity from a local weights file). May import ``config``,
``errors`` and ``minidalle.inference``.
"""
