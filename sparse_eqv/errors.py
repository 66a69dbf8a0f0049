"""Errors that reach the user: each names the file, the frame and the problem."""


class SparseEqvError(Exception):
    """Base class of every error the CLI reports as a one-line message."""


class DataError(SparseEqvError):
    """Bad input data (missing labels, NaN, unknown element, wrong shape)."""


class CheckpointError(SparseEqvError):
    """A checkpoint that cannot be read, is of another kind, or is not trusted."""


class UnsupportedModelError(SparseEqvError):
    """A model option outside what the Flax implementation reproduces."""


class DownloadError(SparseEqvError):
    """A file that could not be downloaded whole (no connection, HTTP error, truncated or corrupt)."""


def out_of_memory(error: BaseException) -> bool:
    """Whether `error` is XLA's RESOURCE_EXHAUSTED (an allocation failed on the device or host)."""
    return "RESOURCE_EXHAUSTED" in str(error)
