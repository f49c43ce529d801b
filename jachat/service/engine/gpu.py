"""The GPU runtime: CUDA 12's cuBLAS found at start-up, and each GPU start-up failure said in one clear line.

The ctranslate2 wheel is built with CUDA 12.8: it links the CUDA runtime in, but dlopens `libcublas.so.12` (and
`libcublasLt.so.12`) at the first GPU call. A host with only an NVIDIA driver, or with CUDA 13 only, has neither,
and the failure would come at the first request. pip can provide them (`nvidia-cublas-cu12`, the `gpu` extra) under
`site-packages/nvidia/cublas/lib`, where the dynamic linker never looks. So before the model loads, `prepare` loads
them from there by full path (RTLD_GLOBAL): CTranslate2's later dlopen by name finds the library already loaded.
A system CUDA 12 that the linker finds by name wins over the pip copy.

The wheel carries GPU code up to sm_86 and PTX for sm_86 only: a newer GPU (H100: sm_90) runs the PTX, JIT-compiled
by the driver, which must know CUDA 12.8's PTX (driver R570 or later); an older driver fails with
cudaErrorUnsupportedPtxVersion at the first kernel. `prepare` checks the driver first, and `explain` turns the
engine's own CUDA errors into the same kind of line.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CUBLAS = ("libcublasLt.so.12", "libcublas.so.12")  # Lt first: libcublas needs it
WHEEL_FOLDER = Path("nvidia") / "cublas" / "lib"  # where nvidia-cublas-cu12 puts them in site-packages
PTX_DRIVER = 12080  # cuDriverGetVersion of CUDA 12.8 (driver R570): the wheel's PTX needs at least this
SASS_UP_TO = (8, 6)  # compute capabilities with compiled code in the wheel; newer ones need the PTX JIT
INSTALL_HINT = "pip install 'jachat[gpu]' (nvidia-cublas-cu12), or put CUDA 12's lib64 on LD_LIBRARY_PATH"


class GpuError(ValueError):
    """A GPU start-up failure: its message is the one line an operator reads."""


def cublas_folders(paths: Sequence[str] | None = None) -> list[Path]:
    """Folders on the import path that hold cuBLAS 12 from pip (site-packages/nvidia/cublas/lib)."""
    found = []
    for entry in sys.path if paths is None else paths:
        folder = Path(entry or ".") / WHEEL_FOLDER
        if (folder / CUBLAS[-1]).is_file() and folder not in found:
            found.append(folder)
    return found


def preload_cublas(paths: Sequence[str] | None = None, loader: Callable[..., Any] = ctypes.CDLL) -> str:
    """Make libcublas.so.12 loadable by name for CTranslate2: the system's if the linker finds it, else pip's,
    loaded by full path. Returns where it came from; raises GpuError when there is none."""
    try:
        loader(CUBLAS[-1])
        return "the system (found by the dynamic linker)"
    except OSError:
        pass
    for folder in cublas_folders(paths):
        try:
            for name in CUBLAS:
                if (folder / name).is_file():
                    loader(str(folder / name), mode=ctypes.RTLD_GLOBAL)
        except OSError as exc:
            raise GpuError(f"cuBLAS 12 in {folder} cannot be loaded ({exc}); reinstall it: {INSTALL_HINT}") from None
        return str(folder)
    others = (
        " (this host has CUDA 13's libcublas.so.13, which the wheel cannot use)"
        if _loadable("libcublas.so.13", loader)
        else ""
    )
    raise GpuError(f"--device cuda needs CUDA 12's cuBLAS (libcublas.so.12), not found{others}: {INSTALL_HINT}")


def _loadable(name: str, loader: Callable[..., Any]) -> bool:
    try:
        loader(name)
        return True
    except OSError:
        return False


@dataclass(frozen=True)
class Driver:
    """What the NVIDIA driver says (None: no driver library)."""

    version: int | None  # cuDriverGetVersion: 12080 is CUDA 12.8
    devices: int
    capability: tuple[int, int] | None  # of the GPU asked for

    @classmethod
    def probe(cls, index: int) -> Driver:
        try:
            cuda = ctypes.CDLL("libcuda.so.1")
        except OSError:
            return cls(None, 0, None)
        version, count = ctypes.c_int(0), ctypes.c_int(0)
        if cuda.cuInit(0) != 0 or cuda.cuDriverGetVersion(ctypes.byref(version)) != 0:
            return cls(version.value or None, 0, None)
        cuda.cuDeviceGetCount(ctypes.byref(count))
        device, major, minor = ctypes.c_int(0), ctypes.c_int(0), ctypes.c_int(0)
        capability = None
        if index < count.value and cuda.cuDeviceGet(ctypes.byref(device), index) == 0:
            cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, device)  # COMPUTE_CAPABILITY_MAJOR
            cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, device)  # COMPUTE_CAPABILITY_MINOR
            capability = (major.value, minor.value)
        return cls(version.value, count.value, capability)


def _cuda(version: int) -> str:
    return f"{version // 1000}.{version % 1000 // 10}"


def check_driver(driver: Driver, index: int, engine_devices: int) -> None:
    """No GPU although one was asked for, or a driver too old for the wheel's PTX: one line each."""
    if driver.version is None:
        raise GpuError("--device cuda, but there is no NVIDIA driver (libcuda.so.1 not found): use --device cpu")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if engine_devices == 0 or driver.devices == 0:
        where = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
        raise GpuError(f"--device cuda, but the driver (CUDA {_cuda(driver.version)}) sees no GPU{where}")
    if index >= max(engine_devices, driver.devices):
        raise GpuError(f"--device-index {index}, but only {driver.devices} GPU(s) are visible")
    if driver.capability is not None and driver.capability > SASS_UP_TO and driver.version < PTX_DRIVER:
        raise GpuError(
            f"the NVIDIA driver supports CUDA {_cuda(driver.version)}, but this GPU (compute capability "
            f"{driver.capability[0]}.{driver.capability[1]}) runs the ctranslate2 wheel's CUDA 12.8 PTX, which "
            "needs driver R570 (CUDA 12.8) or later (else cudaErrorUnsupportedPtxVersion): upgrade the driver"
        )


def prepare(index: int, engine_devices: int, driver: Driver | None = None) -> str:
    """Before the model loads on GPU `index`: the driver's checks, then cuBLAS 12. Returns where cuBLAS is from."""
    check_driver(driver or Driver.probe(index), index, engine_devices)
    return preload_cublas()


@contextlib.contextmanager
def explain(index: int, model_bytes: int) -> Iterator[None]:
    """The engine's CUDA errors while it loads and warms up, as one line that says what to do."""
    try:
        yield
    except (RuntimeError, OSError, ValueError) as exc:
        text = str(exc)
        lowered = text.lower()
        if "out of memory" in lowered:
            raise GpuError(
                f"not enough memory on GPU {index} for the model ({model_bytes / 2**30:.1f} GiB of weights, plus "
                f"the KV cache of --max-batch-size sequences per replica): free the GPU, lower --replicas or "
                f"--max-batch-size, or use int8_float16 ({text})"
            ) from None
        if "ptx" in lowered or "no kernel image" in lowered:
            raise GpuError(
                f"this GPU cannot run the ctranslate2 wheel's kernels ({text}): its PTX needs driver R570 "
                "(CUDA 12.8) or later"
            ) from None
        if "libcublas" in lowered:
            raise GpuError(f"cuBLAS 12 could not be loaded ({text}): {INSTALL_HINT}") from None
        raise
