"""The fast tier: no model, no server process, no sleeps. Tokenizers are trained here in a fraction of a second."""

from __future__ import annotations

from pathlib import Path

import pytest

from jachat.converter.demo import train_tokenizer
from jachat.service.text.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    """The demo checkpoint's tokenizer (32000 pieces, <NL> a single piece), without the checkpoint."""
    return Tokenizer(train_tokenizer(tmp_path_factory.mktemp("spm"), 32000, newline_piece=True))


@pytest.fixture(scope="session")
def split_nl_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    """Like tokenizer, but <NL> is spelled with several pieces."""
    return Tokenizer(train_tokenizer(tmp_path_factory.mktemp("spm-split"), 32000, newline_piece=False))


@pytest.fixture(scope="session")
def tokenizer_path(tokenizer: Tokenizer) -> Path:
    return tokenizer.path
