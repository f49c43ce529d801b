"""The decode loop's KV-cache budget (engine/cache.py): a dense cache's positions, the default from free memory, and
the fit rule that keeps the running batch within it."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from jachat.service.engine import cache


def test_a_position_costs_every_layers_keys_and_values_in_the_compute_precision() -> None:
    rinna = {"num_layers": 36, "hidden_size": 2816}
    assert cache.bytes_per_position(SimpleNamespace(compute_type="int8_float32", **rinna)) == 2 * 36 * 2816 * 4
    assert cache.bytes_per_position(SimpleNamespace(compute_type="int8_float16", **rinna)) == 2 * 36 * 2816 * 2
    assert cache.bytes_per_position(SimpleNamespace(compute_type="float16", **rinna)) == 2 * 36 * 2816 * 2


def test_the_default_budget_is_half_the_free_memory_and_never_more_than_the_rows_can_use() -> None:
    per = 1000
    assert cache.budget(0, rows=16, context_length=2048, free_bytes=10_000_000, per_position=per) == 5000
    assert cache.budget(0, rows=2, context_length=2048, free_bytes=10**12, per_position=per) == 4096
    assert cache.budget(0, rows=16, context_length=2048, free_bytes=0, per_position=per) == 16 * 2048  # unknown
    assert cache.budget(300, rows=16, context_length=2048, free_bytes=10**12, per_position=per) == 300  # the flag's


def test_a_row_fits_while_every_row_could_reach_its_longest_within_the_budget() -> None:
    assert cache.fits([], 100, 100) and not cache.fits([], 101, 100)
    assert cache.fits([40, 50], 30, 150)  # 3 rows x 50
    assert not cache.fits([40, 50], 60, 150)  # 3 x 60: the newcomer makes every row as long as itself
    assert not cache.fits([90], 10, 150)  # 2 x 90: the cache is dense, a short row pads to the longest


def test_a_containers_memory_limit_bounds_the_free_memory(tmp_path: Path) -> None:
    (tmp_path / "memory.max").write_text("3000000\n")
    (tmp_path / "memory.current").write_text("1000000\n")
    assert cache._cgroup_room(tmp_path) == 2_000_000
    (tmp_path / "memory.max").write_text("max\n")
    assert cache._cgroup_room(tmp_path) is None
    assert cache._cgroup_room(tmp_path / "absent") is None
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 100 kB\nMemAvailable: 42 kB\n")
    assert cache._meminfo_available(meminfo) == 42 * 1024
