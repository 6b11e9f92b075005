"""One exception hierarchy for torchdkm.

Every error torchdkm raises on purpose is a :class:`TorchDKMError`; configuration mistakes are also
``ValueError`` so generic handlers still catch them, and artifact problems are :class:`FormatError`. A missing
optional package is also an ``ImportError``, a missing data file also a ``FileNotFoundError``.
"""


class TorchDKMError(Exception):
    """Base class of every error raised by torchdkm."""


class ConfigError(TorchDKMError, ValueError):
    """A configuration, rule or argument is not allowed; the message says what was given and what is allowed."""


class FormatError(TorchDKMError, ValueError):
    """A torchdkm artifact (or a dataset file) is not readable: not a torchdkm file, a newer format, truncated or corrupted."""


class MissingDependencyError(TorchDKMError, ImportError):
    """An optional package is not installed; the message gives the pip command that installs it."""


class DataNotFoundError(TorchDKMError, FileNotFoundError):
    """A dataset's files are not where they were looked for; the message says where and how to install them."""


class NonFiniteError(TorchDKMError, FloatingPointError):
    """A weight, centroid or loss became NaN/inf during training; the message names the layer (and, from the
    ``torchdkm compress`` job, the step)."""


class WriteError(TorchDKMError, OSError):
    """A file could not be written (a full disk, no permission, ...); the message names the path and the cause.
    The previous file at that path, if any, is left as it was."""


class DistributedError(TorchDKMError, RuntimeError):
    """A multi-process run lost a rank: it stopped answering within ``distributed.timeout_s`` or died; the message
    says where the run stopped and which checkpoint it can resume from."""
