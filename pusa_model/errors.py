"""Errors raised for requests the model cannot serve."""

from __future__ import annotations


class InvalidRequest(ValueError):
    """A request field is invalid; `field` names it and `reason` says why."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason

    def __reduce__(self):  # picklable, so that it crosses process boundaries (Ray) whole
        return type(self), (self.field, self.reason)


class ConfigError(ValueError):
    """The deployment is misconfigured: an unknown preset, a missing model source."""
