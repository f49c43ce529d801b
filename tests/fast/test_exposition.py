"""The /metrics endpoint's render cache: a storm of scrapes costs one render a period (defect 9 of the edge issue:
64 scrapers at 170 scrapes a second each rendered the registry on the event loop)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, Metric

from jachat.service.observability.exposition import MetricsEndpoint


class Counting:
    """A collector that counts how often the registry is rendered."""

    def __init__(self) -> None:
        self.collects = 0

    def describe(self) -> list[Metric]:  # so registering it does not collect
        return [CounterMetricFamily("renders", "renders of the registry")]

    def collect(self) -> Iterator[Metric]:
        self.collects += 1
        yield CounterMetricFamily("renders", "renders of the registry", value=self.collects)


async def scrape(port: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    body = await reader.read()
    writer.close()
    return body


def storms(cache_seconds: float) -> tuple[int, list[bytes], int]:
    """20 scrapes at once, then the clock moves past the period and one more: (renders after the storm, the
    storm's answers, renders after the last scrape)."""
    registry, counting, now = CollectorRegistry(), Counting(), [100.0]
    registry.register(counting)

    async def run() -> tuple[int, list[bytes], int]:
        endpoint = MetricsEndpoint(registry, cache_seconds=cache_seconds, clock=lambda: now[0])
        port = await endpoint.start("127.0.0.1", 0)
        try:
            answers = await asyncio.gather(*(scrape(port) for _ in range(20)))
            during = counting.collects
            now[0] += cache_seconds
            await scrape(port)
            return during, answers, counting.collects
        finally:
            await endpoint.close()

    return asyncio.run(run())


def test_a_storm_of_scrapes_costs_one_render_a_period() -> None:
    during, answers, after = storms(1.0)
    assert during == 1
    assert all(answer.startswith(b"HTTP/1.1 200 OK") and b"renders_total 1.0" in answer for answer in answers)
    assert after == 2  # a period later, the figures are rendered afresh


def test_without_the_cache_every_scrape_renders() -> None:
    during, _, after = storms(0.0)
    assert during == 20 and after == 21
