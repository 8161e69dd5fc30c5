"""The few error types the protocol raises."""

from __future__ import annotations


class ProtocolError(Exception):
    """The peer sent something that breaks the protocol (bad frame, bad op, bad order).

    The receiving side answers ERROR and closes the session. ``code`` is a short
    machine-readable word sent in the ERROR frame.
    """

    def __init__(self, message: str, code: str = "protocol") -> None:
        super().__init__(message)
        self.code = code


class AuthenticationError(ProtocolError):
    """The peer could not prove it holds the shared key, or is not known at all."""

    def __init__(self, message: str, code: str = "auth") -> None:
        super().__init__(message, code)


class LocalProtocolError(Exception):
    """We tried to send something the protocol state does not allow (our bug)."""
