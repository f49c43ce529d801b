"""jachat-serve: run the gRPC service."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence

from converter.manifest import ManifestError
from service.server import run
from service.settings import load_settings


def main(argv: Sequence[str] | None = None) -> int:
    settings = load_settings(argv)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
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
