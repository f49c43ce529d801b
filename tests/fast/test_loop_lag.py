"""The event-loop lag sampler counts a stall for as long as it lasted, so a loop frozen for seconds shows in the
p99 the JachatEventLoopStalled alert reads, not as one late sample among many on time."""

from __future__ import annotations

import asyncio
import time

from prometheus_client import CollectorRegistry

from jachat.service.observability.metrics import Metrics
from tests.helpers import until


def test_a_stall_is_sampled_for_as_long_as_it_lasted() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)

    def sample(name: str) -> float:
        value = registry.get_sample_value(name, {"le": "0.1"} if name.endswith("_bucket") else {})
        return value or 0.0

    async def scenario() -> tuple[float, float]:
        sampler = asyncio.create_task(metrics.sample_event_loop_lag(0.05))
        await until(lambda: sample("jachat_event_loop_lag_seconds_count") >= 2, "the sampler running")
        count, on_time = sample("jachat_event_loop_lag_seconds_count"), sample("jachat_event_loop_lag_seconds_bucket")
        time.sleep(0.6)  # the stimulus: the event loop frozen for 0.6 s by blocking work on it
        await until(lambda: sample("jachat_event_loop_lag_seconds_count") > count, "a sample after the stall")
        sampler.cancel()
        late = (sample("jachat_event_loop_lag_seconds_count") - count) - (
            sample("jachat_event_loop_lag_seconds_bucket") - on_time
        )
        return late, sample("jachat_event_loop_lag_seconds_sum")

    late, total = asyncio.run(scenario())
    # samples every 50 ms through a 0.6 s freeze: about eleven over 100 ms late (one, before: the stall was invisible)
    assert late >= 8, late
    assert total >= 3.0  # 0.6 + 0.55 + ... : the stall's time, not one sample's
