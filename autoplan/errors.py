"""The errors autoplan raises for user mistakes: all are ValueErrors (SPEC "Errors").

>>> issubclass(TraceError, ValueError), issubclass(InfeasibleError, AutoplanError)
(True, True)
"""

from __future__ import annotations


class AutoplanError(ValueError):
    """A user mistake autoplan can name: the message names the field and shows the arithmetic."""


class TraceError(AutoplanError):
    """The model cannot be traced or profiled on meta tensors, or its trace misses part of it."""


class InfeasibleError(AutoplanError):
    """No plan fits the cluster; the message names the smallest memory per device any plan needs."""
