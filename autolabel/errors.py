"""One exception hierarchy for autolabel.

Every error names the file, sequence or store it is about and says what to do. Each class also
subclasses the builtin a caller would expect (``FileNotFoundError``, ``ValueError``...), so
generic handlers keep working.
"""

from __future__ import annotations


class AutolabelError(Exception):
    """Base class of every error autolabel raises on purpose."""


# --- input data -------------------------------------------------------------------------------


class InputDataError(AutolabelError, ValueError):
    """A source file or directory cannot be used as given."""


class UnknownLayoutError(InputDataError):
    """The source directory does not look like the requested dataset layout."""


class ImageReadError(InputDataError):
    """An image or label file is missing, unreadable or corrupt."""


class SizeMismatchError(InputDataError):
    """A frame and its label (or two frames of one sequence) differ in size."""


class LabelValueError(InputDataError):
    """A label holds class ids outside the class set (other than the ignore index)."""


class EmptySequenceError(InputDataError):
    """A sequence has no frames."""


class ClassSetMismatchError(InputDataError):
    """Data with one class set was sent to a store that holds another."""


# --- store --------------------------------------------------------------------------------------


class StoreError(AutolabelError):
    """Something is wrong with a sequence store."""


class StoreNotFoundError(StoreError, FileNotFoundError):
    """No autolabel store exists at the given path or URL."""


class SchemaVersionError(StoreError, ValueError):
    """The store was written with a schema version this code does not read."""


class InvalidSequenceIdError(StoreError, ValueError):
    """A sequence id is empty, too long, or would escape the store root."""


class SequenceNotFoundError(StoreError, KeyError):
    """The store has no (complete) sequence with this id."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class StageNotDoneError(StoreError, RuntimeError):
    """A stage's output was asked for before that stage finished."""


class NotAnnotatedError(StoreError, LookupError):
    """A manual annotation was asked for on a frame that has none."""


class LeaseHeldError(StoreError, RuntimeError):
    """Another run holds the lease on a sequence stage (and waiting for it timed out)."""


class LeaseLostError(StoreError, RuntimeError):
    """This run's lease on a sequence stage expired and was taken over; nothing was published."""


class IdCollisionError(InputDataError):
    """Two sources map to the same sequence id."""


class IntegrityError(StoreError, ValueError):
    """Stored data is missing or corrupt (a chunk deleted or truncated, say)."""


class StoreWriteError(StoreError, OSError):
    """The store cannot be written (read-only, a file in the way, disk or file size limit full)."""


# --- models -------------------------------------------------------------------------------------


class ShapeError(AutolabelError, ValueError):
    """A tensor does not have the dimensions an operation expects."""


class CheckpointError(AutolabelError, ValueError):
    """A model checkpoint is missing, corrupt, or does not fit the data."""


class TeacherFormatError(CheckpointError):
    """An exported teacher (``.pt2`` / ``.onnx``) or its JSON sidecar cannot be used as given."""


class ClassMapError(ClassSetMismatchError):
    """A class mapping file does not fit the teacher's or the store's class list."""


class FlowError(AutolabelError, RuntimeError):
    """Optical flow could not be computed (a worker process died, say)."""


class RenderError(AutolabelError, RuntimeError):
    """Synthetic drives could not be rendered (a render worker process died, say)."""


class MissingDependencyError(AutolabelError, ImportError):
    """An optional package (torchvision for RAFT, say) is needed but not installed."""


# --- configuration ------------------------------------------------------------------------------


class ConfigError(AutolabelError):
    """A setting or option is invalid.

    Deliberately not a ValueError: pydantic wraps ValueErrors raised in validators into its own
    ValidationError, while this error passes through unchanged with its message.
    """


class SelectionError(ConfigError, LookupError):
    """A sequence id or glob pattern (``--sequence``) matches no sequence."""


class RegistryError(ConfigError, KeyError):
    """A name was looked up in a registry that does not hold it."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def storage_refuses_writes(exc: OSError) -> bool:
    """True when ``exc`` says the storage takes no more writes (disk full, quota, ``ulimit -f``,
    read-only): the fault of where autolabel writes, not of the input it was reading."""
    import errno

    return exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)


def describe_os_error(exc: OSError) -> str:
    """An OSError as one line naming the file and the likely fix (disk full, ``ulimit -f``...)."""
    import errno

    hints = {errno.ENOSPC: "the disk is full; free some space and run again",
             errno.EFBIG: "the file size limit (ulimit -f) is reached; raise it",
             errno.EACCES: "permission denied; fix the permissions",
             errno.EPERM: "operation not permitted; fix the permissions",
             errno.EROFS: "the file system is read-only",
             errno.EDQUOT: "the disk quota is exhausted; free some space or raise the quota"}
    where = f" ({exc.filename})" if exc.filename else ""
    return f"{exc.strerror or exc}{where}: {hints.get(exc.errno or 0, 'check the storage and run again')}"
