"""Exceptions raised by the secure-aggregation protocol.

The server treats a :class:`SecAggProtocolError` raised while reading one client's
message as that client dropping out; :class:`SecAggAbort` ends the round for everyone.
"""

from __future__ import annotations


class SecAggError(Exception):
    """Base class of every secure-aggregation error."""


class SecAggProtocolError(SecAggError):
    """A message was malformed, replayed, forged or out of place.

    ``node_id`` names the client the message came from (or was about), when known, so the
    server can count that client as dropped and go on with the others.
    """

    def __init__(self, reason: str, *, node_id: int | None = None) -> None:
        self.reason = reason
        self.node_id = node_id
        prefix = f"node {node_id}: " if node_id is not None else ""
        super().__init__(prefix + reason)


class SecAggAbort(SecAggError):
    """The round cannot finish without weakening the guarantee (too few survivors, ...)."""
