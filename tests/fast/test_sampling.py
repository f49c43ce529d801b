"""The one table of sampling fields: every field's default is in its range, and values outside it (however large an
integer JSON sends) are violations naming the field, never an exception."""

from __future__ import annotations

import dataclasses
import math

import pytest

from jachat.service.domain.sampling import FIELDS, SamplingField, SamplingOptions


@pytest.mark.parametrize("field", FIELDS, ids=lambda f: f.name)
def test_every_default_is_in_range_and_every_bound_is_enforced(field: SamplingField) -> None:
    assert field.violation(field.default, 2048, 32000) is None
    low, high = field.bounds(2048, 32000)
    below = low if field.low_open else low - 1
    for bad in (below, high + 1, 10**400, -(10**400), math.nan, math.inf):
        why = field.violation(bad, 2048, 32000)
        assert why is not None and why.startswith("must be "), (field.name, bad)


def test_violations_name_the_field_under_sampling() -> None:
    options = dataclasses.replace(SamplingOptions(), top_k=-1, temperature=10**400, stop=("",))
    paths = [v.path for v in options.violations()]
    assert paths == [("sampling", "temperature"), ("sampling", "top_k"), ("sampling", "stop", 0)]


def test_a_float_is_checked_as_the_float32_the_engine_receives() -> None:
    """CTranslate2 (and protobuf) hold these options as float32: over HTTP, 1e-50 passed `> 0` as a Python float
    and reached the engine as 0 (a 500), and a denormal penalty made the log-probabilities NaN. Both APIs now see
    the same value: what the engine would get."""
    top_p, penalty = FIELDS[4], FIELDS[5]
    assert top_p.name == "top_p" and penalty.name == "repetition_penalty"
    for tiny in (1e-50, 1e-320):
        assert top_p.violation(tiny, 2048, 32000) is not None
    assert top_p.violation(1e-45, 2048, 32000) is None  # a float32 denormal is above 0: kept as the engine keeps it
    for bad in (1e-50, 1e-45, 0.0099, 1e39):
        assert penalty.violation(bad, 2048, 32000) is not None, bad
    assert penalty.violation(0.01, 2048, 32000) is None  # the bound itself, though 0.01 is not exact in float32


def test_a_temperature_too_small_to_divide_by_is_greedy() -> None:
    for tiny in (1e-50, 1e-45, 9e-6, 0.0):
        options = SamplingOptions(temperature=tiny)
        assert options.greedy and options.ctranslate2_kwargs()["sampling_temperature"] == 1.0
        assert not options.violations()
    assert not SamplingOptions(temperature=1e-5).greedy
