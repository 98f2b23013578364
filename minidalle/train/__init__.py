"""Training the transformer: the main path of ``minidalle run``.

``trainer`` (the :class:`~minidalle.train.trainer.Trainer`: setup, steps, logging,
checkpoints), ``pipeline`` (config -> tokenizer, codec, datasets, model, collate), ``backend``
(the backend interface: ``Backend``, ``Runner``, ``TorchRunner``), ``optim`` (optimizer and LR
schedule), ``checkpoint`` (safetensors + JSON, atomic, no pickle), ``distributed``
(torch.distributed data parallel) and ``master_weights`` (bf16 compute on fp32 masters).
May import ``config``, ``model``, ``errors`` and the root helpers (``api`` for the default
registry); never ``inference``, ``recipes``, ``commands`` or a component module. The
registry comes with the config (``cfg.registry``) or as an argument.
"""
