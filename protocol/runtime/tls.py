"""Optional TLS between the agents, under the frame stream and the key handshake.

Mutual TLS with verified peers (DESIGN §4): the source checks that the target's
certificate is signed by its ``tls_ca`` and carries the expected name
(``tls_server_name``, default the host of ``target``); the target requires a client
certificate signed by its own ``tls_ca``. TLS 1.2 is the floor, 1.3 is preferred
(OpenSSL negotiates the highest both ends know). The pre-shared-key handshake still
runs inside TLS, so a stolen certificate alone does not let anyone in.

Two boundaries, each translating what it meets into one error type:

* loading (:func:`client_context`, :func:`server_context`) happens once, at start or
  on the first connection, and raises :class:`TLSConfigError` naming the config key,
  the file and the problem (missing file, not PEM, key not matching the certificate);
* handshaking (:func:`client_stream`, :func:`server_stream`) raises
  :class:`TLSHandshakeError` (a :class:`LinkError`) saying who and why, e.g. "TLS
  handshake with 127.0.0.1:7100 failed: certificate verify failed (unable to get
  local issuer certificate: the certificate is not signed by the CA in tls_ca)", or a
  plain :class:`LinkError` when the link broke or timed out (temporary).

A peer on the other protocol (plaintext vs TLS) is recognised by the first byte it
sends: every TLS connection starts with a handshake record (content type 22), and a
Mirrorline frame starts with the magic ``ML``. :func:`server_stream` raises
:class:`PlaintextPeerError` before reading anything, so the caller can still answer
the plaintext source with an ERROR frame it understands.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator

import trio

from protocol.runtime.stream import LinkError

HANDSHAKE_TIMEOUT = 15.0
#: A TLS record of type "handshake" (RFC 8446 §5.1): how every ClientHello starts.
TLS_HANDSHAKE_RECORD = 0x16
_MAX_PEM_BYTES = 1024 * 1024

TLSStream = trio.SSLStream[trio.abc.Stream]


class TLSConfigError(Exception):
    """A TLS file named in the config is missing, unreadable, not PEM, or does not fit."""


class TLSHandshakeError(LinkError):
    """The TLS handshake with a peer failed: refused certificate, wrong CA or name,
    or a peer that does not speak TLS. Needs an operator, unlike a broken link."""


class PlaintextPeerError(TLSHandshakeError):
    """A TLS listener's peer sent something other than a TLS handshake (a source
    without ``tls = true``). Nothing was read or written yet."""


# -- contexts -------------------------------------------------------------------------

def client_context(ca: str | None, cert: str | None, key: str | None) -> ssl.SSLContext:
    """The source side's context: verify the target against ``ca`` (and its name),
    present ``cert``/``key``.

    Raises:
        TLSConfigError: naming the key (tls_ca, tls_cert, tls_key), file and problem.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)   # CERT_REQUIRED, check_hostname
    _configure(ctx, ca, cert, key)
    return ctx


def server_context(ca: str | None, cert: str | None, key: str | None) -> ssl.SSLContext:
    """The target side's context: present ``cert``/``key``, require a client
    certificate signed by ``ca``.

    Raises:
        TLSConfigError: naming the key (tls_ca, tls_cert, tls_key), file and problem.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.verify_mode = ssl.CERT_REQUIRED
    _configure(ctx, ca, cert, key)
    return ctx


def _configure(ctx: ssl.SSLContext, ca: str | None, cert: str | None,
               key: str | None) -> None:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ca = _check_pem("tls_ca", ca, b"-----BEGIN CERTIFICATE-----", "PEM certificate")
    cert = _check_pem("tls_cert", cert, b"-----BEGIN CERTIFICATE-----", "PEM certificate")
    key = _check_pem("tls_key", key, b"PRIVATE KEY-----", "PEM private key")
    try:
        ctx.load_verify_locations(cafile=ca)
    except ssl.SSLError as exc:
        raise TLSConfigError(f"tls_ca {ca}: not a valid PEM certificate "
                             f"({_reason(exc)})") from exc
    try:   # the certificate alone first, so a bad one is not blamed on the key
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=cert)
    except ssl.SSLError as exc:
        raise TLSConfigError(f"tls_cert {cert}: not a valid PEM certificate "
                             f"({_reason(exc)})") from exc
    try:
        ctx.load_cert_chain(cert, key, password=_no_passphrase)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise TLSConfigError(f"tls_key {key} does not belong to the certificate in "
                                 f"tls_cert {cert} (key values mismatch)") from exc
        raise TLSConfigError(f"tls_key {key}: not a valid PEM private key for tls_cert "
                             f"{cert} ({_reason(exc)})") from exc


def _no_passphrase() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal for a passphrase.
    raise TLSConfigError("the key is protected by a passphrase")


def _check_pem(name: str, path: str | None, marker: bytes, what: str) -> str:
    """Read ``path`` once to turn "missing", "unreadable" and "not PEM" into messages
    naming the config key and file (OpenSSL would say "[SSL] PEM lib")."""
    if not path:
        raise TLSConfigError(f"tls = true needs {name} (the path of a {what} file)")
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_PEM_BYTES)
    except OSError as exc:
        raise TLSConfigError(f"{name} {path}: {exc.strerror or exc}") from exc
    if b"-----BEGIN " not in data:
        raise TLSConfigError(f"{name} {path}: not a PEM file (no '-----BEGIN' line)")
    if marker not in data:
        raise TLSConfigError(f"{name} {path}: holds no {what}")
    if name == "tls_key" and b"ENCRYPTED" in data:
        raise TLSConfigError(f"{name} {path}: the key is protected by a passphrase; the "
                             "agents need it unencrypted (keep the file mode 600)")
    return path


# -- handshakes -----------------------------------------------------------------------

async def client_stream(tcp: trio.abc.Stream, ctx: ssl.SSLContext, server_name: str, *,
                        peer: str | None = None,
                        handshake_timeout: float = HANDSHAKE_TIMEOUT) -> TLSStream:
    """TLS over ``tcp`` as the client, handshake done.

    Args:
        tcp: the connected transport; the caller keeps owning it (and closes it on error).
        ctx: from :func:`client_context`.
        server_name: the name the target's certificate must carry (a host name or IP).
        peer: how to name the target in messages (default ``server_name``).
        handshake_timeout: bound on the handshake (seconds).

    Raises:
        TLSHandshakeError: the target's certificate was refused or the target refused
            ours, or the target does not speak TLS.
        LinkError: the link broke or the handshake timed out (temporary).
    Cancellation: safe; the transport is left for the caller to close.
    """
    stream = trio.SSLStream(tcp, ctx, server_hostname=server_name)
    await _handshake(stream, f"TLS handshake with {peer or server_name}",
                     handshake_timeout, side="client")
    return stream


async def server_stream(tcp: trio.abc.Stream, ctx: ssl.SSLContext, *, peer: str = "?",
                        handshake_timeout: float = HANDSHAKE_TIMEOUT) -> TLSStream:
    """TLS over an accepted ``tcp`` as the server, client certificate verified.

    Args:
        tcp: the accepted transport; the caller keeps owning it.
        ctx: from :func:`server_context`.
        peer: "host:port" of the client, for messages.
        handshake_timeout: bound on the wait for the first byte plus the handshake
            (seconds).

    Raises:
        PlaintextPeerError: the client did not start TLS; nothing has been read, so the
            caller may answer with a plaintext ERROR frame.
        TLSHandshakeError: the client's certificate was refused, or it refused ours.
        LinkError: the client closed or broke the link, or was too slow (temporary).
    Cancellation: safe; the transport is left for the caller to close.
    """
    what = f"TLS handshake from {peer}"
    with trio.move_on_after(handshake_timeout) as scope:
        first = await first_byte(tcp)
    if scope.cancelled_caught:
        raise LinkError(f"{what}: nothing received for {handshake_timeout:.0f} s")
    if first is not None and first != TLS_HANDSHAKE_RECORD:
        raise PlaintextPeerError(
            f"{what} failed: the source did not start TLS, and this target has tls = true "
            "(set tls = true with tls_ca, tls_cert and tls_key on the source's connection)")
    stream = trio.SSLStream(tcp, ctx, server_side=True)
    await _handshake(stream, what, handshake_timeout, side="server")
    return stream


async def first_byte(stream: trio.abc.Stream) -> int | None:
    """Peek at the first byte a peer sent on a socket stream, without consuming it.

    None when it cannot be known without reading (not a socket stream).

    Raises:
        LinkError: the peer closed or reset the connection before sending anything.
    """
    if not isinstance(stream, trio.SocketStream):
        return None
    try:
        data = await stream.socket.recv(1, socket.MSG_PEEK)
    except OSError as exc:
        raise LinkError(f"connection failed before the first byte: {exc}") from exc
    if not data:
        raise LinkError("peer closed the connection before sending anything")
    return data[0]


async def _handshake(stream: TLSStream, what: str, handshake_timeout: float,
                     side: str) -> None:
    try:
        with trio.fail_after(handshake_timeout):
            await stream.do_handshake()
    except trio.TooSlowError:
        raise LinkError(f"{what} timed out after {handshake_timeout:.0f} s") from None
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        await _send_alert(stream)
        raise handshake_error(exc, what, side) from exc


async def _send_alert(stream: TLSStream) -> None:
    """Send the alert OpenSSL wrote when the handshake failed (trio drops it), so the
    peer's error says why ("tlsv1 alert unknown ca") instead of "closed". Best effort,
    bounded; relies on trio's private outgoing BIO and does nothing without it."""
    outgoing = getattr(stream, "_outgoing", None)
    if not isinstance(outgoing, ssl.MemoryBIO):
        return
    data = outgoing.read()
    if data:
        with trio.move_on_after(1):
            try:
                await stream.transport_stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError,
                    trio.BusyResourceError, OSError):
                pass


async def close_gracefully(tcp: trio.abc.Stream, last: bytes = b"",
                           linger: float = 1.0) -> None:
    """Send ``last`` (an ERROR frame), end our side, drop what the peer still sends for
    up to ``linger`` seconds, then close.

    Closing a socket with unread input sends a reset, and the peer's kernel may then
    drop what we sent last before it is read: the ERROR after a peeked plaintext HELLO,
    or the alert refusing a client certificate, which TLS 1.3 sends after the client's
    handshake is over and it is already sending. Never raises (but Cancelled).
    """
    with trio.move_on_after(linger):
        try:
            if last:
                await tcp.send_all(last)
            if isinstance(tcp, trio.abc.HalfCloseableStream):
                await tcp.send_eof()
            while await tcp.receive_some(64 * 1024):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError,
                OSError):
            pass
    await trio.aclose_forcefully(tcp)


def handshake_error(exc: BaseException, what: str, side: str) -> LinkError:
    """The error to raise for ``exc`` met during (or right after) a TLS handshake.

    An SSL error anywhere in ``exc``'s cause chain gives a :class:`TLSHandshakeError`
    saying what went wrong and what to check; anything else is a broken link. ``side``
    is "client" (the source) or "server" (the target), to word the hints.
    """
    ssl_exc = _ssl_error(exc)
    if ssl_exc is None:
        return LinkError(f"{what} failed: the connection broke ({exc or type(exc).__name__})")
    return TLSHandshakeError(f"{what} failed: {describe_ssl_error(ssl_exc, side)}")


def describe_ssl_error(exc: ssl.SSLError, side: str) -> str:
    """One line for an operator: OpenSSL's words plus what to check."""
    peer_role = "target" if side == "client" else "source"
    if isinstance(exc, ssl.SSLCertVerificationError):
        text = f"certificate verify failed ({exc.verify_message}"
        hint = _VERIFY_HINTS.get(exc.verify_code)
        return f"{text}: {hint})" if hint else f"{text})"
    reason = exc.reason or ""
    words = reason.lower().replace("_", " ") or str(exc)
    if isinstance(exc, ssl.SSLEOFError) or reason in ("UNEXPECTED_EOF_WHILE_READING",):
        return (f"the {peer_role} closed the connection during the handshake (is it set "
                f"up for TLS, and does it trust this side's certificate?)")
    if reason in ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNKNOWN_PROTOCOL",
                  "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG"):
        return f"{words}: the {peer_role} does not speak TLS (is tls = true set on both sides?)"
    if reason in ("TLSV1_ALERT_UNKNOWN_CA", "SSLV3_ALERT_BAD_CERTIFICATE",
                  "SSLV3_ALERT_CERTIFICATE_UNKNOWN", "TLSV13_ALERT_CERTIFICATE_REQUIRED",
                  "SSLV3_ALERT_CERTIFICATE_EXPIRED", "TLSV1_ALERT_DECRYPT_ERROR"):
        return (f"the {peer_role} refused this side's certificate ({words}; is it signed by "
                f"the CA in the {peer_role}'s tls_ca?)")
    if reason in ("PEER_DID_NOT_RETURN_A_CERTIFICATE", "NO_CERTIFICATE_RETURNED"):
        return f"the {peer_role} presented no certificate ({words})"
    if reason in ("UNSUPPORTED_PROTOCOL", "TLSV1_ALERT_PROTOCOL_VERSION",
                  "NO_PROTOCOLS_AVAILABLE"):
        return f"no common TLS version ({words}; TLS 1.2 or later is required)"
    return words


#: OpenSSL X509_V_ERR_* codes seen with misconfigured peers, and what to check.
_VERIFY_HINTS = {
    2: "the certificate is not signed by the CA in tls_ca",    # unable to get issuer cert
    10: "renew the peer's certificate",                         # certificate has expired
    9: "the peer's certificate is not valid yet (check the clocks)",
    18: "the peer's certificate is self-signed and not in tls_ca",
    19: "the certificate is not signed by the CA in tls_ca",   # self-signed in chain
    20: "the certificate is not signed by the CA in tls_ca",   # unable to get local issuer
    21: "the certificate is not signed by the CA in tls_ca",   # unable to verify leaf
    62: "set tls_server_name to a name in the target's certificate",   # hostname mismatch
    64: "set tls_server_name to a name in the target's certificate",   # IP mismatch
}


def _ssl_error(exc: BaseException) -> ssl.SSLError | None:
    for link in _chain(exc):
        if isinstance(link, ssl.SSLError):
            return link
    return None


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _reason(exc: ssl.SSLError) -> str:
    return (exc.reason or str(exc)).lower().replace("_", " ")
