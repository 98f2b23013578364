"""Checkpoints of other DALL-E implementations in and out of minidalle: DALLE-pytorch's
``dalle.pt`` (:mod:`.dalle_pytorch`, both ways) and Graphcore's mini DALL-E
``dalle_<epoch>.pt`` (:mod:`.graphcore`, import). Both are ``torch.save`` dicts of
``hparams``, ``vae_params``, ``weights`` and optimizer state, read with
``torch.load(weights_only=True)``; :mod:`.mapping` holds what the two share: the renaming of
their state-dict keys onto minidalle's modules (the same network, so the computed function is
unchanged), the refusal of features minidalle's model lacks, the remapping of Adam state and
the writing of an ordinary run directory (``checkpoints/step-00000000`` + ``config.toml``).
"""
