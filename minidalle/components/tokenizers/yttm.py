"""``yttm``: a youtokentome BPE model (the format of the recipe's ``bpe_yttm_vocab.txt``).

Ids are youtokentome's own: 0 is ``<PAD>`` (youtokentome's default ``pad_id``), 1 ``<UNK>``,
2 ``<BOS>``, 3 ``<EOS>``; BOS/EOS are not added. ``vocab_size`` is the model's vocabulary
size. :func:`train` makes a new model from captions (``minidalle tokenizer train``).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable

import attrs

from minidalle.errors import DataError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


@attrs.define
class YttmConfig:
    # A youtokentome model file; relative paths are relative to the working directory.
    path: str


def _check_model_file(path: Path) -> None:
    # youtokentome loads some malformed files without complaint, so check the header
    # ("<chars> <merges>") ourselves.
    if not path.is_file():
        raise DataError(f"{path}: youtokentome model file not found "
                        f"(train one with `minidalle tokenizer train CONFIG --vocab-size N --out FILE`)")
    try:
        with path.open("r", encoding="utf-8") as f:
            head = f.readline().split()
            lines = sum(1 for _ in f)
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read youtokentome model: {exc}") from None
    if len(head) != 2 or not all(h.isdigit() for h in head):
        raise DataError(f"{path}: not a youtokentome model file (bad header line)")
    # The header counts the character lines and merge lines that follow it.
    if lines < int(head[0]) + int(head[1]):
        raise DataError(f"{path}: truncated youtokentome model file ({lines} lines after the "
                        f"header, which announces {int(head[0]) + int(head[1])})")


class YttmTokenizer:
    def __init__(self, path) -> None:
        self.path = Path(path)
        _check_model_file(self.path)
        self._bpe = None
        self.vocab_size = int(self.bpe.vocab_size())

    @property
    def bpe(self):
        if self._bpe is None:
            import youtokentome

            try:
                self._bpe = youtokentome.BPE(model=str(self.path), n_threads=1)
            except ValueError as exc:
                raise DataError(f"{self.path}: cannot load youtokentome model: {exc}") from None
        return self._bpe

    # The C++ model cannot be pickled: data-loader workers reload it from the file.
    def __getstate__(self):
        state = self.__dict__.copy()
        state["_bpe"] = None
        return state

    def encode(self, texts: list[str], context_length: int, truncate: bool = True):
        from minidalle.data import to_fixed_length

        texts = [texts] if isinstance(texts, str) else list(texts)
        ids = self.bpe.encode(texts, bos=False, eos=False) if texts else []
        return to_fixed_length(ids, texts, context_length, truncate)

    def decode(self, ids) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        keep = [int(i) for i in ids if 0 < int(i) < self.vocab_size and int(i) not in (BOS_ID, EOS_ID)]
        return self.bpe.decode([keep])[0] if keep else ""


def build(config: YttmConfig) -> YttmTokenizer:
    return YttmTokenizer(config.path)


def train(captions: Iterable[str], vocab_size: int, out, *, coverage: float = 1.0) -> YttmTokenizer:
    """Train a youtokentome model on ``captions`` and write it to ``out`` atomically."""
    import youtokentome

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    _remove_stale_temp_dirs(out.parent)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".yttm-{os.getpid()}-") as tmp:
        data = Path(tmp) / "captions.txt"
        with data.open("w", encoding="utf-8") as f:
            for caption in captions:
                line = " ".join(str(caption).split())
                if line:
                    f.write(line + "\n")
                    count += 1
        if count == 0:
            raise DataError("no captions to train the tokenizer on")
        model = Path(tmp) / "model.yttm"
        try:
            with _quiet_stdout():  # youtokentome prints its settings from C++
                youtokentome.BPE.train(data=str(data), model=str(model), vocab_size=int(vocab_size),
                                       coverage=coverage, n_threads=1, pad_id=PAD_ID, unk_id=UNK_ID,
                                       bos_id=BOS_ID, eos_id=EOS_ID)
        except ValueError as exc:  # e.g. "Vocabulary size too small. Set vocab_size>=24."
            raise DataError(f"youtokentome: {' '.join(str(exc).split())}") from None
        os.replace(model, out)
    return YttmTokenizer(out)


def _remove_stale_temp_dirs(folder: Path) -> None:
    """``.yttm-<pid>-*`` folders of processes that died (killed mid-training) go."""
    import shutil

    for stale in folder.glob(".yttm-*"):
        pid = stale.name.split("-")[1]
        if pid.isdigit():
            try:
                os.kill(int(pid), 0)
                continue  # still running
            except ProcessLookupError:
                pass
            except PermissionError:
                continue  # another user's live process
        shutil.rmtree(stale, ignore_errors=True)


class _quiet_stdout:
    """Silence file descriptors 1 and 2 (C++ prints) for the duration of a block; errors
    still arrive as Python exceptions."""

    def __enter__(self):
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        self._null = os.open(os.devnull, os.O_WRONLY)
        self._saved = [os.dup(1), os.dup(2)]
        os.dup2(self._null, 1)
        os.dup2(self._null, 2)

    def __exit__(self, *exc):
        for fd, saved in zip((1, 2), self._saved):
            os.dup2(saved, fd)
            os.close(saved)
        os.close(self._null)
