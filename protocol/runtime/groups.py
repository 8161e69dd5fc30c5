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
    """Re-raise the one real error of a nursery's exception group as itself.

    When sibling tasks were cancelled because one failed, the group holds that one
    error plus Cancelled; callers want to ``except LinkError`` etc., not groups.
    Groups with several real errors are re-raised unchanged.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        real = [e for e in _leaves(group) if not isinstance(e, trio.Cancelled)]
        if len(real) == 1:
            raise real[0] from None
        raise
