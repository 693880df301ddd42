"""Errors users see: each message states the cause and the fix on one line.

Imports nothing from ptqtp. The CLI prints `str(err)` of any `PtqtpError` and exits non-zero, so messages
must be complete sentences that make sense without a traceback.
"""


class PtqtpError(Exception):
    """Base class: anything raised on purpose for bad input or environment."""

    exit_code = 2


class BadOptionError(PtqtpError, ValueError):
    """An option value is out of range or malformed."""


class NonFiniteWeightError(PtqtpError, ValueError):
    """A weight holds NaN or Inf (a ValueError too, as the solver's contract promises)."""


class ModelNotFoundError(PtqtpError, FileNotFoundError):
    """The model id or path does not exist, or the hub cannot be reached."""


class UnsupportedCheckpointError(PtqtpError):
    """The checkpoint has no safetensors, is already quantized, or has an architecture we cannot handle."""


class CorruptCheckpointError(PtqtpError):
    """A file is truncated, corrupted, or disagrees with its config."""


class FormatVersionError(PtqtpError):
    """A ptqtp checkpoint was written by a newer format version than this ptqtp reads."""


class OutputExistsError(PtqtpError, FileExistsError):
    """The output directory exists and neither --resume nor --overwrite was given."""


class DiskFullError(PtqtpError, OSError):
    """Writing the output ran out of space."""


class OutputNotWritableError(PtqtpError, OSError):
    """The output directory cannot be written (read-only filesystem, no permission)."""


class OutputBusyError(PtqtpError):
    """Another ptqtp run holds the lock on the output directory."""


class NoBackendError(PtqtpError, RuntimeError):
    """No kernel backend can run the requested op; the message lists every backend's reason."""


class DependencyVersionError(PtqtpError, ImportError):
    """An installed dependency (e.g. transformers) has a version whose API ptqtp does not support."""
