"""The docs tell the truth about the tree: every repository path README.md and ARCHITECTURE.md quote exists, and the
README's table of sampling fields is the code's."""

from __future__ import annotations

import fnmatch
import itertools
import re
import subprocess

import pytest

from jachat.service.domain.sampling import FIELDS
from tests.helpers import REPO

DOCS = ("README.md", "ARCHITECTURE.md")
# files of a converted model folder or a checkpoint, which the docs name but the repository does not hold
MODEL_FILES = {"config.json", "tokenizer_config.json", "jachat-manifest.json", "spiece.model", "model.bin"}
EXTENSIONS = r"\.(py|md|toml|yaml|yml|json|proto|png|txt|binpb)$"


def tracked() -> list[str]:
    listed = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    files = listed.splitlines()
    untracked = subprocess.run(
        ["git", "ls-files", "--others", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    return files + untracked.splitlines()


def quoted(text: str) -> set[str]:
    """What a doc quotes as a path: code spans and link targets that look like one (a top-level entry of the
    repository, or a name with a file extension)."""
    top = {p.name for p in REPO.iterdir()} - {".git"}
    found = set()
    text = re.sub(r"```.*?```", "", text, flags=re.DOTALL)  # fenced blocks are commands and trees, not quotes
    for match in re.finditer(r"`([^`]+)`|\]\(([^)\s#]+)", text):  # code spans in order, so they pair up right
        token = (match.group(1) or match.group(2)).split("::")[0].rstrip(".,:;")
        if token.startswith(("http://", "https://", "-", "/", "$", "~", "<")) or not re.fullmatch(
            r"[\w.\-/*{},]+", token
        ):
            continue
        if token.split("/")[0] in top or re.search(EXTENSIONS, token):
            found.add(token)
    return found


def expand(pattern: str) -> list[str]:
    """Shell-style braces ({a,b}) and DATE placeholders as globs."""
    parts = re.split(r"\{([^}]*)\}", pattern.replace("DATE", "*"))
    options = [p.split(",") if i % 2 else [p] for i, p in enumerate(parts)]
    return ["".join(choice) for choice in itertools.product(*options)]


def ignored(token: str) -> bool:
    """A build output or cache the docs describe (git ignores it): .cache/tf5, the generated stubs."""
    probe = token.replace("*", "x")
    return subprocess.run(["git", "check-ignore", "-q", "--no-index", probe], cwd=REPO).returncode == 0


def exists(token: str, files: list[str]) -> bool:
    folders = {"/".join(f.split("/")[:i]) + "/" for f in files for i in range(1, f.count("/") + 1)}
    for pattern in expand(token):
        if pattern.rstrip("/") + "/" in folders:
            return True
        if "/" in pattern.rstrip("/"):  # from the root, or below a folder (ARCHITECTURE's jachat/service/...)
            if any(fnmatch.fnmatch(f, pattern) or fnmatch.fnmatch(f, "*/" + pattern) for f in files):
                return True
        elif any(fnmatch.fnmatch(f.rsplit("/", 1)[-1], pattern) or fnmatch.fnmatch(f, pattern) for f in files):
            return True  # a bare file name: somewhere in the tree
    return False


@pytest.mark.parametrize("doc", DOCS)
def test_every_repository_path_the_docs_quote_exists(doc: str) -> None:
    files = tracked()
    text = (REPO / doc).read_text(encoding="utf-8")
    # DATE stands for a report a run writes (docs/benchmarks/DATE-gpu-check.json), not one that must exist
    candidates = {t for t in quoted(text) if t not in MODEL_FILES and "DATE" not in t}
    missing = sorted(t for t in candidates if not exists(t, files) and not ignored(t))
    assert missing == [], f"{doc} quotes paths that do not exist: {missing}"


def test_the_path_check_bites() -> None:
    files = tracked()
    assert exists("jachat/service/edge/calls.py", files) and exists("calls.py", files)
    assert not exists("service/scheduler.py", files) and not exists("tests/test_prompt.py", files)
    assert quoted("see `service/gpu.py` and [the test](tests/fast/test_gpu.py)") == {
        "service/gpu.py",
        "tests/fast/test_gpu.py",
    }


def test_the_readme_sampling_table_is_the_codes() -> None:
    """One table of sampling fields in the code drives both edges; the README shows it as it is."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    marker = "<!-- sampling-fields:"
    assert marker in readme
    lines = readme.split(marker, 1)[1].splitlines()[1:]
    table = list(itertools.takewhile(lambda line: line.startswith("|"), lines))[2:]
    expected = []
    for f in FIELDS:
        note = f" ({f.note})" if f.note else ""
        kind = "integer" if f.type is int else "number"
        expected.append(f"| `{f.proto}` | `{f.openai}` | {kind} | {f.range_text()}{note} | {f.default:g} |")
    assert table == expected


def test_every_flag_is_in_the_readmes_configuration_table() -> None:
    """jachat-serve's flags (the Settings fields) each have a row in the README's table: no flag goes undocumented."""
    import dataclasses

    from jachat.service.settings import Settings

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    table = readme.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| `--")]
    missing = [
        f.name for f in dataclasses.fields(Settings) if not any(f"`--{f.name.replace('_', '-')}`" in r for r in rows)
    ]
    assert missing == []
