from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from converter.convert import ConvertOptions, convert
from converter.demo import DemoShape, build_demo_checkpoint
from tests.helpers import ServerProcess, hf_generate, start_server, steer_output
from service.prompt import Speaker, Turn, render_prompt
from service.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def demo_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The offline rinna-shaped demo checkpoint (float32, vocabulary 32000, <NL> a single piece)."""
    return build_demo_checkpoint(tmp_path_factory.mktemp("hf") / "demo", DemoShape())


@pytest.fixture(scope="session")
def demo_checkpoint_split_nl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Like demo_checkpoint, but <NL> is not in the vocabulary (it is spelled with several pieces)."""
    return build_demo_checkpoint(tmp_path_factory.mktemp("hf") / "split-nl", DemoShape(newline_piece=False))


def _convert(source: Path, output: Path, quantization: str) -> Path:
    return convert(ConvertOptions(source=str(source), output=output, quantization=quantization))


@pytest.fixture(scope="session")
def model_f32(demo_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _convert(demo_checkpoint, tmp_path_factory.mktemp("ct2") / "f32", "float32")


@pytest.fixture(scope="session")
def model_int8(demo_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _convert(demo_checkpoint, tmp_path_factory.mktemp("ct2") / "int8", "int8")


@pytest.fixture(scope="session")
def tokenizer(demo_checkpoint: Path) -> Tokenizer:
    return Tokenizer(demo_checkpoint / "spiece.model")


@pytest.fixture(scope="session")
def byte_heavy_checkpoint(demo_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Output head steered towards byte-fallback pieces, so greedy replies are mostly raw bytes:
    multi-byte characters split over several tokens, and stray bytes that are not valid UTF-8."""
    from tests.helpers import piece_id

    byte_ids = [piece_id(demo_checkpoint, f"<0x{b:02X}>") for b in range(256)]

    def edit(out: np.ndarray) -> None:
        out[byte_ids] *= 4.0

    return steer_output(demo_checkpoint, tmp_path_factory.mktemp("hf") / "bytes", edit)


def _steered_to(checkpoint: Path, target_id: int, tmp: Path, name: str, step: int = 6) -> Path:
    """A copy whose head emits target_id wherever plain greedy decoding of the card prompt picks the token
    it picked at `step`: that token's output row, doubled, becomes target_id's row."""
    tokenizer = Tokenizer(checkpoint / "spiece.model")
    prompt_ids = tokenizer.encode(render_prompt([Turn(Speaker.USER, "吾輩は猫である。名前はまだ無い。")]))
    plain = hf_generate(checkpoint, prompt_ids, step + 1)
    chosen = plain[step]

    def edit(out: np.ndarray) -> None:
        out[target_id] = 2.0 * out[chosen]

    return steer_output(checkpoint, tmp / name, edit)


@pytest.fixture(scope="session")
def eos_checkpoint(demo_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint whose greedy reply ends with </s> after a few tokens."""
    return _steered_to(demo_checkpoint, 3, tmp_path_factory.mktemp("hf"), "eos")


@pytest.fixture(scope="session")
def newline_checkpoint(demo_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint whose greedy reply contains the <NL> piece."""
    from tests.helpers import piece_id

    return _steered_to(demo_checkpoint, piece_id(demo_checkpoint, "<NL>"), tmp_path_factory.mktemp("hf"), "nl",
                       step=2)


@pytest.fixture(scope="session")
def server(model_f32: Path) -> Iterator[ServerProcess]:
    process = start_server(model_f32)
    yield process
    process.stop()


@pytest.fixture
def stub(server: ServerProcess) -> Iterator[object]:
    with server.channel() as channel:
        yield server.stub(channel)
