"""The decode loop's KV-cache budget: how many cache positions the running batch may hold, and whether a row fits.

The native decoder keeps each layer's keys and values dense, [rows, heads, columns, head_dim], rows right-aligned,
so the batch's cache holds rows x its longest row positions, padding included, and grows by one column a step (on
the CPU into spare columns and row slots its buffers keep beyond these positions: at most 32 columns, and a quarter
more rows than the most that ran, at least 2). A
row's longest is its prompt plus the new tokens it may take. The loop admits a row only while every running row,
and it, could reach its longest within the budget (`fits`): the cache can never outgrow it, whatever the rows do,
and a row that does not fit waits until rows leave. A call that could not fit even alone is refused before it
queues (the server gives calls the budget as their context; engine.py).

The default budget is half the memory free once the weights are loaded (the other half for the step's own
activations and the copies a join makes while it merges a row), at most the row limit times the context: more
could never be used.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterable
from pathlib import Path
from typing import Any

SHARE_OF_FREE = 0.5


def bytes_per_position(decoder: Any) -> int:
    """One position of every layer's keys and values, in the decoder's compute precision (a float16 type's cache
    is float16; an int8 type computes and caches in float32 on CPU, in float16 with int8_float16)."""
    kind = decoder.compute_type
    width = 2 if "float16" in kind or "bfloat16" in kind else 4
    return int(2 * decoder.num_layers * decoder.hidden_size * width)


def budget(requested: int, rows: int, context_length: int, free_bytes: int, per_position: int) -> int:
    """The budget in positions: the operator's (`requested` > 0) as given, else SHARE_OF_FREE of `free_bytes`; at
    most `rows` x `context_length`, which is also the budget where the free memory could not be read (0)."""
    most = rows * context_length
    if requested > 0:
        return requested
    if free_bytes <= 0:
        return most
    return max(1, min(most, int(free_bytes * SHARE_OF_FREE) // max(1, per_position)))


def fits(longest: Iterable[int], row: int, budget_positions: int) -> bool:
    """Whether a row whose longest is `row` can join running rows whose longests are `longest`."""
    lengths = list(longest)
    return (len(lengths) + 1) * max([row, *lengths]) <= budget_positions


def free_bytes(device: str, device_index: int = 0) -> int:
    """Memory free for the cache: on CPU the kernel's MemAvailable, or less where the cgroup (a container's limit)
    leaves less; on CUDA the device's free memory (the driver's cuMemGetInfo in its primary context)."""
    if device == "cuda":
        return _cuda_free(device_index)
    free = _meminfo_available()
    limit = _cgroup_room()
    return min(free, limit) if limit is not None else free


def _meminfo_available(path: Path = Path("/proc/meminfo")) -> int:
    try:
        for line in path.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _cgroup_room(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """memory.max less memory.current of this process's cgroup (v2), or None where there is no limit."""
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int((root / "memory.current").read_text()))
    except (OSError, ValueError):
        return None


def _cuda_free(index: int) -> int:
    cuda = ctypes.CDLL("libcuda.so.1")
    device, context = ctypes.c_int(), ctypes.c_void_p()
    free, total = ctypes.c_size_t(), ctypes.c_size_t()
    if cuda.cuInit(0) or cuda.cuDeviceGet(ctypes.byref(device), index):
        return 0
    if cuda.cuDevicePrimaryCtxRetain(ctypes.byref(context), device):
        return 0
    try:
        if cuda.cuCtxPushCurrent_v2(context):
            return 0
        try:
            if cuda.cuMemGetInfo_v2(ctypes.byref(free), ctypes.byref(total)):
                return 0
        finally:
            cuda.cuCtxPopCurrent_v2(ctypes.byref(ctypes.c_void_p()))
    finally:
        cuda.cuDevicePrimaryCtxRelease_v2(device)
    return int(free.value)
