"""Packaging: stubs generated at build time (not committed), entry points, buf lint of the API."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.helpers import REPO


def test_stubs_are_not_committed() -> None:
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert "protos/jachat/v1/chat.proto" in tracked
    assert not [f for f in tracked.splitlines() if f.endswith(("_pb2.py", "_pb2_grpc.py", "_pb2.pyi"))]


@pytest.mark.slow
def test_wheel_ships_generated_stubs_and_entry_points(tmp_path: Path) -> None:
    """`pip install .` builds a wheel through the hatchling hook; the stubs must be inside it."""
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(REPO)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    (wheel,) = tmp_path.glob("jachat-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(archive.read(n).decode() for n in names if n.endswith("entry_points.txt"))
        metadata = next(archive.read(n).decode() for n in names if n.endswith("METADATA"))
    assert {
        "jachat/__init__.py",
        "jachat/v1/chat_pb2.py",
        "jachat/v1/chat_pb2_grpc.py",
        "jachat/v1/chat_pb2.pyi",
        "jachat/service/server.py",
        "jachat/converter/convert.py",
        "jachat/bench/cli.py",
    } <= names
    # one import namespace: nothing but jachat (and the wheel's own metadata) at the top level
    assert {name.split("/")[0] for name in names} == {"jachat", "jachat-0.1.0.dist-info"}
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    for script in (
        "jachat-convert = jachat.converter.cli:main",
        "jachat-serve = jachat.service.cli:main",
        "jachat-chat = jachat.service.client:main",
        "jachat-bench = jachat.bench.cli:main",
    ):
        assert script in entry_points
    runtime = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert not [line for line in runtime if "torch" in line or "transformers" in line or "tokenizers" in line]
    # the installed wheel works on its own, away from the source tree
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        timeout=300,
    )
    code = (
        "import jachat.v1.chat_pb2 as p, jachat.v1.chat_pb2_grpc as g, jachat.service.edge.grpc.servicer as s, jachat.bench.cli;"
        "print(p.__file__, s.__file__, g.ChatServiceStub)"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(target)!r}); {code}"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(str(target)) and out.stdout.split()[1].startswith(str(target))


def test_module_entry_points_run() -> None:
    for module in ("jachat.converter", "jachat.service", "jachat.bench"):
        result = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True)
        assert result.returncode == 0 and "usage:" in result.stdout


def test_the_editable_install_imports_the_checkout_through_one_namespace() -> None:
    """`pip install -e .` (the quickstart's): jachat.service is the repository's service/ folder, seen through
    the jachat/service link, so an edit in service/ is what runs."""
    import jachat.bench.cli
    import jachat.converter.convert
    import jachat.service.edge.grpc.servicer

    for module, folder in (
        (jachat.service.edge.grpc.servicer, "service"),
        (jachat.converter.convert, "converter"),
        (jachat.bench.cli, "bench"),
    ):
        assert Path(module.__file__ or "").resolve().parent == REPO / folder
    assert (REPO / "jachat" / "service").is_symlink() and (REPO / "jachat" / "service").resolve() == REPO / "service"


# the pinned buf of jachat[test] (buf-bin, from PyPI) beside this Python, else the one on the PATH
_PINNED_BUF = Path(sys.executable).parent / "buf"
BUF = str(_PINNED_BUF) if _PINNED_BUF.is_file() else shutil.which("buf")


@pytest.mark.skipif(not BUF and not os.environ.get("CI"), reason="buf not installed (pip install 'jachat[test]')")
def test_api_is_clean_under_buf_standard_lint() -> None:
    assert BUF, "CI must provide buf (jachat[test] installs buf-bin)"
    result = subprocess.run([BUF, "lint"], cwd=REPO / "protos", capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    config = (REPO / "protos" / "buf.yaml").read_text()
    assert "STANDARD" in config


@pytest.mark.skipif(not BUF and not os.environ.get("CI"), reason="buf not installed (pip install 'jachat[test]')")
def test_api_changes_break_no_client_of_the_released_api() -> None:
    """buf breaking (FILE rules) against the API as released in 0.1.0 (its buf image, kept in tests/data): fields
    and values are added, never renamed, renumbered or removed."""
    assert BUF
    released = REPO / "tests" / "data" / "jachat-v1-api-0.1.0.binpb"
    result = subprocess.run(
        [BUF, "breaking", "--against", str(released)], cwd=REPO / "protos", capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_readme_grpcurl_bodies_are_valid_requests() -> None:
    """grpcurl is not installable here; its -d bodies are checked against the real messages (protobuf JSON)."""
    import re

    from google.protobuf import json_format

    from jachat.v1 import chat_pb2

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    calls = re.findall(r"-d '(\{.*?\})'(?:\s*\\\n\s*)?\s*localhost:50051 ([\w.]+)/(\w+)", readme)
    assert calls, "no grpcurl calls with a body in the README"
    for body, service, method in calls:
        if service == "jachat.v1.ChatService":
            request_type = getattr(
                chat_pb2,
                f"{method.removesuffix('Stream')}StreamRequest" if method.endswith("Stream") else f"{method}Request",
            )
            message = json_format.Parse(body, request_type())
            assert message.turns and message.turns[0].speaker == chat_pb2.SPEAKER_USER
