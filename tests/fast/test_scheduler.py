"""The scheduler, pinned deterministically: the real scheduler and sequences against a fake engine process that
keeps the real one's contract (no model, no process): `run(rows, max_length, options)` blocks until the batch ends,
hands every token to its row's `on_token`, and ends a row at its own budget or at the token after its stop flag was
set (`halt`). Who shares a batch, in what order, and what deadlines, cancellation and the queue limit do. The
policy's own decisions, as the pure function it is, are test_policy.py's."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from jachat.service.domain.errors import Overloaded
from jachat.service.domain.results import FinishReason, Priority
from jachat.service.domain.sampling import SamplingOptions
from jachat.service.engine.options import EngineOptions, SchedulerOptions
from jachat.service.engine.scheduler import Scheduler
from jachat.service.engine.scoring import Scoring
from jachat.service.engine.sequence import Generation
from jachat.service.engine.wire import CoreOptions, ScoredRow
from jachat.service.settings import Settings
from jachat.service.text.prompt import TURN_MARKERS
from jachat.service.text.reply import ReplyAssembler
from jachat.service.text.tokenizer import Tokenizer
from tests.helpers import until

GREEDY = SamplingOptions(temperature=0.0, repetition_penalty=1.0)


@dataclass
class FakeGenerator:
    """The engine process without a model: every row writes `token` until its budget, max_length or the token after
    its stop flag was set. It records each batch (its prompts' first ids identify the requests) and its options, and
    can hold a batch until released."""

    token: int
    batches: list[list[int]] = field(default_factory=list)
    kwargs: list[dict[str, Any]] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    started: threading.Event = field(default_factory=threading.Event)
    on_step: Callable[[int, int], None] | None = None  # (row, step) before the row's token: a test's hook

    def __post_init__(self) -> None:
        self.release.set()

    def score(self, job: Scoring) -> list[ScoredRow]:
        """A scoring job, held like a batch until released: each sequence's log-probabilities all -0.5 (its
        tokens after the first), no rows at all once halted."""
        self.batches.append([-1])
        stopped = [False]
        job.halt = lambda: stopped.__setitem__(0, True)
        self.started.set()
        assert self.release.wait(30), "the test never released the job"
        job.halt = lambda: None
        return [] if stopped[0] else [([-0.5] * (len(ids) - 1), [], []) for ids in job.sequences]

    def run(self, rows: Sequence[Generation], max_length: int, options: dict[str, Any]) -> None:
        self.batches.append([row.prompt_ids[0] for row in rows])
        self.kwargs.append(options)
        flags = [False] * len(rows)
        for b, row in enumerate(rows):
            row.halt = lambda b=b: flags.__setitem__(b, True)  # type: ignore[misc]
        self.started.set()
        assert self.release.wait(30), "the test never released the batch"
        done: set[int] = set()
        for step in range(max_length):
            for b, row in enumerate(rows):
                if b in done:
                    continue
                if self.on_step is not None:
                    self.on_step(b, step)
                stop = flags[b]  # the decode thread reads the flag as it records the token
                if row.on_token(self.token, -0.5, time.monotonic()) or stop:
                    flags[b] = True
                if flags[b] or step + 1 >= row.max_new_tokens or self.token == row.eos_id:
                    done.add(b)
            if len(done) == len(rows):
                break
        for row in rows:
            row.halt = lambda: None


@pytest.fixture
def pieces(tokenizer: Tokenizer) -> list[str]:
    return tokenizer.pieces


def sequence(
    tokenizer: Tokenizer,
    name: int,
    length: int = 8,
    options: SamplingOptions = GREEDY,
    max_new_tokens: int = 4,
    deadline: float | None = None,
    priority: Priority = Priority.INTERACTIVE,
    tenant: str = "default",
) -> Generation:
    """A sequence whose prompt starts with piece `name` (its identity in FakeGenerator.batches)."""
    prompt = [name] + [600] * (length - 1)
    reply = ReplyAssembler(options.stop, TURN_MARKERS)
    loop = asyncio.get_running_loop()
    decoder = tokenizer.decoder()
    eos = tokenizer.eos_id
    return Generation(prompt, options, max_new_tokens, deadline, eos, decoder, reply, loop, priority, tenant)


async def finished(gen: Generation) -> FinishReason | None:
    while None not in await gen.take():
        pass
    return gen.finish_reason


async def batches_started(fake: FakeGenerator, count: int) -> None:
    try:
        await until(lambda: len(fake.batches) >= count, f"{count} batches started", timeout=5)
    except AssertionError as never:
        fake.release.set()  # a held batch ends, so the scheduler can stop
        raise AssertionError(f"{never}: only {len(fake.batches)}: {fake.batches}") from None


def names(tokenizer: Tokenizer, *ids: int) -> list[int]:
    """The requests a batch held, as FakeGenerator records them: their prompts' first ids."""
    return list(ids)


@pytest.fixture
def run(tokenizer: Tokenizer) -> Iterator[Callable[..., Any]]:
    """Run an async scenario with a scheduler over a fake generator; closes the scheduler after."""
    schedulers: list[Scheduler] = []

    def make(options: SchedulerOptions, generator: FakeGenerator) -> Scheduler:
        scheduler = Scheduler(generator, options)
        schedulers.append(scheduler)
        return scheduler

    def go(scenario: Callable[[Callable[[SchedulerOptions, FakeGenerator], Scheduler]], Any]) -> Any:
        return asyncio.run(scenario(make))

    yield go
    for scheduler in schedulers:
        scheduler.close()


def test_compatible_sequences_share_batches_in_arrival_order_up_to_the_size(
    tokenizer: Tokenizer, run: Callable[..., Any]
) -> None:
    async def scenario(make: Callable[..., Scheduler]) -> None:
        fake = FakeGenerator(token=700)
        scheduler = make(SchedulerOptions(max_batch_size=3, replicas=1), fake)
        gens = [sequence(tokenizer, 100 + i) for i in range(7)]
        for gen in gens:
            scheduler.submit(gen)
        assert [await finished(g) for g in gens] == [FinishReason.LENGTH] * 7
        assert fake.batches == [
            names(tokenizer, 100, 101, 102),
            names(tokenizer, 103, 104, 105),
            names(tokenizer, 106),
        ]
        assert all(len(g.token_ids) == 4 for g in gens)

    run(scenario)


def test_calls_that_arrive_together_are_spread_over_the_free_replicas(
    tokenizer: Tokenizer, run: Callable[..., Any]
) -> None:
    """n calls, k free replicas: k batches of about n/k side by side, in arrival order; a busy replica takes no
    share, so with one free replica a batch takes all it may."""

    async def scenario(make: Callable[..., Scheduler]) -> None:
        fake = FakeGenerator(token=700)
        fake.release.clear()  # batches run until both have started
        scheduler = make(SchedulerOptions(max_batch_size=16, replicas=2), fake)
        gens = [sequence(tokenizer, 100 + i) for i in range(16)]
        for gen in gens:
            scheduler.submit(gen)
        await batches_started(fake, 2)
        fake.release.set()
        assert [await finished(g) for g in gens] == [FinishReason.LENGTH] * 16
        assert sorted(fake.batches) == [names(tokenizer, *range(100, 108)), names(tokenizer, *range(108, 116))]

        fake.batches.clear()
        fake.release.clear()  # one replica stays busy with a long call
        fake.started.clear()
        busy = sequence(tokenizer, 200, max_new_tokens=50)  # far from its end: the others never wait for it
        scheduler.submit(busy)
        await asyncio.to_thread(fake.started.wait, 5)
        others = [sequence(tokenizer, 300 + i) for i in range(6)]
        for gen in others:
            scheduler.submit(gen)
        await batches_started(fake, 2)
        fake.release.set()
        assert [await finished(g) for g in [busy, *others]] == [FinishReason.LENGTH] * 7
        assert fake.batches == [names(tokenizer, 200), names(tokenizer, *range(300, 306))]

    run(scenario)


def test_a_call_that_arrives_alone_while_every_replica_is_busy_starts_on_a_spare(
    tokenizer: Tokenizer, run: Callable[..., Any]
) -> None:
    """--spare-replicas: with every replica busy, a call that arrives alone starts at once on a spare instead of
    waiting a whole reply (when it waits instead: test_policy's spare test)."""

    async def scenario(make: Callable[..., Scheduler]) -> None:
        fake = FakeGenerator(token=700)
        fake.release.clear()  # batches run until released
        scheduler = make(SchedulerOptions(max_batch_size=16, replicas=1, spare_replicas=1), fake)
        busy = sequence(tokenizer, 100, max_new_tokens=50)
        scheduler.submit(busy)
        await batches_started(fake, 1)
        alone = sequence(tokenizer, 200)
        scheduler.submit(alone)
        await batches_started(fake, 2)  # on the spare, while the first batch still runs
        fake.release.set()
        assert [await finished(g) for g in (busy, alone)] == [FinishReason.LENGTH] * 2
        assert fake.batches == [names(tokenizer, 100), names(tokenizer, 200)]

    run(scenario)


def test_different_decoding_options_never_share_a_batch(tokenizer: Tokenizer, run: Callable[..., Any]) -> None:
    async def scenario(make: Callable[..., Scheduler]) -> None:
        fake = FakeGenerator(token=700)
        scheduler = make(SchedulerOptions(replicas=1), fake)
        sampled = SamplingOptions(temperature=0.7, repetition_penalty=1.0)
        gens = [
            sequence(tokenizer, 100),
            sequence(tokenizer, 101, options=sampled),
            sequence(tokenizer, 102),
            sequence(tokenizer, 103, options=sampled),
        ]
        for gen in gens:
            scheduler.submit(gen)
        for gen in gens:
            await finished(gen)
        # the oldest waiting request heads each batch and takes the compatible ones after it, in order
        assert fake.batches == [names(tokenizer, 100, 102), names(tokenizer, 101, 103)]
        assert fake.kwargs[0]["sampling_topk"] == 1 and fake.kwargs[1]["sampling_temperature"] == 0.7

    run(scenario)


def test_prompt_lengths_in_a_batch_stay_within_the_spread(tokenizer: Tokenizer, run: Callable[..., Any]) -> None:
    async def scenario(make: Callable[..., Scheduler]) -> None:
        fake = FakeGenerator(token=700)
        scheduler = make(SchedulerOptions(replicas=1, max_prompt_length_spread=16), fake)
        penalised = SamplingOptions(temperature=0.0, repetition_penalty=1.1)
        gens = [
            sequence(tokenizer, 100, length=10),
            sequence(tokenizer, 101, length=40),  # too long for 100's batch
            sequence(tokenizer, 102, length=26),  # within 16 of 10
            sequence(tokenizer, 103, length=10, options=penalised),
            sequence(tokenizer, 104, length=11, options=penalised),  # a history penalty needs equal lengths
            sequence(tokenizer, 105, length=10, options=penalised),
        ]
        for gen in gens:
            scheduler.submit(gen)
        for gen in gens:
            await finished(gen)
        assert fake.batches == [
            names(tokenizer, 100, 102),
            names(tokenizer, 101),
            names(tokenizer, 103, 105),
            names(tokenizer, 104),
        ]

    run(scenario)


def test_the_queue_limit_refuses_at_once_with_a_retry_delay(tokenizer: Tokenizer, run: Callable[..., Any]) -> None:
    async def scenario(make: Callable[..., Scheduler]) -> None:
        fake = FakeGenerator(token=700)
        fake.release.clear()  # the first batch holds the only replica
        scheduler = make(SchedulerOptions(replicas=1, max_queued=2), fake)
        running = sequence(tokenizer, 100)
        scheduler.submit(running)
        await asyncio.get_running_loop().run_in_executor(None, fake.started.wait)
        waiting = [sequence(tokenizer, 101), sequence(tokenizer, 102)]
        for gen in waiting:
            scheduler.submit(gen)
        with pytest.raises(Overloaded) as refused:
            scheduler.submit(sequence(tokenizer, 103))
        assert refused.value.retry_after > 0
        fake.release.set()
        assert [await finished(g) for g in [running, *waiting]] == [FinishReason.LENGTH] * 3
        assert fake.batches == [names(tokenizer, 100), names(tokenizer, 101, 102)]  # 103 never ran

    run(scenario)


def test_expired_and_withdrawn_waiting_sequences_never_start(tokenizer: Tokenizer, run: Callable[..., Any]) -> None:
    async def scenario(make: Callable[..., Scheduler]) -> None:
        fake = FakeGenerator(token=700)
        fake.release.clear()
        scheduler = make(SchedulerOptions(replicas=1), fake)
        loop = asyncio.get_running_loop()
        running = sequence(tokenizer, 100)
        scheduler.submit(running)
        await loop.run_in_executor(None, fake.started.wait)
        expired = sequence(tokenizer, 101, deadline=loop.time() - 1)  # monotonic: the loop's clock is time.monotonic
        withdrawn = sequence(tokenizer, 102)
        kept = sequence(tokenizer, 103)
        for gen in (expired, withdrawn, kept):
            scheduler.submit(gen)
        scheduler.withdraw(withdrawn)
        fake.release.set()
        assert await finished(withdrawn) is FinishReason.CANCELLED
        assert await finished(expired) is FinishReason.DEADLINE
        assert await finished(kept) is FinishReason.LENGTH
        assert fake.batches == [names(tokenizer, 100), names(tokenizer, 103)]

    run(scenario)


def test_a_cancelled_running_sequence_stops_within_two_tokens_and_its_batch_mates_go_on(
    tokenizer: Tokenizer, run: Callable[..., Any]
) -> None:
    async def scenario(make: Callable[..., Scheduler]) -> None:
        fake = FakeGenerator(token=700)
        scheduler = make(SchedulerOptions(replicas=1), fake)
        gens = [sequence(tokenizer, 100 + i, max_new_tokens=50) for i in range(3)]

        def cancel_the_middle_one(batch_id: int, step: int) -> None:
            if (batch_id, step) == (1, 10):  # its caller goes away while it generates
                gens[1].cancel()

        fake.on_step = cancel_the_middle_one
        for gen in gens:
            scheduler.submit(gen)
        reasons = [await finished(g) for g in gens]
        assert reasons == [FinishReason.LENGTH, FinishReason.CANCELLED, FinishReason.LENGTH]
        assert gens[1].steps <= 10 + 2 and gens[1].steps_after_cancel <= 2
        assert len(gens[0].token_ids) == len(gens[2].token_ids) == 50

    run(scenario)


def test_a_sequence_stops_at_end_of_text_and_at_its_own_max_new_tokens(
    tokenizer: Tokenizer, run: Callable[..., Any]
) -> None:
    async def scenario(make: Callable[..., Scheduler]) -> None:
        eos = FakeGenerator(token=tokenizer.eos_id)
        scheduler = make(SchedulerOptions(replicas=1), eos)
        ends = sequence(tokenizer, 100, max_new_tokens=9)
        scheduler.submit(ends)
        assert await finished(ends) is FinishReason.END_OF_TURN and ends.steps == 1
        plain = FakeGenerator(token=700)
        other = make(SchedulerOptions(replicas=1), plain)
        short, long = sequence(tokenizer, 101, max_new_tokens=3), sequence(tokenizer, 102, max_new_tokens=9)
        other.submit(short)
        other.submit(long)
        assert (await finished(short), await finished(long)) == (FinishReason.LENGTH, FinishReason.LENGTH)
        assert (short.steps, long.steps) == (3, 9)  # one batch, each to its own length

    run(scenario)


BATCH = Priority.BATCH


def test_interactive_calls_never_wait_behind_queued_batch_calls(tokenizer: Tokenizer, run: Callable[..., Any]) -> None:
    async def scenario(make: Callable[..., Scheduler]) -> None:
        fake = FakeGenerator(token=700)
        fake.release.clear()  # the replica is busy while the queue forms
        scheduler = make(SchedulerOptions(replicas=1, max_batch_size=2), fake)
        first = sequence(tokenizer, 100, priority=BATCH)
        scheduler.submit(first)
        await asyncio.get_running_loop().run_in_executor(None, fake.started.wait)
        queued = [sequence(tokenizer, 101 + i, priority=BATCH) for i in range(3)]
        late = [sequence(tokenizer, 110), sequence(tokenizer, 111)]  # interactive, arriving after them
        for gen in [*queued, *late]:
            scheduler.submit(gen)
        fake.release.set()
        for gen in [first, *queued, *late]:
            assert await finished(gen) is FinishReason.LENGTH
        assert fake.batches == [
            names(tokenizer, 100),
            names(tokenizer, 110, 111),  # the next free places: the interactive calls, although they came last
            names(tokenizer, 101, 102),
            names(tokenizer, 103),
        ]

    run(scenario)


def test_a_full_queue_sheds_the_newest_batch_call_for_an_interactive_one(
    tokenizer: Tokenizer, run: Callable[..., Any]
) -> None:
    async def scenario(make: Callable[..., Scheduler]) -> None:
        fake = FakeGenerator(token=700)
        fake.release.clear()
        scheduler = make(SchedulerOptions(replicas=1, max_queued=3), fake)
        running = sequence(tokenizer, 100)
        scheduler.submit(running)
        await asyncio.get_running_loop().run_in_executor(None, fake.started.wait)
        older, newer = sequence(tokenizer, 101, priority=BATCH), sequence(tokenizer, 102, priority=BATCH)
        waiting = sequence(tokenizer, 103)
        for gen in (older, newer, waiting):
            scheduler.submit(gen)
        with pytest.raises(Overloaded):
            scheduler.submit(sequence(tokenizer, 104, priority=BATCH))  # a batch call finds no room
        urgent = sequence(tokenizer, 105)
        scheduler.submit(urgent)  # an interactive one takes the newest batch call's place
        items = await newer.take()
        assert isinstance(items[0], Overloaded) and newer.finish_reason is FinishReason.SHED
        assert items[1:] == [None]
        with pytest.raises(Overloaded):  # full again, of interactive calls and one batch call: still shed-able
            scheduler.check_capacity(Priority.BATCH)
        fake.release.set()
        for gen in (running, older, waiting, urgent):
            assert await finished(gen) is FinishReason.LENGTH
        assert names(tokenizer, 102)[0] not in [p for batch in fake.batches for p in batch]

    run(scenario)


def test_a_tenant_that_floods_the_queue_does_not_hold_back_another_tenants_calls(
    tokenizer: Tokenizer, run: Callable[..., Any]
) -> None:
    async def scenario(make: Callable[..., Scheduler]) -> None:
        fake = FakeGenerator(token=700)
        fake.release.clear()
        scheduler = make(SchedulerOptions(replicas=1, max_batch_size=8, max_queued_per_tenant=64), fake)
        flood = [sequence(tokenizer, 1000 + i, tenant="a") for i in range(48)]
        scheduler.submit(flood[0])
        await asyncio.get_running_loop().run_in_executor(None, fake.started.wait)  # A's first call runs
        for gen in flood[1:]:
            scheduler.submit(gen)
        few = [sequence(tokenizer, 2000 + i, tenant="b") for i in range(4)]
        for gen in few:  # B arrives after all 47 of A's waiting calls
            scheduler.submit(gen)
        fake.release.set()
        for gen in flood + few:
            assert await finished(gen) is FinishReason.LENGTH
        second = fake.batches[1]
        assert set(names(tokenizer, *(2000 + i for i in range(4)))) <= set(second)  # the very next batch
        assert len(fake.batches) == 1 + 51 // 8 + 1  # nothing was lost or run twice

    run(scenario)


def test_each_tenant_has_its_own_queue_limit(tokenizer: Tokenizer, run: Callable[..., Any]) -> None:
    async def scenario(make: Callable[..., Scheduler]) -> None:
        fake = FakeGenerator(token=700)
        fake.release.clear()
        scheduler = make(SchedulerOptions(replicas=1, max_queued=10, max_queued_per_tenant=2), fake)
        running = sequence(tokenizer, 100, tenant="a")
        scheduler.submit(running)
        await asyncio.get_running_loop().run_in_executor(None, fake.started.wait)
        waiting = [sequence(tokenizer, 101, tenant="a"), sequence(tokenizer, 102, tenant="a")]
        for gen in waiting:
            scheduler.submit(gen)
        with pytest.raises(Overloaded, match="of this tenant already wait"):
            scheduler.submit(sequence(tokenizer, 103, tenant="a"))
        other = sequence(tokenizer, 104, tenant="b")
        scheduler.submit(other)  # another tenant still finds room
        fake.release.set()
        for gen in (running, *waiting, other):
            assert await finished(gen) is FinishReason.LENGTH

    run(scenario)


def test_a_tenant_back_from_idle_gets_its_share_not_a_burst() -> None:
    from jachat.service.engine.fairness import FairOrder

    order = FairOrder()
    order.served = {"a": 5000.0, "b": 5200.0, "c": 10.0}  # c was busy long ago
    newcomer = SimpleNamespace(tenant="c")
    order.arrived(newcomer, active={"a", "b"})  # type: ignore[arg-type]  # only its tenant is read
    assert order.served["c"] == 5000.0  # starts level with the least served active tenant


def test_a_batch_call_that_has_waited_long_enough_competes_as_interactive() -> None:
    """Strict priority starved batch work for ever under steady interactive load (a noisy tenant keeping 64
    interactive calls in flight). With aging, a batch call that has waited `promote_after` seconds goes into the
    interactive class, where its tenant (served little) takes the next place ahead of the flooding tenant."""
    from jachat.service.engine.fairness import FairOrder

    def call(tenant: str, priority: Priority, arrived: float) -> Any:
        return SimpleNamespace(tenant=tenant, priority=priority, arrived=arrived, cost=100)

    order = FairOrder(promote_after=10.0)
    order.served = {"noisy": 50_000.0, "quiet": 40_000.0}
    batch = call("quiet", Priority.BATCH, arrived=100.0)
    flood = [call("noisy", Priority.INTERACTIVE, arrived=100.0 + i) for i in range(64)]
    assert order.order([batch, *flood], now=105.0)[-1] is batch  # waited 5 s: interactive first, as ever
    assert order.order([batch, *flood], now=110.0)[0] is batch  # waited 10 s: its tenant's fair share, now
    assert FairOrder().order([batch, *flood], now=1e9)[-1] is batch  # no aging: strict priority


def test_a_failed_batch_logs_a_line_per_call_with_its_request_id(
    tokenizer: Tokenizer, run: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    """A generation thread's log line for a call carries that call's request id (the sequence keeps its context)."""
    from jachat.service.observability.logs import RequestIdFilter, request_id

    class Broken(FakeGenerator):
        def run(self, *args: Any, **kwargs: Any) -> None:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    async def submitted(scheduler: Scheduler, rid: str, name: int) -> Generation:
        request_id.set(rid)  # as the call's frame does, in the call's own task
        gen = sequence(tokenizer, name)
        scheduler.submit(gen)
        return gen

    async def scenario(make: Callable[..., Scheduler]) -> list[FinishReason | None]:
        scheduler = make(SchedulerOptions(max_batch_size=2, replicas=1), Broken(token=700))
        gens = await asyncio.gather(submitted(scheduler, "call-a", 100), submitted(scheduler, "call-b", 101))
        return [await finished(g) for g in gens]

    caplog.handler.addFilter(RequestIdFilter())
    with caplog.at_level("ERROR", logger="jachat.scheduler"):
        assert run(scenario) == [FinishReason.ERROR, FinishReason.ERROR]
    per_call = [r for r in caplog.records if "the call ends INTERNAL" in r.getMessage()]
    assert sorted(str(getattr(r, "request_id", None)) for r in per_call) == ["call-a", "call-b"]


def test_the_engines_option_defaults_are_the_servers() -> None:
    """Tests and tools that build the engine's options directly run what jachat-serve runs by default (staggering
    was off in SchedulerOptions while the server's flag had it on)."""
    served = Settings(model=Path("m"))
    scheduler, engine = SchedulerOptions(), EngineOptions(Path("m"))
    core = CoreOptions(Path("m"), "int8", 2048, 3)
    assert (
        scheduler.max_batch_size,
        scheduler.max_batch_wait,
        scheduler.batch_idle,
        scheduler.max_queued,
        scheduler.max_queued_per_tenant,
        scheduler.batch_promotion,
        scheduler.spare_replicas,
        scheduler.stagger,
        scheduler.max_prompt_length_spread,
    ) == (
        served.max_batch_size,
        served.max_batch_wait_ms / 1000,
        served.batch_idle_ms / 1000,
        served.max_queued_requests,
        served.max_queued_per_tenant,
        served.batch_promotion_seconds,
        served.spare_replicas,
        served.stagger_batches,
        served.max_prompt_length_spread,
    )
    assert (engine.device, engine.compute_type, engine.decode_loop, engine.kv_cache_tokens, engine.warm_up) == (
        served.device,
        served.compute_type,
        served.decode_loop,
        served.kv_cache_tokens,
        served.warm_up,
    )
    assert (core.decode_loop, core.kv_cache_tokens, core.prefill_tokens, core.max_batch_size) == (
        served.decode_loop,
        served.kv_cache_tokens,
        served.prefill_tokens_per_step,
        served.max_batch_size,
    )
    assert engine.prefill_tokens == served.prefill_tokens_per_step
