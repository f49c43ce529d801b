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
