from __future__ import annotations

import logging
from pathlib import Path

import ctranslate2
import pytest

from jachat.service.engine.core import resolve_compute_type
from jachat.service.engine.engine import Engine
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


def test_the_weights_live_in_the_engine_process_and_close_ends_it_cleanly(model_f32: Path) -> None:
    """The engine process holds the weights, and close() lets it destroy its generator and exit 0 (not killed, not
    aborted: a replica thread that once ran a Python callback made a process abort now and then when its generator
    was left to the interpreter's finalization)."""
    engine = Engine(EngineOptions(model_dir=model_f32, device="cpu", scheduler=SchedulerOptions(replicas=2)))
    process = engine.core.process
    try:
        assert engine.core.rss() > (model_f32 / "model.bin").stat().st_size
    finally:
        engine.close()
    assert process.returncode == 0 and engine.core.rss() == 0
