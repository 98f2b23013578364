"""User-facing errors: the CLI prints their message on one line and exits 2."""


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
