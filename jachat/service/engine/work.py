"""One unit of model work, as the scheduler queues it: a generation (sequence.py) or a scoring job (scoring.py).

Both are model work, so both take the same road: the same queue and its limits, the same priorities and tenants'
fair shares, the same deadline, the same gauges, and a replica of the engine while they run. What a caller hears
of its work reaches its event loop through the loop's `Mailbox`; only the work itself posts there (its `finish`
and its results, each once), so no thread ever sets a future that its caller may have cancelled meanwhile.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

from jachat.service.domain.results import DEADLINE_SLACK, FinishReason, Priority

Item = Any  # what a work posts to its caller: its results, the error that ended it, or None (its end)


def _nothing() -> None:
    pass


class Mailbox:
    """Hand-offs from other threads to one event loop, batched: the first item posted since the loop last looked
    schedules one delivery, which takes every item posted until it runs (one self-pipe write per wake-up, not per
    token). One per loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._items: list[tuple[Work, Item]] = []
        self._lock = threading.Lock()

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> Mailbox:
        with _MAILBOXES_LOCK:
            box = _MAILBOXES.get(loop)
            if box is None:
                box = _MAILBOXES[loop] = cls(loop)
            return box

    def post(self, work: Work, item: Item) -> None:
        with self._lock:
            self._items.append((work, item))
            first = len(self._items) == 1
        if first and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            items, self._items = self._items, []
        for work, item in items:
            work.inbox.append(item)
            work.ready.set()


_MAILBOXES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Mailbox] = weakref.WeakKeyDictionary()
_MAILBOXES_LOCK = threading.Lock()


class Work:
    """What every queued unit of model work has: who asked, how urgent, what it costs its tenant, its deadline, and
    the state its engine thread and its caller's event loop share."""

    def __init__(
        self,
        cost: int,
        deadline: float | None,
        loop: asyncio.AbstractEventLoop,
        priority: Priority = Priority.INTERACTIVE,
        tenant: str = "default",
    ) -> None:
        self.priority = priority
        self.tenant = tenant
        # the caller's context (its request id among it): what an engine thread logs for this call runs in it
        self.context = contextvars.copy_context()
        self.cost = cost  # what it takes of its tenant's fair share, in tokens
        self.deadline = deadline  # time.monotonic() value, or None
        self.arrived = time.monotonic()
        self.loop = loop
        self.mailbox = Mailbox.of(loop)
        self.inbox: deque[Item] = deque()  # filled on the loop by the mailbox, emptied by `take`
        self.ready = asyncio.Event()
        self.halt: Callable[[], None] = _nothing  # while it runs: its stop flag in the engine (link.py)
        self.started_at: float | None = None  # when a replica took it (set by the scheduler)
        self.batch_size = 0  # the sequences that shared its engine call (set by the scheduler)
        self.finished_at: float | None = None
        self.cancelled = threading.Event()
        self.finish_reason: FinishReason | None = None
        self.on_finish: Callable[[Any], None] | None = None
        self._lock = threading.Lock()
        # ends it at its deadline while it waits; set and cancelled by the scheduler, on the event loop
        self.expiry: asyncio.TimerHandle | None = None

    @property
    def key(self) -> object:
        """Work with equal keys may share one engine call."""
        return self

    @property
    def length(self) -> int:
        """Its prompt's length, for the spread of prompt lengths within a batch."""
        return 0

    @property
    def exact_length(self) -> bool:
        """Whether its batch-mates' prompts must be exactly as long as its own."""
        return True

    @property
    def scoring(self) -> bool:
        """A scoring job (scoring.py): it shares a replica with nothing."""
        return False

    def tokens_left(self) -> int:
        """The most tokens it may still produce (0 once it has ended): how far it is from freeing its replica."""
        return 0

    def send(self, item: Item) -> None:
        self.mailbox.post(self, item)

    async def take(self) -> list[Item]:
        """Every item delivered since the last take (waits for one)."""
        while not self.inbox:
            self.ready.clear()
            await self.ready.wait()
        items = list(self.inbox)
        self.inbox.clear()
        return items

    def cancel(self) -> None:
        """The caller is gone (or the drain is over): the engine stops the work at its next step."""
        self.cancelled.set()
        self.halt()

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    def stop_reason(self) -> FinishReason:
        """Why work that must stop now stops: its deadline, or its caller going away."""
        now = time.monotonic()
        if self.expired(now) or (self.cancelled.is_set() and self.expired(now + DEADLINE_SLACK)):
            return FinishReason.DEADLINE
        return FinishReason.CANCELLED

    def claim(self, reason: FinishReason) -> bool:
        """Mark the work finished with `reason`, if nothing finished it first: True for the one caller that may
        then tell the caller (everyone else returns)."""
        with self._lock:
            if self.finish_reason is not None:
                return False
            self.finish_reason = reason
        self.halt()
        self.finished_at = time.monotonic()
        return True

    def finish(self, reason: FinishReason, error: BaseException | None = None) -> None:
        """End the work once, whoever calls first (the engine's receiver, the scheduler, the drain): what it held
        back goes out, the metrics hear of it, then the caller (`error` if there is one, then the end)."""
        if not self.claim(reason):
            return
        self.release()
        if self.on_finish is not None:  # before the caller hears of the end, so metrics are never behind
            self.on_finish(self)
        if error is not None:
            self.send(error)
        self.send(None)

    def release(self) -> None:
        """What the work holds back for its caller, sent as it ends (before the end itself)."""

    def fail(self, error: BaseException) -> None:
        """A bug or the engine ended this work (never its caller): it ends with `error`."""
        self.finish(FinishReason.ERROR, error)
