"""The layout's rules (ARCHITECTURE.md), checked on the source: the layers contract (import-linter, configured in
pyproject.toml), and who may import a few modules that have one door."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO

PACKAGE = REPO / "jachat"
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def modules() -> dict[str, set[str]]:
    """Every module of the package but the generated stubs (path relative to the repository), and what it imports."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if "v1" in path.relative_to(PACKAGE).parts:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        imported: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
        found[path.relative_to(REPO).as_posix()] = imported
    return found


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """import-linter over the `jachat` package found in `root`, with the repository's contracts."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [str(LINT_IMPORTS), str(REPO / "pyproject.toml"), "--no-cache"],
        capture_output=True,
        text=True,
        cwd=root,
        env=env,
        timeout=120,
    )


def test_the_layers_contract_holds() -> None:
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_the_layers_contract_fails_on_a_violation(tmp_path: Path) -> None:
    """The contract bites: a copy of the package with four violations (a transport in the engine, the domain
    importing an edge, one edge importing the other, CTranslate2 in the server process) breaks exactly those
    contracts."""
    copy = tmp_path / "jachat"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    for module, line in (
        ("service/engine/gpu.py", "import grpc"),
        ("service/domain/results.py", "from jachat.service.edge import calls"),
        ("service/edge/grpc/servicer.py", "from jachat.service.edge.http import status"),
        ("service/engine/sequence.py", "import ctranslate2"),
    ):
        path = copy / module
        path.write_text(path.read_text(encoding="utf-8") + f"\n{line}  # a deliberate violation\n", encoding="utf-8")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert "4 broken" in result.stdout, result.stdout
    for violation in (
        "jachat.service.engine.gpu -> grpc",
        "jachat.service.domain.results -> jachat.service.edge.calls",
        "jachat.service.edge.grpc.servicer -> jachat.service.edge.http.status",
        "jachat.service.engine.sequence -> ctranslate2",
    ):
        assert violation in result.stdout, result.stdout


def dotted_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_every_module_is_held_to_the_contracts(tmp_path: Path) -> None:
    """No module escapes a contract by being new or unlisted: a copy of the package where every module of the
    service but engine.core imports CTranslate2, every module below the edges imports grpc, and every module
    outside the engine package imports the scheduler breaks the three contracts at every one of those modules."""
    copy = tmp_path / "jachat"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    below_edges = (
        *("service/engine/", "service/observability/", "service/domain/", "service/text/"),
        *("service/edge/calls.py", "service/edge/identity.py"),
    )
    expected = []
    for path in sorted(p for p in copy.rglob("*.py") if p.name != "__init__.py" and "v1" not in p.parts):
        module, relative = dotted_name(path, tmp_path), path.relative_to(copy).as_posix()
        lines = []
        if relative.startswith("service/") and module != "jachat.service.engine.core":
            lines.append("import ctranslate2")
            expected.append(f"{module} -> ctranslate2")
        if relative.startswith(below_edges):
            lines.append("import grpc")
            expected.append(f"{module} -> grpc")
        if not relative.startswith("service/engine/"):
            lines.append("import jachat.service.engine.scheduler")
            expected.append(f"{module} -> jachat.service.engine.scheduler")
        text = path.read_text(encoding="utf-8")
        path.write_text(
            text + "".join(f"\n{line}  # a deliberate violation" for line in lines) + "\n", encoding="utf-8"
        )
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    report = " ".join(result.stdout.split())  # (it wraps long lines)
    missed = [violation for violation in expected if violation not in report]
    assert not missed, f"{len(missed)} violations kept their contracts: {missed[:10]}"


def test_a_new_module_outside_every_layer_breaks_the_layers_contract(tmp_path: Path) -> None:
    """The layers contract is exhaustive: a module of the service that no layer names is a broken contract."""
    copy = tmp_path / "jachat"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "service" / "stray.py").write_text('"""A module no layer names."""\n', encoding="utf-8")
    result = lint_imports(tmp_path)
    assert result.returncode != 0 and "stray" in result.stdout, result.stdout


def test_everything_is_imported_through_the_jachat_namespace() -> None:
    for module, imported in modules().items():
        stray = {m for m in imported if m.split(".")[0] in ("service", "converter", "bench")}
        assert not stray, f"{module} imports {stray}: use jachat.<package>"


def test_only_the_engine_imports_the_scheduler() -> None:
    importers = {m for m, imported in modules().items() if "jachat.service.engine.scheduler" in imported}
    assert importers == {"jachat/service/engine/engine.py"}


def test_only_the_grpc_edge_and_its_clients_import_the_generated_chat_stubs() -> None:
    importers = {m for m, imported in modules().items() if any(i.startswith("jachat.v1") for i in imported)}
    allowed = ("jachat/service/edge/grpc/", "jachat/service/client.py", "jachat/bench/")
    assert {m for m in importers if not m.startswith(allowed)} == set()
    assert {"jachat/service/edge/grpc/servicer.py", "jachat/service/edge/grpc/protocol.py"} <= importers


def importers_of(prefix: str) -> set[str]:
    return {m for m, imported in modules().items() if any(i == prefix or i.startswith(prefix + ".") for i in imported)}


def test_each_optional_library_has_one_door() -> None:
    """The HTTP stack and OpenAI's shapes stay in the HTTP edge, OpenTelemetry in tracing.py: the rest of the
    service never depends on an optional extra, and swapping one touches one module. The benchmark's client of
    OpenAI-compatible servers (the bench extra) is its own one door to aiohttp."""
    aiohttp = importers_of("aiohttp")
    assert "jachat/service/edge/http/app.py" in aiohttp
    assert {m for m in aiohttp if not m.startswith("jachat/service/edge/http/")} == {"jachat/bench/clients.py"}
    assert importers_of("opentelemetry") == {"jachat/service/observability/tracing.py"}
    # the server reaches the HTTP API only through a deferred import, so a gRPC-only install never loads aiohttp
    assert "jachat/service/server.py" in importers_of("jachat.service.edge.http.app")
    probe = "import sys, jachat.service.server; print(sorted(m for m in sys.modules if m.startswith('aiohttp')))"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout == "[]\n"


def test_metrics_never_see_a_live_sequence() -> None:
    imported = modules()["jachat/service/observability/metrics.py"]
    assert not {m for m in imported if m.startswith(("jachat.service.engine.sequence", "jachat.service.engine"))}


def test_no_symbolic_link_anywhere_in_the_repository() -> None:
    """A link becomes a 10-byte text file in a clone without symlinks (Windows' default) and is shipped twice or
    not at all by a build backend: the repository has none."""
    staged = subprocess.run(["git", "ls-files", "-s"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert [line for line in staged.splitlines() if line.startswith("120000")] == []
