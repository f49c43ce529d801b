"""The layout's rules (ARCHITECTURE.md), checked on the source: who may import whom, and how big a module may grow."""

from __future__ import annotations

import ast
import subprocess
import sys

from tests.helpers import REPO

RUNTIME = ("service", "converter", "bench")  # the installed packages, jachat.<folder>
# the edge: the only modules that speak the generated API (bench is a client of it)
EDGE = {"service/servicer.py", "service/protocol.py", "service/client.py"} | {
    p.relative_to(REPO).as_posix() for p in (REPO / "bench").glob("*.py")
}


def modules() -> dict[str, set[str]]:
    """Every runtime module (path relative to the repository) and the modules it imports."""
    found = {}
    for folder in RUNTIME:
        for path in sorted((REPO / folder).glob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            imported: set[str] = set()
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    imported |= {alias.name for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module:
                    imported |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
            found[path.relative_to(REPO).as_posix()] = imported
    return found


def test_everything_is_imported_through_the_jachat_namespace() -> None:
    for module, imported in modules().items():
        stray = {m for m in imported if m.split(".")[0] in RUNTIME}
        assert not stray, f"{module} imports {stray}: use jachat.<package>"


def test_only_the_engine_imports_the_scheduler() -> None:
    importers = {m for m, imported in modules().items() if "jachat.service.engine.scheduler" in imported}
    assert importers == {"service/engine.py"}


def test_only_the_edge_imports_the_generated_chat_stubs() -> None:
    importers = {m for m, imported in modules().items() if any(i.startswith("jachat.v1") for i in imported)}
    assert importers <= EDGE, importers - EDGE
    assert "service/servicer.py" in importers and "service/protocol.py" in importers


def importers_of(prefix: str) -> set[str]:
    return {m for m, imported in modules().items() if any(i == prefix or i.startswith(prefix + ".") for i in imported)}


def test_each_optional_library_has_one_door() -> None:
    """The HTTP stack and OpenAI's shapes stay in the HTTP edge, OpenTelemetry in tracing.py: the rest of the
    service never depends on an optional extra, and swapping one touches one module."""
    assert importers_of("aiohttp") == {"service/http_api.py"}
    assert importers_of("jachat.service.edge.http.openai_request") | importers_of(
        "jachat.service.edge.http.openai_response"
    ) == {"service/http_api.py"}
    assert importers_of("opentelemetry") == {"service/tracing.py"}
    # the server reaches the HTTP API only through a deferred import, so a gRPC-only install never loads aiohttp
    assert "service/server.py" in importers_of("jachat.service.edge.http.api")
    probe = "import sys, jachat.service.server; print(sorted(m for m in sys.modules if m.startswith('aiohttp')))"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout == "[]\n"


def test_metrics_never_see_a_live_sequence() -> None:
    imported = modules()["service/metrics.py"]
    assert not {
        m for m in imported if m.startswith(("jachat.service.engine.sequence", "jachat.service.engine.scheduler"))
    }


def test_no_runtime_module_is_over_300_lines() -> None:
    sizes = {
        p.relative_to(REPO).as_posix(): len(p.read_text(encoding="utf-8").splitlines())
        for folder in RUNTIME
        for p in (REPO / folder).glob("*.py")
    }
    assert {m: n for m, n in sizes.items() if n > 300} == {}
