"""Failed-login limiter: a peer address that keeps failing the handshake is shut out.

Theory of operation
-------------------
Every failed login (unknown source node, wrong proof, a proof the source refused)
is recorded against the peer's address with :meth:`LoginLimiter.failure`. When an
address has ``max_failures`` failures inside a sliding ``window`` of seconds it is
*blocked* for ``block`` seconds: :meth:`LoginLimiter.blocked` then answers at once,
so the listener refuses the connection before it reads a HELLO, reads a key file or
computes an HMAC — a flood costs the agent one dict lookup per attempt.

Logging stays bounded too: each failure before the block is logged by the caller
(one line per attempt, naming the peer and the reason); the block itself is one
line (:meth:`LoginLimiter.failure` returns True exactly once, when it starts);
attempts refused during the block are only counted, and one summary line per
address is returned by :meth:`LoginLimiter.expired` once the block is over.

A successful login from an address forgets its failures, so an operator fixing a
wrong key is not locked out for the rest of the window. Other addresses are never
affected. Memory is bounded: at most ``max_peers`` addresses are tracked (the
least recently failing one is forgotten first), each with at most ``max_failures``
timestamps.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

DEFAULT_MAX_FAILURES: Final = 10
DEFAULT_WINDOW: Final = 60.0
DEFAULT_BLOCK: Final = 300.0
DEFAULT_MAX_PEERS: Final = 4096


@dataclass
class _Peer:
    failures: deque[float] = field(default_factory=deque)
    blocked_until: float = 0.0
    refused: int = 0        # attempts refused during the current block


@dataclass(frozen=True)
class BlockSummary:
    """One address's block is over: how many attempts it had refused."""

    peer: str
    refused: int
    seconds: float


class LoginLimiter:
    """Count failed logins per peer address and block an address that fails too often.

    Args:
        max_failures: failures inside ``window`` that start a block (at least 1).
        window: seconds over which failures are counted.
        block: seconds a blocked address is refused without any check.
        max_peers: addresses tracked at most (memory bound).
        clock: monotonic seconds; tests pass a fake one.
    """

    def __init__(self, *, max_failures: int = DEFAULT_MAX_FAILURES,
                 window: float = DEFAULT_WINDOW, block: float = DEFAULT_BLOCK,
                 max_peers: int = DEFAULT_MAX_PEERS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_failures < 1 or window <= 0 or block <= 0 or max_peers < 1:
            raise ValueError("max_failures, window, block and max_peers must be positive")
        self.max_failures = max_failures
        self.window = window
        self.block = block
        self.max_peers = max_peers
        self._clock = clock
        self._peers: OrderedDict[str, _Peer] = OrderedDict()
        self._blocked: set[str] = set()
        #: Attempts refused while blocked, over the agent's life (for status).
        self.refused_total = 0

    def blocked(self, peer: str) -> float | None:
        """Seconds ``peer`` stays blocked (the attempt is counted as refused), or None.

        Costs one dict lookup: call it before any other work on a new connection.
        """
        state = self._peers.get(peer)
        if state is None:
            return None
        left = state.blocked_until - self._clock()
        if left <= 0:
            return None
        state.refused += 1
        self.refused_total += 1
        return left

    def failure(self, peer: str) -> bool:
        """Record a failed login from ``peer``; True when this failure starts a block."""
        now = self._clock()
        state = self._peers.pop(peer, None) or _Peer()
        self._peers[peer] = state            # most recently failing last
        if len(self._peers) > self.max_peers:
            # Forget the least recently failing address that is not blocked; with every
            # one blocked, forget this failure instead (blocks are never dropped).
            victim = next((p for p in self._peers if p != peer and p not in self._blocked),
                          peer)
            del self._peers[victim]
            if victim == peer:
                return False
        if state.blocked_until > now:
            return False
        state.failures.append(now)
        while state.failures and state.failures[0] <= now - self.window:
            state.failures.popleft()
        if len(state.failures) >= self.max_failures:
            state.failures.clear()
            state.blocked_until = now + self.block
            state.refused = 0
            self._blocked.add(peer)
            return True
        return False

    def success(self, peer: str) -> None:
        """``peer`` logged in: forget its failures."""
        if peer in self._blocked:       # its block is over: expired() reports it
            self._peers[peer].failures.clear()
        else:
            self._peers.pop(peer, None)

    def expired(self) -> list[BlockSummary]:
        """Blocks that are over since the last call, each reported once, then forgotten."""
        now = self._clock()
        over = [p for p in self._blocked if self._peers[p].blocked_until <= now]
        summaries = []
        for peer in over:
            self._blocked.discard(peer)
            state = self._peers.pop(peer)
            summaries.append(BlockSummary(peer=peer, refused=state.refused, seconds=self.block))
        return summaries

    def __len__(self) -> int:
        return len(self._peers)
