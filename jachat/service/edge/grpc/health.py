"""grpc.health.v1 with bounded Watch streams.

Health is exempt from authentication (probes and load balancers carry no token), so its streaming method is open to
anyone: each Watch holds a stream, a task and a per-service condition for as long as the caller likes. The stock
servicer takes any number, for any service name of any length. Here at most `max_watchers` watch at once (more get
RESOURCE_EXHAUSTED), and a service name is at most MAX_SERVICE_NAME characters. Check is untouched: it holds nothing.
"""

from __future__ import annotations

from typing import Any

from grpc import StatusCode, aio
from grpc_health.v1 import health, health_pb2

MAX_SERVICE_NAME = 256


class HealthServicer(health.aio.HealthServicer):
    def __init__(self, max_watchers: int = 64) -> None:
        super().__init__()
        self.max_watchers = max_watchers
        self.watchers = 0

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: aio.ServicerContext[Any, Any]) -> None:
        if len(request.service) > MAX_SERVICE_NAME:
            await context.abort(
                StatusCode.INVALID_ARGUMENT, f"service: at most {MAX_SERVICE_NAME} characters; health knows no longer"
            )
        if self.watchers >= self.max_watchers:
            await context.abort(
                StatusCode.RESOURCE_EXHAUSTED, f"{self.watchers} health watchers already; use Check, or retry later"
            )
        self.watchers += 1
        try:
            await super().Watch(request, context)
        finally:
            self.watchers -= 1
