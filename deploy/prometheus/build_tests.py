"""Write jachat-alerts.test.yaml: promtool unit tests, each alert both firing and not firing.

    python deploy/prometheus/build_tests.py && promtool test rules deploy/prometheus/jachat-alerts.test.yaml

The scenarios are below; expected annotations are copied from the rules, since promtool compares them exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
RULES = HERE / "jachat-alerts.yaml"
TESTS = HERE / "jachat-alerts.test.yaml"

JOB = 'job="jachat"'


def requests(code: str, per_minute: float, minutes: int, pod: str = "a") -> dict[str, str]:
    return {
        "series": f'jachat_requests_total{{{JOB},pod="{pod}",rpc="GenerateStream",code="{code}"}}',
        "values": f"0+{per_minute}x{minutes}",
    }


def series(name: str, labels: str, values: str) -> dict[str, str]:
    return {"series": f"{name}{{{JOB}{',' + labels if labels else ''}}}", "values": values}


def ttft(slow_fraction: float, minutes: int) -> list[dict[str, str]]:
    """100 first tokens a minute, slow_fraction of them over the 2.5 s SLO."""
    fast = 100 * (1 - slow_fraction)
    return [
        series("jachat_time_to_first_token_seconds_bucket", 'le="2.5"', f"0+{fast:g}x{minutes}"),
        series("jachat_time_to_first_token_seconds_count", "", f"0+100x{minutes}"),
    ]


def loop_lag(share_over_100ms: float, minutes: int) -> list[dict[str, str]]:
    """1200 samples a minute (one per 50 ms), share_over_100ms of them between 100 and 250 ms late."""
    late = 1200 * share_over_100ms
    buckets = {"0.05": 1200 - late, "0.1": 1200 - late, "0.25": 1200, "+Inf": 1200}
    return [
        series("jachat_event_loop_lag_seconds_bucket", f'pod="a",le="{le}"', f"0+{n:g}x{minutes}")
        for le, n in buckets.items()
    ]


def loop_stalls(stall: float, every: float, minutes: int) -> list[dict[str, str]]:
    """The loop frozen `stall` seconds every `every` seconds, as the sampler records it: 1200 samples a minute, those
    during a stall late by what was left of it (0.05, 0.10, ... `stall` s), the rest on time."""
    per_stall = round(stall / 0.05)
    stalls = 60 / every
    lags = [0.05 * (k + 1) for k in range(per_stall)]
    on_time = 1200 - stalls * per_stall
    buckets = {
        le: on_time + stalls * sum(1 for lag in lags if lag <= float(le) + 1e-9) for le in ("0.05", "0.1", "0.25")
    }
    buckets["+Inf"] = 1200
    return [
        series("jachat_event_loop_lag_seconds_bucket", f'pod="a",le="{le}"', f"0+{n:g}x{minutes}")
        for le, n in buckets.items()
    ]


# alert -> (labels of the firing alert besides alertname and severity, firing input, quiet input, eval time)
SCENARIOS: dict[str, tuple[dict[str, str], list[dict[str, str]], list[dict[str, str]], str]] = {
    "JachatTargetDown": (
        {"job": "jachat", "pod": "a"},
        [series("up", 'pod="a"', "0x10"), series("up", 'pod="b"', "1x10")],
        [series("up", 'pod="a"', "1x10")],
        "5m",
    ),
    "JachatNoHealthyReplica": (  # absent() of a comparison carries no labels
        {},
        [series("up", 'pod="a"', "0x10"), series("up", 'pod="b"', "0x10")],
        [series("up", 'pod="a"', "0x10"), series("up", 'pod="b"', "1x10")],
        "5m",
    ),
    "JachatHighErrorRatio": (  # 10 of 110 (9%) are server errors; quiet: 1%, and client errors do not count
        {},
        [requests("OK", 100, 30), requests("INTERNAL", 10, 30)],
        [
            requests("OK", 100, 30),
            requests("INTERNAL", 1, 30),
            requests("INVALID_ARGUMENT", 50, 30),
            requests("CANCELLED", 20, 30),
        ],
        "15m",
    ),
    "JachatQueueSaturated": (
        {"pod": "a"},
        [
            series("jachat_queue_size", 'pod="a"', "90x20"),
            series("jachat_queue_capacity", 'pod="a"', "100x20"),
            series("jachat_queue_size", 'pod="b"', "10x20"),
            series("jachat_queue_capacity", 'pod="b"', "100x20"),
        ],
        [series("jachat_queue_size", 'pod="a"', "50x20"), series("jachat_queue_capacity", 'pod="a"', "100x20")],
        "10m",
    ),
    "JachatSustainedRejections": (  # 5% refused as overloaded; quiet: 0.5%
        {},
        [
            requests("OK", 95, 30),
            requests("RESOURCE_EXHAUSTED", 5, 30),
            series("jachat_rejected_total", 'pod="a",reason="overloaded"', "0+5x30"),
        ],
        [
            requests("OK", 99.5, 30),
            requests("RESOURCE_EXHAUSTED", 0.5, 30),
            series("jachat_rejected_total", 'pod="a",reason="overloaded"', "0+0.5x30"),
        ],
        "20m",
    ),
    # fires on a loop frozen 3.5 s every 10 s (its health checks fail); quiet at 0.5% of samples over 100 ms
    "JachatEventLoopStalled": ({"pod": "a"}, loop_stalls(3.5, 10, 20), loop_lag(0.005, 20), "10m"),
    "JachatTTFTBudgetBurnFast": ({}, ttft(0.20, 90), ttft(0.005, 90), "70m"),  # 20x the budget; quiet: 0.5x
    "JachatTTFTBudgetBurnSlow": ({}, ttft(0.10, 480), ttft(0.03, 480), "7h"),  # 10x (under fast's 14.4x); 3x
}


def rules() -> dict[str, dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {r["alert"]: r for g in groups for r in g["rules"] if "alert" in r}


def build() -> dict[str, Any]:
    alerts = rules()
    missing = set(alerts) ^ set(SCENARIOS)
    if missing:
        raise SystemExit(f"alerts and scenarios differ: {sorted(missing)}")
    tests = []
    for name, (labels, firing, quiet, at) in SCENARIOS.items():
        rule = alerts[name]
        expected = {"exp_labels": {**labels, **rule["labels"]}, "exp_annotations": rule["annotations"]}
        tests.append(
            {
                "name": f"{name} fires",
                "interval": "1m",
                "input_series": firing,
                "alert_rule_test": [{"eval_time": at, "alertname": name, "exp_alerts": [expected]}],
            }
        )
        tests.append(
            {
                "name": f"{name} stays quiet",
                "interval": "1m",
                "input_series": quiet,
                "alert_rule_test": [{"eval_time": at, "alertname": name, "exp_alerts": []}],
            }
        )
    return {"rule_files": [RULES.name], "evaluation_interval": "1m", "tests": tests}


def render() -> str:
    header = "# Generated by build_tests.py from its scenarios and jachat-alerts.yaml; do not edit.\n"
    return header + yaml.safe_dump(build(), sort_keys=False, allow_unicode=True, width=120)


if __name__ == "__main__":
    TESTS.write_text(render())
