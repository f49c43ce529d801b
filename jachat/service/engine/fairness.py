"""Who gets the next free place in a batch: priority first, then a fair share between tenants.

- Interactive calls go before batch calls, except that a batch call that has waited `promote_after` seconds
  competes as an interactive one from then on (aging): however many interactive calls keep arriving, a batch call
  waits at most that long plus about one batch for its place (its tenant's fair share among the interactive
  tenants, typically the least served). Within a priority, tenants share places fairly by tokens (start-time fair
  queueing, an equivalent of deficit round robin): each tenant's *served* count grows by the cost of every request of
  its that starts (prompt tokens + max_new_tokens), and the next place goes to the tenant that has been served least;
  a tenant's own requests keep their arrival order. So a tenant that floods the queue does not delay another's few
  calls by more than about one batch.
- A tenant that comes back after being idle starts at the least served active tenant's count, not at its old low
  one: it gets its share from now on, not a burst that makes up for the time it sent nothing.
- Memory is bounded: the counts of tenants with nothing queued or running are forgotten once more than
  MAX_REMEMBERED are kept.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Iterable, Sequence

from jachat.service.domain.results import Priority
from jachat.service.engine.work import Work

MAX_REMEMBERED = 1024


class FairOrder:
    def __init__(self, promote_after: float = math.inf) -> None:
        self.served: dict[str, float] = {}
        self.promote_after = promote_after  # seconds a batch call waits before it competes as interactive

    def order(self, waiting: Sequence[Work], now: float) -> list[Work]:
        """The waiting sequences in the order they get places (`now`: time.monotonic(), for the aging)."""
        ordered: list[Work] = []
        for priority in (Priority.INTERACTIVE, Priority.BATCH):
            queues: dict[str, deque[Work]] = {}
            for gen in waiting:  # arrival order
                if self.competes_as(gen, now) is priority:
                    queues.setdefault(gen.tenant, deque()).append(gen)
            # a heap of (tenant's served tokens so far, its oldest call's arrival, tenant): O(n log tenants) on the
            # event loop, however many tenants a client invents
            heap = [(self.served.get(t, 0.0), q[0].arrived, t) for t, q in queues.items()]
            heapq.heapify(heap)
            while heap:
                served, _, tenant = heapq.heappop(heap)
                gen = queues[tenant].popleft()
                ordered.append(gen)
                if queues[tenant]:
                    heapq.heappush(heap, (served + gen.cost, queues[tenant][0].arrived, tenant))
        return ordered

    def competes_as(self, gen: Work, now: float) -> Priority:
        if gen.priority is Priority.BATCH and now - gen.arrived >= self.promote_after:
            return Priority.INTERACTIVE
        return gen.priority

    def arrived(self, gen: Work, active: Iterable[str]) -> None:
        """A request arrived; `active`: the tenants with requests queued or running before it."""
        active = set(active)
        if gen.tenant not in active and active:
            floor = min(self.served.get(tenant, 0.0) for tenant in active)
            self.served[gen.tenant] = max(self.served.get(gen.tenant, 0.0), floor)
        if len(self.served) > MAX_REMEMBERED:
            self.served = {t: n for t, n in self.served.items() if t in active or t == gen.tenant}

    def started(self, batch: Iterable[Work]) -> None:
        for gen in batch:
            self.served[gen.tenant] = self.served.get(gen.tenant, 0.0) + gen.cost
