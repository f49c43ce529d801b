"""jachat-serve: run the gRPC service."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence

from jachat.manifest import ManifestError
from jachat.service.observability.logs import configure as configure_logging
from jachat.service.server import run
from jachat.service.settings import load_settings


def main(argv: Sequence[str] | None = None) -> int:
    settings = load_settings(argv)
    configure_logging(settings.log_level, settings.log_format)
    try:
        asyncio.run(run(settings))
    except ManifestError as exc:
        print(f"jachat-serve: error: {exc}", file=sys.stderr)
        return 1
    except (OSError, RuntimeError, ValueError) as exc:
        print(f"jachat-serve: error: cannot serve {settings.model} on port {settings.port}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0
