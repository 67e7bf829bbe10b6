"""Mutual TLS for peer links, the operator's alternative to the pre-shared key (DESIGN 6).

Both sides present a certificate signed by the configured CA and require one from the other.
Peers are addressed by IP as often as by name, so the hostname is not checked: trust comes from
the CA, which should sign migration peers only.
"""

from __future__ import annotations

import ssl

import trio

from .config import PeerConfig


def _context(peer: PeerConfig, purpose: ssl.Purpose) -> ssl.SSLContext:
    assert peer.tls_cert is not None and peer.tls_key is not None and peer.tls_ca is not None
    context = ssl.create_default_context(purpose, cafile=str(peer.tls_ca))
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(str(peer.tls_cert), str(peer.tls_key))
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(peer: PeerConfig) -> ssl.SSLContext:
    """For a blocking socket in a data stream's thread (the control link uses wrap_client)."""
    return _context(peer, ssl.Purpose.SERVER_AUTH)


def server_context(peer: PeerConfig) -> ssl.SSLContext:
    """For a data stream's thread (the control link uses wrap_server)."""
    context = _context(peer, ssl.Purpose.CLIENT_AUTH)
    # No TLS 1.3 session tickets after the handshake (sessions are never resumed here): a warm
    # data stream reads nothing until its migration, and its source takes bytes waiting on it
    # for a stream the target closed (migration/warmlinks.py).
    context.num_tickets = 0
    return context


async def wrap_client(stream: trio.SocketStream, peer: PeerConfig, host: str) -> trio.SSLStream[trio.SocketStream]:
    tls = trio.SSLStream(stream, _context(peer, ssl.Purpose.SERVER_AUTH), server_hostname=host)
    await tls.do_handshake()
    return tls


async def wrap_server(stream: trio.SocketStream, peer: PeerConfig) -> trio.SSLStream[trio.SocketStream]:
    tls = trio.SSLStream(stream, _context(peer, ssl.Purpose.CLIENT_AUTH), server_side=True)
    await tls.do_handshake()
    return tls
