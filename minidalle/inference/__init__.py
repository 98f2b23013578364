"""Drawing images from a trained model.

``loader`` (the one way from a checkpoint to tokenizer, codec and model), ``sampling``
(filters, the sampling loop for image codes and the batched drawing of images), ``decode``
(the lean one-position decoder behind the key/value cache) and ``gemv`` (the CPU kernel it
uses for bf16 matrix-vector products). May import ``model``, ``train.checkpoint``,
``train.pipeline``, ``config`` and ``errors``; never ``recipes`` or ``commands``.
"""
