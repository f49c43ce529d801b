"""GPU runtime discovery and start-up failures, without a GPU: cuBLAS 12 found in a fake pip folder (and, with a C
compiler, really loaded so that a dlopen by name finds it, as CTranslate2's does), and each failure's one line."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from jachat.service.engine.gpu import (
    CUBLAS,
    WHEEL_FOLDER,
    Driver,
    GpuError,
    check_driver,
    cublas_folders,
    explain,
    preload_cublas,
)


def fake_site(root: Path, *names: str) -> Path:
    folder = root / WHEEL_FOLDER
    folder.mkdir(parents=True)
    for name in names:
        (folder / name).write_bytes(b"")
    return folder


class Loader:
    """ctypes.CDLL's stand-in: what was loaded, how; names in `present` load by name."""

    def __init__(self, *present: str) -> None:
        self.present = set(present)
        self.loaded: list[tuple[str, int | None]] = []

    def __call__(self, name: str, mode: int | None = None) -> object:
        if "/" not in name and name not in self.present:
            raise OSError(f"{name}: cannot open shared object file")
        self.loaded.append((name, mode))
        return object()


def test_cublas_is_found_in_a_pip_folder_on_the_import_path(tmp_path: Path) -> None:
    empty, site = tmp_path / "empty", tmp_path / "site"
    empty.mkdir()
    folder = fake_site(site, *CUBLAS)
    assert cublas_folders([str(empty), str(site), str(site)]) == [folder]
    assert cublas_folders([str(empty)]) == []
    assert cublas_folders([str(fake_site(tmp_path / "lt-only", CUBLAS[0]).parents[2])]) == []  # cuBLAS itself needed


def test_pips_cublas_is_loaded_by_full_path_lt_first_when_the_linker_has_none(tmp_path: Path) -> None:
    folder = fake_site(tmp_path / "site", *CUBLAS)
    loader = Loader()
    assert preload_cublas([str(tmp_path / "site")], loader) == str(folder)
    assert loader.loaded == [
        (str(folder / CUBLAS[0]), ctypes.RTLD_GLOBAL),
        (str(folder / CUBLAS[1]), ctypes.RTLD_GLOBAL),
    ]


def test_a_system_cuda_12_wins_over_pips(tmp_path: Path) -> None:
    fake_site(tmp_path / "site", *CUBLAS)
    loader = Loader("libcublas.so.12")
    assert "system" in preload_cublas([str(tmp_path / "site")], loader)
    assert loader.loaded == [("libcublas.so.12", None)]


def test_no_cublas_12_is_one_line_naming_the_fix_and_a_cuda_13_host() -> None:
    with pytest.raises(GpuError) as missing:
        preload_cublas([], Loader())
    assert "libcublas.so.12" in str(missing.value) and "pip install 'jachat[gpu]'" in str(missing.value)
    assert "\n" not in str(missing.value)
    with pytest.raises(GpuError) as cuda13:
        preload_cublas([], Loader("libcublas.so.13"))
    assert "CUDA 13's libcublas.so.13" in str(cuda13.value)


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler to build the fake libraries")
def test_a_preloaded_cublas_is_what_a_later_dlopen_by_name_gets(tmp_path: Path) -> None:
    """The mechanism itself, with real shared objects: after preload_cublas, dlopen("libcublas.so.12") (what
    CTranslate2 does) returns the pip copy, although no linker path leads to it."""
    folder = tmp_path / "site" / WHEEL_FOLDER
    folder.mkdir(parents=True)
    for name, answer in (("libcublasLt.so.12", 7), ("libcublas.so.12", 42)):
        source = tmp_path / f"{name}.c"
        source.write_text(f"int jachat_probe(void) {{ return {answer}; }}\n")
        subprocess.run(
            ["cc", "-shared", "-fPIC", f"-Wl,-soname,{name}", "-o", str(folder / name), str(source)], check=True
        )
    probe = (
        "import ctypes, sys; from jachat.service.engine.gpu import preload_cublas;"
        f"print(preload_cublas([{str(tmp_path / 'site')!r}]));"
        "print(ctypes.CDLL('libcublas.so.12').jachat_probe())"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.split() == [str(folder), "42"]


@pytest.mark.parametrize(
    ("driver", "index", "engine", "words"),
    [
        (Driver(None, 0, None), 0, 0, "there is no NVIDIA driver (libcuda.so.1 not found)"),
        (Driver(13000, 0, None), 0, 0, "the driver (CUDA 13.0) sees no GPU"),
        (Driver(12080, 1, (9, 0)), 3, 1, "--device-index 3, but only 1 GPU(s) are visible"),
        (Driver(12040, 1, (9, 0)), 0, 1, "needs driver R570 (CUDA 12.8) or later"),
    ],
)
def test_each_gpu_start_up_failure_is_one_line(driver: Driver, index: int, engine: int, words: str) -> None:
    with pytest.raises(GpuError) as failed:
        check_driver(driver, index, engine)
    assert words in str(failed.value) and "\n" not in str(failed.value)


def test_an_old_driver_is_fine_where_the_wheel_has_compiled_code() -> None:
    check_driver(Driver(12040, 1, (8, 6)), 0, 1)  # sm_86: compiled code, no PTX JIT
    check_driver(Driver(12080, 1, (9, 0)), 0, 1)  # H100 with R570
    check_driver(Driver(13000, 1, (9, 0)), 0, 1)  # a CUDA 13 driver runs CUDA 12 code


def test_no_gpu_names_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(GpuError, match="CUDA_VISIBLE_DEVICES=''"):
        check_driver(Driver(12080, 0, None), 0, 0)


@pytest.mark.parametrize(
    ("error", "words"),
    [
        (RuntimeError("CUDA failed with error out of memory"), "not enough memory on GPU 1 for the model (3.5 GiB"),
        (RuntimeError("CUDA failed with error the provided PTX was compiled with an unsupported toolchain."), "R570"),
        (RuntimeError("no kernel image is available for execution on the device"), "R570"),
        (OSError("libcublas.so.12: cannot open shared object file"), "pip install 'jachat[gpu]'"),
    ],
)
def test_the_engines_cuda_errors_become_one_line(error: Exception, words: str) -> None:
    with pytest.raises(GpuError) as failed, explain(1, int(3.5 * 2**30)):
        raise error
    assert words in str(failed.value)


def test_other_errors_pass_through_explain() -> None:
    with pytest.raises(RuntimeError, match="something else"), explain(0, 1):
        raise RuntimeError("something else")


def test_the_real_probe_answers_without_a_gpu() -> None:
    """On this machine (no GPU, probably no driver) the probe itself must not crash."""
    driver: Any = Driver.probe(0)
    assert driver.version is None or driver.version > 0
