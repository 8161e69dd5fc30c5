"""Unwrapping trio's exception groups where one task's failure ends a nursery."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import trio


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


@contextmanager
def single_error() -> Iterator[None]:
    """Re-raise a nursery's failure as one plain exception.

    When one task of a session fails, its siblings are cancelled; callers want to
    ``except LinkError`` etc., not exception groups. Two tasks can also fail in the
    same tick (a dead peer breaks the reader and the writer at once): then the most
    telling error is raised — anything before a plain broken link — with the group
    kept as its context.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        real = [e for e in _leaves(group) if not isinstance(e, trio.Cancelled)]
        if not real:
            raise
        from protocol.runtime.stream import LinkError

        real.sort(key=lambda e: isinstance(e, LinkError))
        raise real[0] from (group if len(real) > 1 else None)
