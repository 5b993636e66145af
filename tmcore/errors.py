"""The tmcore error hierarchy: every user-facing failure is a `TmcoreError`."""

from __future__ import annotations

__all__ = [
    "TmcoreError",
    "UnknownReducerError",
    "NoAdapterError",
    "UnsupportedModelError",
    "InvalidConfigError",
    "AlreadyAppliedError",
    "NotAppliedError",
    "PluginError",
    "IncompatibleVersionError",
    "InvalidInputError",
    "InvalidFileError",
    "TraceError",
    "PluginLoadWarning",
    "ScheduleClampWarning",
]


class TmcoreError(Exception):
    """Base class of every error tmcore raises on purpose."""


class UnknownReducerError(TmcoreError, KeyError):
    """A reducer name that no installed plugin registers."""

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0]) if self.args else ""


class NoAdapterError(TmcoreError, TypeError):
    """No installed adapter can patch this model."""


class UnsupportedModelError(TmcoreError, TypeError):
    """An adapter handles the model, but the reducer cannot run on it (e.g. it needs a class token)."""


class InvalidConfigError(TmcoreError, ValueError):
    """A reducer configuration value is out of range, of the wrong type, or unknown."""


class AlreadyAppliedError(TmcoreError, RuntimeError):
    """`tmcore.apply` on a model that already carries a reducer (pass ``replace=True``)."""


class NotAppliedError(TmcoreError, RuntimeError):
    """An operation that needs a patched model got an unpatched one."""


class PluginError(TmcoreError, RuntimeError):
    """A plugin registered something invalid or a name twice."""


class IncompatibleVersionError(TmcoreError, RuntimeError):
    """The installed backbone library is outside the range an adapter supports."""


class InvalidInputError(TmcoreError, ValueError):
    """A tensor handed to tmcore at run time does not fit (its shape, batch or length)."""


class InvalidFileError(InvalidConfigError):
    """A reducer file cannot be written or read: missing, unreadable, not a tmcore file, or its
    config / learned state is invalid."""


class TraceError(TmcoreError, RuntimeError):
    """A `tmcore.Trace` holds no complete forward to answer from."""


class PluginLoadWarning(UserWarning):
    """A plugin failed to import or register and was skipped."""


class ScheduleClampWarning(UserWarning):
    """A per-layer reduction asked for more than a layer can remove; it was capped."""
