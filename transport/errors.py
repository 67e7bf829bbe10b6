"""Who broke the protocol: this side (LocalProtocolError) or the peer (RemoteProtocolError).

Events and checks raise LocalProtocolError ("you may not do that"). The one entry point for peer
bytes, `Connection.next_event`, turns any of them into RemoteProtocolError ("the peer did that"),
keeping the message, and moves the connection to ERROR for good.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Base of both: the message names the problem (the field, the value, the bound)."""


class LocalProtocolError(ProtocolError):
    """This side misused the protocol: an invalid event, or an event not allowed in this state.

    Nothing was sent and the connection's state did not change: the caller may go on.
    """


class RemoteProtocolError(ProtocolError):
    """The peer's bytes broke the protocol. The connection is in ERROR: close it."""
