"""What the Mirrorline processes agree on: ops, frames, the handshake, control messages.

Sans-IO: nothing in this package (outside ``protocol.runtime``) imports trio or
touches a socket. Bytes go in, events come out; events go in, bytes come out.
"""
