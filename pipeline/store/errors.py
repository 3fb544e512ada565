"""The lineage store's errors: each message is one line meant for the user."""
from __future__ import annotations


class StoreError(Exception):
    """A lineage database problem; the message is one line meant for the user."""


class UnknownRun(StoreError, LookupError):
    pass


class UnknownCandidate(StoreError, LookupError):
    pass


class SchemaOutOfDate(StoreError):
    """The database's schema is not the one this code expects (older, newer, or none
    yet). Query paths never migrate: they say so; `selfprog-cli db upgrade` fixes it."""
