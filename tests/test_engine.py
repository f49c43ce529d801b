from __future__ import annotations

import logging
from pathlib import Path

import ctranslate2
import pytest

from jachat.service.engine.engine import Engine, resolve_compute_type
from jachat.service.engine.options import EngineOptions, SchedulerOptions


def test_unsupported_compute_type_falls_back_with_a_log_line(
    model_int8: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert "int8_float16" not in ctranslate2.get_supported_compute_types("cpu")
    with caplog.at_level(logging.WARNING, logger="jachat.engine"):
        engine = Engine(EngineOptions(model_int8, device="cpu", compute_type="int8_float16"))
    try:
        assert engine.info.compute_type == "int8_float32"
        assert engine.info.quantization == "int8"
        assert "compute type int8_float16 is not supported on cpu; falling back to int8_float32" in caplog.text
    finally:
        engine.close()


def test_default_compute_type_keeps_the_converted_type(model_f32: Path) -> None:
    assert resolve_compute_type("default", "float32", "cpu") == "float32"  # never "auto"'s int8 on CPU
    assert resolve_compute_type("default", "float16", "cpu") == "float32"
    with pytest.raises(ValueError, match="unknown compute type 'int3'; choose one of: default, auto, int8_float16"):
        resolve_compute_type("int3", "float32", "cpu")


def test_close_destroys_the_generator_while_python_is_alive(model_f32: Path) -> None:
    """Only the engine and its scheduler hold the CTranslate2 generator, and close() drops both, so the C++ pool
    (and its replica threads) is destroyed inside close(), not during the interpreter's finalization, where a
    replica thread that once ran a Python callback made the process abort now and then (SIGABRT after a drain)."""
    import gc

    engine = Engine(EngineOptions(model_dir=model_f32, device="cpu", scheduler=SchedulerOptions(replicas=2)))
    # the holders themselves, or their __dict__ (how gc reports it depends on the Python version)
    owners = {id(engine): "engine", id(vars(engine)): "engine", id(engine.scheduler): "scheduler"}
    owners[id(vars(engine.scheduler))] = "scheduler"
    holders = gc.get_referrers(engine.generator)
    assert sorted(owners.get(id(h), repr(h)[:80]) for h in holders) == ["engine", "scheduler"]
    engine.close()
    assert "generator" not in vars(engine) and engine.scheduler.generator is None
