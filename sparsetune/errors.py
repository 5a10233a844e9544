"""One exception family for every input sparsetune refuses.

Every error is a :class:`SparsetuneError` and also a standard ``ValueError`` or ``KeyError``, so
callers that already catch those keep working. Messages name the parameter, the value received
and what is allowed.
"""

from __future__ import annotations

__all__ = [
    "CurvatureError",
    "FileFormatError",
    "FileWriteError",
    "InvalidArgumentError",
    "InvalidMaskError",
    "InvalidScoresError",
    "ParameterMismatchError",
    "SparsetuneError",
    "StateMismatchError",
]


class SparsetuneError(Exception):
    """Base class of every error raised by sparsetune on bad input."""


class InvalidArgumentError(SparsetuneError, ValueError):
    """A scalar argument is outside its allowed range (density, learning rate, scope, ...)."""


class InvalidScoresError(SparsetuneError, ValueError):
    """Scores are not finite floating-point tensors."""


class InvalidMaskError(SparsetuneError, ValueError):
    """A mask tensor has the wrong dtype or shape, or two masks cannot be combined."""


class StateMismatchError(SparsetuneError, ValueError):
    """An optimizer state was saved with another mask, or lacks the mask fingerprint."""


class CurvatureError(SparsetuneError, ValueError):
    """A curvature estimate is not finite, or an eigenvalue solver did not converge.

    The message names the parameter (or the solver setting) concerned.
    """


class FileFormatError(SparsetuneError, ValueError):
    """A file is not a sparsetune file of the expected kind and version, or is damaged."""


class FileWriteError(SparsetuneError, OSError):
    """A file could not be written: the message names the target and the reason.

    Also an ``OSError`` (``errno`` set where known), so callers that catch those keep working.
    """


class ParameterMismatchError(SparsetuneError, KeyError):
    """Names in a mask (or scores) do not match the parameters of a model.

    The message lists every unexpected, missing and mis-shaped name at once.
    """

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0]) if self.args else ""
