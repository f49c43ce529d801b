from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from jachat.converter.convert import ConvertOptions, convert
from jachat.converter.demo import DemoShape, build_demo_checkpoint, train_tokenizer
from jachat.service.text.prompt import Speaker, Turn, render_prompt
from jachat.service.text.tokenizer import Tokenizer
from jachat.v1 import chat_pb2_grpc
from tests.helpers import script_checkpoint
from tests.servers import InProcessServer, serving


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    """The demo checkpoint's tokenizer (32000 pieces, <NL> a single piece), trained without the checkpoint or a
    model (a fraction of a second), so the fast tier has it too. The training is deterministic: it is byte for byte
    the demo checkpoint's spiece.model, which demo_checkpoint checks."""
    return Tokenizer(train_tokenizer(tmp_path_factory.mktemp("spm"), 32000, newline_piece=True))


@pytest.fixture(scope="session")
def demo_checkpoint(tmp_path_factory: pytest.TempPathFactory, tokenizer: Tokenizer) -> Path:
    """The offline rinna-shaped demo checkpoint (float32, vocabulary 32000, <NL> a single piece)."""
    checkpoint = build_demo_checkpoint(tmp_path_factory.mktemp("hf") / "demo", DemoShape())
    spiece = (checkpoint / "spiece.model").read_bytes()
    assert spiece == tokenizer.path.read_bytes(), "the demo checkpoint's spiece.model is not the tokenizer fixture's"
    return checkpoint


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


# What the scripted checkpoints write, token by token: "あ" split over three byte pieces, a stray 0xFF, <NL>,
# "猫", a 4-byte emoji over four byte pieces, a stray continuation byte, then </s>.
SCRIPTED_REPLY = "あ\ufffd\n猫😺\ufffd"
_SCRIPT = [
    "<0xE3>",
    "<0x81>",
    "<0x82>",
    "<0xFF>",
    "<NL>",
    "猫",
    "<0xF0>",
    "<0x9F>",
    "<0x98>",
    "<0xBA>",
    "<0x80>",
    "</s>",
]


def _script_ids(checkpoint: Path, pieces: list[str]) -> list[int]:
    tokenizer = Tokenizer(checkpoint / "spiece.model")
    prompt_last = tokenizer.encode(render_prompt([Turn(Speaker.USER, "x")]))[-1]
    ids = [prompt_last]
    for piece in pieces:
        ids += [tokenizer.pieces.index(piece)] if piece in tokenizer.pieces else tokenizer.encode(piece)
    return ids


@pytest.fixture(scope="session")
def scripted_checkpoint(demo_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Greedy replies are exactly SCRIPTED_REPLY, ended by </s>, whatever the prompt."""
    ids = _script_ids(demo_checkpoint, _SCRIPT)
    return script_checkpoint(demo_checkpoint, tmp_path_factory.mktemp("hf") / "scripted", ids)


@pytest.fixture(scope="session")
def scripted_split_nl_checkpoint(demo_checkpoint_split_nl: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """As scripted_checkpoint, on the vocabulary where <NL> is spelled with several pieces."""
    ids = _script_ids(demo_checkpoint_split_nl, _SCRIPT)
    return script_checkpoint(demo_checkpoint_split_nl, tmp_path_factory.mktemp("hf") / "scripted-split", ids)


@pytest.fixture(scope="session")
def scripted_model(scripted_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _convert(scripted_checkpoint, tmp_path_factory.mktemp("ct2") / "scripted", "float32")


@pytest.fixture(scope="session")
def server(model_f32: Path) -> Iterator[InProcessServer]:
    with serving(model_f32) as running:
        yield running


@pytest.fixture
def stub(server: InProcessServer) -> Iterator[chat_pb2_grpc.ChatServiceStub]:
    with server.channel() as channel:
        yield server.stub(channel)
