"""The engine's options, flat and frozen (the settings build them; tests and tools build them directly)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class SchedulerOptions:
    max_batch_size: int = 16
    max_batch_wait: float = 0.05  # the longest a batch waits to fill, from its oldest request's arrival (s)
    batch_idle: float = 0.002  # a batch starts once no request has arrived for this long (s)
    max_queued: int = 256
    max_queued_per_tenant: int = 64  # one tenant cannot fill the queue
    batch_promotion: float = 10.0  # a batch call that has waited this long (s) competes as an interactive one
    replicas: int = 1  # resolved: the engine turns 0 (auto) into a count
    spare_replicas: int = 0  # more replicas, on top, that take a batch only while the load is light (scheduler.py)
    max_prompt_length_spread: int = 64
    stagger: bool = True  # start batches half a batch apart under load (policy.staggered), as the server does

    @property
    def all_replicas(self) -> int:
        """The replicas and the spares: the most batches that may run at once."""
        return self.replicas + self.spare_replicas


@dataclass(frozen=True)
class EngineOptions:
    model_dir: Path
    device: str = "auto"  # auto, cpu or cuda
    compute_type: str = "default"  # default keeps the converted type
    device_index: int = 0
    decode_loop: str = "auto"  # static, native or auto (wire.CoreOptions)
    kv_cache_tokens: int = 0  # the decode loop's KV-cache budget, in positions; 0: half the free memory (cache.py)
    prefill_tokens: int = 64  # the decode loop's prompt tokens prefilled between two steps, beyond the first row
    intra_threads: int = 0
    verify_checksums: bool = True
    warm_up: bool = True  # each replica generates a little before the engine is ready (warmup.py)
    scheduler: SchedulerOptions = field(default_factory=SchedulerOptions)
