"""User-facing errors: the CLI prints their message on one line and exits 2.

:func:`one_line` is the one place that turns any other exception into such a line: OS,
allocation and text-decoding errors are the user's to fix (exit 2, naming the file),
anything else is a fault of minidalle or a plugin (exit 1).
"""


class MinidalleError(Exception):
    """An error caused by the user's input (a config, a file, a name), not a bug."""

    exit_code = 2


class ConfigError(MinidalleError):
    """A config file cannot be read, parsed or validated."""


class UnknownComponentError(MinidalleError):
    """A component name that no plugin registered."""


class DuplicateComponentError(MinidalleError):
    """Two providers registered the same kind and name."""


class UnavailableComponentError(MinidalleError):
    """A component whose required packages or hardware are missing."""


class CheckpointError(MinidalleError):
    """A checkpoint that is missing, truncated or corrupt."""


class DataError(MinidalleError):
    """Input data (images, captions, annotation files) that cannot be used."""


class TrainingDivergedError(MinidalleError):
    """The loss or the gradients went non-finite for ``training.max_bad_steps`` steps in a row."""


class RunLockedError(MinidalleError):
    """Another process holds the run directory's lock."""


class PluginError(MinidalleError):
    """A plugin's component failed in its own code: not the user's fault (exit 1)."""

    exit_code = 1


def _os_error_line(exc: OSError) -> str:
    import os

    what = exc.strerror or (os.strerror(exc.errno) if exc.errno else str(exc))
    if exc.filename is None:
        return what
    where = f"{exc.filename}" + (f" -> {exc.filename2}" if exc.filename2 else "")
    return f"{where}: {what}"


def is_allocation_failure(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and (
        "can't allocate memory" in text or "out of memory" in text.lower()
        or type(exc).__name__ == "OutOfMemoryError")


def one_line(exc: BaseException) -> tuple[str, int]:
    """(message, exit status) for an exception reaching the command line."""
    if isinstance(exc, MinidalleError):
        return str(exc), exc.exit_code
    if isinstance(exc, OSError):
        return _os_error_line(exc), 2
    if is_allocation_failure(exc):
        first = " ".join(str(exc).split())
        detail = first[first.find("you tried"):] if "you tried" in first else first[:160]
        return (f"out of memory ({detail}): use a smaller model.dim, model.depth, "
                "model.text_seq_len, batch size or --num-images"), 2
    if isinstance(exc, UnicodeError):
        return f"text that is not valid UTF-8: {exc}", 2
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    return (f"internal error ({type(exc).__name__}: {first}); rerun with `minidalle --debug ...` "
            "for the traceback and please report it"), 1
