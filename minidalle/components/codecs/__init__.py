"""Built-in image codecs: ``vqgan`` (taming-transformers VQGAN checkpoints, frozen) and
``vqgan_training`` (``minidalle train-codec`` and the quickstart's ``codec`` stage: trains a
VQ codec on a config's dataset and saves it in the taming format the ``vqgan`` codec loads).
May import ``config``, ``errors``, ``fileio`` and ``model``; the registry comes with the config.
"""
