"""Picking the error that matters out of an exception group (a task group's failure)."""

from __future__ import annotations

import anyio

__all__ = ["leaf_exceptions", "first_error"]


def leaf_exceptions(group: BaseExceptionGroup) -> list[BaseException]:
    """The group's exceptions that are not groups, nested ones flattened, each once, in order."""
    out: list[BaseException] = []
    for exc in group.exceptions:
        for leaf in leaf_exceptions(exc) if isinstance(exc, BaseExceptionGroup) else [exc]:
            if not any(leaf is seen for seen in out):
                out.append(leaf)
    return out


def first_error(group: BaseExceptionGroup,
                prefer: tuple[type[BaseException], ...] = (KeyboardInterrupt, Exception)) -> BaseException:  # fmt: skip
    """The first leaf of each kind in ``prefer`` in turn, then any leaf but a cancellation,
    then a cancellation; the group itself if it has no leaves."""
    leaves = leaf_exceptions(group)
    cancelled = anyio.get_cancelled_exc_class()
    for kind in prefer:
        for exc in leaves:
            if isinstance(exc, kind) and not isinstance(exc, cancelled):
                return exc
    for exc in leaves:
        if not isinstance(exc, cancelled):
            return exc
    return leaves[0] if leaves else group
