"""What the benchmarks read about a running server's processes, from /proc (Linux): its child processes (the engine
process), their resident memory and CPU time, and the CPU's model."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def rss_bytes(pid: int) -> int:
    """Resident memory of a process."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def children(pid: int) -> list[int]:
    """A process's child processes, whichever of its threads started them."""
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        found += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    return found


def cmdline(pid: int) -> bytes:
    """A process's command line, its arguments NUL-separated."""
    return Path(f"/proc/{pid}/cmdline").read_bytes()


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of a server: its own process and its children's (the engine process holds the weights)."""
    return rss_bytes(pid) + sum(rss_bytes(child) for child in children(pid))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_model() -> str:
    """The CPU's model name (every CPU figure carries it: the vendor changes CTranslate2's backend)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
