"""One exception hierarchy for torchdkm.

Every error torchdkm raises on purpose is a :class:`TorchDKMError`; configuration mistakes are also
``ValueError`` so generic handlers still catch them, and artifact problems are :class:`FormatError`.
"""


class TorchDKMError(Exception):
    """Base class of every error raised by torchdkm."""


class ConfigError(TorchDKMError, ValueError):
    """A configuration, rule or argument is not allowed; the message says what was given and what is allowed."""


class FormatError(TorchDKMError, ValueError):
    """A torchdkm artifact is not readable: not a torchdkm file, a newer format, truncated or corrupted."""
