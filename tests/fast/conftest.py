"""The fast tier: no model, no server process, no sleeps. Tokenizers are trained in a fraction of a second: the
`tokenizer` fixture is tests/conftest.py's (the one every tier uses), the others are here."""

from __future__ import annotations

from pathlib import Path

import pytest

from jachat.converter.demo import train_tokenizer
from jachat.service.text.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def split_nl_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    """Like tokenizer (tests/conftest.py), but <NL> is spelled with several pieces."""
    return Tokenizer(train_tokenizer(tmp_path_factory.mktemp("spm-split"), 32000, newline_piece=False))


@pytest.fixture(scope="session")
def tokenizer_path(tokenizer: Tokenizer) -> Path:
    return tokenizer.path
