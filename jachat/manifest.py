"""The manifest written beside a converted model: where it came from, how, and a checksum of every file.

This module has no heavy imports: the service reads and verifies manifests with it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MANIFEST_NAME = "jachat-manifest.json"
TOKENIZER_FILE = "spiece.model"  # the sentencepiece model, copied beside the converted model
FORMAT_VERSION = 1


class ManifestError(Exception):
    """A manifest is missing, unreadable, or does not match the files beside it."""


# The files the service loads: each must have a checksum in the manifest, or a corrupted one would be served.
MODEL_FILES = ("model.bin", "config.json", "vocabulary.json", TOKENIZER_FILE)


@dataclass(frozen=True)
class ModelShape:
    architecture: str
    num_layers: int
    hidden_size: int
    num_heads: int
    vocab_size: int
    context_length: int

    def problems(self) -> list[str]:
        """What makes no sense for a GPT-NeoX model (a hand-edited or damaged manifest)."""
        found = [f"{name} is {getattr(self, name)}; must be at least 1" for name in _SIZES if getattr(self, name) < 1]
        if not found and self.hidden_size % self.num_heads:
            found.append(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        if self.context_length < 16:
            found.append(f"context_length is {self.context_length}; a chat prompt needs at least 16 tokens")
        return found


_SIZES = ("num_layers", "hidden_size", "num_heads", "vocab_size", "context_length")


@dataclass(frozen=True)
class Manifest:
    source: str
    revision: str | None
    quantization: str
    shape: ModelShape
    tools: dict[str, str]
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256
    format: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, ensure_ascii=False, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        try:
            return cls(
                source=str(data["source"]),
                revision=data.get("revision"),
                quantization=str(data["quantization"]),
                shape=ModelShape(**data["shape"]),
                tools={str(k): str(v) for k, v in data["tools"].items()},
                files={str(k): str(v) for k, v in data["files"].items()},
                format=int(data.get("format", FORMAT_VERSION)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"malformed manifest: {exc!r}") from exc


def sha256_file(path: Path, chunk_size: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def checksum_folder(folder: Path) -> dict[str, str]:
    """sha256 of every file under folder except the manifest itself, keyed by POSIX relative path."""
    return {
        path.relative_to(folder).as_posix(): sha256_file(path)
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != MANIFEST_NAME
    }


def write_manifest(folder: Path, manifest: Manifest) -> Path:
    path = folder / MANIFEST_NAME
    path.write_text(manifest.to_json(), encoding="utf-8")
    return path


def read_manifest(folder: Path) -> Manifest:
    path = folder / MANIFEST_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ManifestError(f"no {MANIFEST_NAME} in {folder}: convert the model with jachat-convert") from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise ManifestError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ManifestError(f"malformed manifest {path}: not a JSON object")
    manifest = Manifest.from_dict(data)
    if problems := manifest.shape.problems():
        raise ManifestError(f"malformed manifest {path}: {'; '.join(problems)}")
    return manifest


def check_manifest(folder: Path, manifest: Manifest) -> None:
    """Raise ManifestError when the manifest cannot vouch for the model: a file the service loads has no checksum."""
    unlisted = [name for name in MODEL_FILES if name not in manifest.files]
    if unlisted:
        raise ManifestError(
            f"the manifest in {folder} is incomplete: no checksum for {', '.join(unlisted)} (convert the model again)"
        )


def verify_manifest(folder: Path, manifest: Manifest) -> None:
    """Raise ManifestError naming every file that is missing or whose sha256 differs."""
    check_manifest(folder, manifest)
    problems = []
    for name, expected in sorted(manifest.files.items()):
        path = folder / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif sha256_file(path) != expected:
            problems.append(f"{name}: sha256 mismatch")
    if problems:
        raise ManifestError(f"model folder {folder} does not match its manifest: " + "; ".join(problems))
