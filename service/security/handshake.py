"""A TLS handshake in memory: whether a client and a server configuration can talk, checked
before anything starts.

``embedserve cluster`` pairs certificates from several flags: the replicas serve
``--tls-cert``, which Envoy verifies against ``--upstream-ca`` for 127.0.0.1, and with
``--upstream-cert`` the replicas require Envoy's client certificate to be signed by that CA.
A wrong pairing does not get better by waiting, yet over the network it can look like a
replica that never becomes reachable: under TLS 1.3 a server refuses a client certificate
after the client considers the handshake done, and the client sees only a closed connection.
Here both ends run in one process over memory buffers, so a failure names the end that
refused. (This is OpenSSL through Python's ``ssl``; gRPC and Envoy use BoringSSL, which
verifies a chain, a name and a key pair the same way.)
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

# Enough round trips for any TLS 1.2 or 1.3 handshake, with client authentication.
_MAX_FLIGHTS = 8

End = Literal["client", "server"]


@dataclass(frozen=True)
class ServerEnd:
    cert: Path
    key: Path
    client_ca: Path | None = None  # clients must present a certificate this CA signed


@dataclass(frozen=True)
class ClientEnd:
    trusted_ca: Path
    server_name: str  # a host name or an IP address, checked against the server's certificate
    cert: Path | None = None
    key: Path | None = None


class UnusableEnd(ValueError):
    """An end that cannot be configured: a key that does not match its certificate, say."""

    def __init__(self, end: End, reason: str) -> None:
        super().__init__(reason)
        self.end: End = end
        self.reason = reason


@dataclass(frozen=True)
class HandshakeFailure:
    refused_by: End  # the end that rejected the other's certificate
    reason: str


def _lenient(context: ssl.SSLContext) -> ssl.SSLContext:
    # Python 3.13 turns on strict X.509 checks that BoringSSL does not make (an Authority Key
    # Identifier on every certificate, for one); a pairing the real ends accept must pass.
    context.verify_flags &= ~ssl.VERIFY_X509_STRICT
    return context


def _server_context(end: ServerEnd) -> ssl.SSLContext:
    context = _lenient(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    context.load_cert_chain(end.cert, end.key)
    if end.client_ca is not None:
        context.load_verify_locations(end.client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _client_context(end: ClientEnd) -> ssl.SSLContext:
    context = _lenient(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    context.load_verify_locations(end.trusted_ca)
    if end.cert is not None:
        context.load_cert_chain(end.cert, end.key)
    return context


def handshake(server: ServerEnd, client: ClientEnd) -> HandshakeFailure | None:
    """None when the two ends complete a handshake; else which end refused, and why.

    Raises UnusableEnd when an end cannot even be configured: a key that does not match its
    certificate, or a file that holds no certificate.
    """
    try:
        server_context = _server_context(server)
    except (ssl.SSLError, OSError) as exc:
        raise UnusableEnd("server", str(exc)) from exc
    try:
        client_context = _client_context(client)
    except (ssl.SSLError, OSError) as exc:
        raise UnusableEnd("client", str(exc)) from exc
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    from_client, from_server = ssl.MemoryBIO(), ssl.MemoryBIO()
    ends: tuple[tuple[End, ssl.SSLObject], ...] = (
        ("client", client_context.wrap_bio(to_client, from_client, False, client.server_name)),
        ("server", server_context.wrap_bio(to_server, from_server, True)),
    )
    done: dict[End, bool] = {"client": False, "server": False}
    for _ in range(_MAX_FLIGHTS):
        for name, end in ends:
            if not done[name]:
                try:
                    end.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLCertVerificationError as exc:
                    return HandshakeFailure(name, exc.verify_message or str(exc))
                except ssl.SSLError as exc:
                    return HandshakeFailure(name, exc.reason or str(exc))
            to_server.write(from_client.read())
            to_client.write(from_server.read())
        if all(done.values()):
            return None
    raise RuntimeError("the in-memory TLS handshake did not finish")
