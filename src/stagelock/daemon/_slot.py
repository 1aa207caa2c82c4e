"""A bounded latest-wins hand-over between a producer and one consumer thread."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Generic, TypeVar

if TYPE_CHECKING:
    from collections.abc import Callable, Hashable

__all__ = ["KeyedLatestSlot", "LatestSlot", "SlotClosed"]

T = TypeVar("T")


class SlotClosed(Exception):
    """Raised by :meth:`LatestSlot.get` once the slot is closed and empty."""


class KeyedLatestSlot(Generic[T]):
    """Holds at most one item *per key*; a new item replaces an unread one of its key.

    For multi-position acquisitions: every position's lock frame matters (each
    position is visited once per time point), so a frame never replaces another
    position's; memory stays bounded by the number of positions. :meth:`get`
    returns the oldest waiting item. Same interface as :class:`LatestSlot`.

    Parameters
    ----------
    key : callable
        ``key(item)``, hashable (e.g. the frame's position).
    """

    def __init__(self, key: Callable[[T], Hashable]) -> None:
        self._key = key
        self._cond = threading.Condition()
        self._items: dict[Hashable, T] = {}
        self._closed = False
        self._skipped_since_get = 0
        self.skipped_total = 0
        """Items replaced before the consumer read them, since creation."""
        self.put_total = 0
        """Items offered to :meth:`put`, since creation."""

    def put(self, item: T) -> bool:
        """Store ``item``, replacing an unread one of the same key.

        Returns
        -------
        bool
            True when an unread item was replaced (it counts as skipped).
        """
        key = self._key(item)
        with self._cond:
            self.put_total += 1
            if self._closed:
                return False
            replaced = key in self._items
            if replaced:
                del self._items[key]
                self._skipped_since_get += 1
                self.skipped_total += 1
            self._items[key] = item
            self._cond.notify()
            return replaced

    def get(self, timeout_s: float | None = None) -> tuple[T, int] | None:
        """Take the oldest waiting item, waiting up to ``timeout_s``.

        Returns
        -------
        (item, skipped) or None
            The item and how many items were replaced since the previous
            ``get``; None on timeout.

        Raises
        ------
        SlotClosed
            When the slot is closed and empty.
        """
        with self._cond:
            if not self._items and not self._closed:
                self._cond.wait(timeout_s)
            if self._items:
                key = next(iter(self._items))
                item = self._items.pop(key)
                skipped, self._skipped_since_get = self._skipped_since_get, 0
                self._cond.notify_all()  # a producer may wait in wait_taken
                return item, skipped
            if self._closed:
                raise SlotClosed
            return None

    def wait_taken(self, timeout_s: float | None = None) -> bool:
        """Wait until the consumer took every unread item (see LatestSlot)."""
        with self._cond:
            if self._items and not self._closed:
                self._cond.wait(timeout_s)
            return not self._items or self._closed

    @property
    def _has_item(self) -> bool:
        # the LatestSlot attribute some callers (tests) look at
        with self._cond:
            return bool(self._items)

    def clear(self) -> int:
        """Drop every unread item (not counted as skipped); return how many."""
        with self._cond:
            dropped = len(self._items)
            self._items.clear()
            return dropped

    def close(self) -> None:
        """Refuse new items and wake a waiting consumer; idempotent."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed


class LatestSlot(KeyedLatestSlot[T]):
    """Holds at most one item; a new item replaces an unread one.

    The producer (a camera or folder thread) never waits: :meth:`put` stores the
    item and returns at once. When the consumer is slower than the producer, the
    older unread item is dropped and counted, so the consumer always measures the
    newest frame and memory stays bounded (one frame), unlike an unbounded queue.

    States: open → closed (:meth:`close`). After closing, :meth:`put` drops items
    and :meth:`get` returns what is left, then raises :class:`SlotClosed`.
    """

    def __init__(self) -> None:
        # every item has the same key: one waiting item in all
        super().__init__(_one_key)


def _one_key(item: object) -> None:
    return None
