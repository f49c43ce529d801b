"""The benchmark's baselines, without a model."""

from __future__ import annotations

from jachat.bench.baselines import Layout, layouts


def test_the_ctranslate2_baseline_tries_every_layout_of_the_cores() -> None:
    """The CTranslate2-direct baseline is its best configuration, not its defaults: every replica count up to the
    cores (and the sequences), the cores shared out; one sequence alone on one thread and on all cores."""
    assert layouts(16, 2) == [Layout(1, 2), Layout(2, 1)]
    assert layouts(16, 8) == [Layout(r, 8 // r) for r in range(1, 9)]
    assert layouts(3, 8) == [Layout(1, 8), Layout(2, 4), Layout(3, 2)]
    assert layouts(1, 4) == [Layout(1, 1), Layout(1, 4)]
    assert Layout(2, 1).name(16) == "ctranslate2 best: 2x1t, 2 x batch of 8"


def test_the_sweep_finds_the_highest_rate_within_the_slo_and_stops_at_saturation() -> None:
    from jachat.bench.sweep import Step, best_rate, rates_from

    def step(rate: float, ttft_p99: float, errors: int = 0) -> Step:
        return Step(rate, rate, rate, 10 * rate, ttft_p99 / 2, ttft_p99, 1.0, 2.0, 100, errors)

    steps = [step(1, 0.2), step(2, 0.6), step(3, 0.9, errors=1), step(4, 2.0)]
    assert best_rate(steps, 1.0) == 2  # 3/s met the latency, not the errors; 4/s missed the latency
    assert best_rate(steps, 0.1) is None
    assert not step(4, 2.0).saturated(1.0) and step(4, 5.5).saturated(1.0)
    assert step(4, float("nan")).saturated(1.0)  # nothing answered
    assert step(2, 0.5, errors=2).saturated(1.0)
    assert rates_from(1, 1.5)[:4] == [1, 1.5, 2.25, 3.375]
