"""Packaging: stubs generated at build time (not committed), entry points, buf lint of the API."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from tests.helpers import REPO


def test_stubs_are_not_committed() -> None:
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert "protos/jachat/v1/chat.proto" in tracked
    assert not [f for f in tracked.splitlines() if f.endswith(("_pb2.py", "_pb2_grpc.py", "_pb2.pyi"))]


@pytest.mark.slow
def test_the_release_build_installs_and_runs_from_a_fresh_venv(tmp_path: Path) -> None:
    """`python -m build` with no flags, as a release is built: the sdist, then the wheel built from the sdist (what
    pip does with an sdist from an index). The wheel goes into a fresh venv and runs from there, away from the
    source tree: every package imports and both servers' commands start."""
    dist = tmp_path / "dist"
    result = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(dist), str(REPO)], capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (sdist,) = dist.glob("jachat-*.tar.gz")
    (wheel,) = dist.glob("jachat-*.whl")
    with tarfile.open(sdist) as archive:
        members = archive.getmembers()
    assert not [m.name for m in members if m.issym() or m.islnk()]
    assert "jachat-0.1.0/jachat/service/edge/grpc/servicer.py" in {m.name for m in members}
    assert not [m.name for m in members if m.name.startswith("jachat-0.1.0/jachat/v1/")]  # the build generates them

    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(archive.read(n).decode() for n in names if n.endswith("entry_points.txt"))
        metadata = next(archive.read(n).decode() for n in names if n.endswith("METADATA"))
    assert {
        "jachat/__init__.py",
        "jachat/manifest.py",
        "jachat/v1/chat_pb2.py",
        "jachat/v1/chat_pb2_grpc.py",
        "jachat/v1/chat_pb2.pyi",
        "jachat/service/server.py",
        "jachat/service/edge/http/app.py",
        "jachat/service/engine/scheduler.py",
        "jachat/converter/convert.py",
        "jachat/bench/cli.py",
    } <= names
    # the wheel holds each source file of the package once, and nothing but jachat and its metadata at the top
    sources = {p.relative_to(REPO).as_posix() for p in (REPO / "jachat").rglob("*.py") if "v1" not in p.parts}
    assert sources <= names, sources - names
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

    # a fresh venv with the wheel alone; its dependencies come from this environment's site-packages, behind it on
    # the path (installing them again would download hundreds of MB and test pip, not this wheel)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python, bin_dir = venv / "bin" / "python", venv / "bin"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)],
        check=True,
        timeout=300,
    )
    site = next(p for p in map(Path, sys.path) if p.name == "site-packages" and p.is_dir())
    env = {**os.environ, "PYTHONPATH": str(site)}
    code = (
        "import jachat, jachat.service.server, jachat.converter.convert, jachat.bench.cli, jachat.v1.chat_pb2_grpc;"
        "print(jachat.__file__)"
    )
    imported = subprocess.run([str(python), "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.strip().startswith(str(venv)), imported.stdout
    for command in ("jachat-serve", "jachat-convert"):
        ran = subprocess.run(
            [str(bin_dir / command), "--help"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120
        )
        assert ran.returncode == 0 and "usage:" in ran.stdout, ran.stderr


@pytest.mark.slow
def test_a_clone_without_symbolic_links_passes_the_fast_tier(tmp_path: Path) -> None:
    """`git -c core.symlinks=false clone` (Windows' default) of the committed tree: nothing depends on a link."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "-c", "core.symlinks=false", "clone", "-q", str(REPO), str(clone)], check=True, timeout=120)
    subprocess.run([sys.executable, "hatch_build.py"], cwd=clone, check=True, capture_output=True, timeout=120)
    env = {**os.environ, "PYTHONPATH": str(clone)}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/fast"],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    assert " passed" in result.stdout


def test_module_entry_points_run() -> None:
    for module in ("jachat.converter", "jachat.service", "jachat.bench"):
        result = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True)
        assert result.returncode == 0 and "usage:" in result.stdout


def test_the_editable_install_imports_the_checkout() -> None:
    """`pip install -e .` (the quickstart's): jachat is the repository's own folder, so an edit is what runs."""
    import jachat.bench.cli
    import jachat.converter.convert
    import jachat.service.edge.grpc.servicer

    for module in (jachat.service.edge.grpc.servicer, jachat.converter.convert, jachat.bench.cli):
        path = Path(module.__file__ or "")
        assert path.resolve() == path and path.is_relative_to(REPO / "jachat")


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
