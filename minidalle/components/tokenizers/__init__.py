"""Built-in tokenizers: ``yttm`` (youtokentome BPE; ``training`` trains one on a config's
captions, for ``minidalle tokenizer train`` and the quickstart's ``tokenizer`` stage) and
``clip`` (CLIP's simple byte-level BPE). Each returns ``[B, L]`` int64 ids with 0 as padding.
May import ``config``, ``errors`` and ``minidalle.data``.
"""
