"""Test helpers: demo checkpoints with steered output heads, and a real jachat-serve process on loopback."""

from __future__ import annotations

import asyncio
import itertools
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from google.rpc import status_pb2
from grpc_status import rpc_status

from jachat.bench.launcher import ServerProcess, health_stub
from jachat.v1 import chat_pb2

__all__ = ["ServerProcess", "health_stub"]

REPO = Path(__file__).resolve().parents[1]
MODEL_CARD = REPO.parent / "shared" / "model-card.txt"

CARD_TURNS = [
    ("ユーザー", "コンタクトレンズを慣れるにはどうすればよいですか?"),
    ("システム", "これについて具体的に説明していただけますか?何が難しいのでしょうか?"),
    ("ユーザー", "目が痛いのです。"),
    (
        "システム",
        "分かりました、コンタクトレンズをつけると目がかゆくなるということですね。思った以上にレンズを外す必要があるでしょうか?",
    ),
    ("ユーザー", "いえ、レンズは外しませんが、目が赤くなるんです。"),
]


def user(text: str) -> chat_pb2.Turn:
    return chat_pb2.Turn(speaker=chat_pb2.SPEAKER_USER, text=text)


def system(text: str) -> chat_pb2.Turn:
    return chat_pb2.Turn(speaker=chat_pb2.SPEAKER_SYSTEM, text=text)


def card_turns_pb() -> list[chat_pb2.Turn]:
    return [user(t) if s == "ユーザー" else system(t) for s, t in CARD_TURNS]


def details(error: grpc.RpcError) -> str:
    """The status message of a failed call (a sync RpcError is also its Call)."""
    return str(error.details() or "")


def status_of(error: grpc.RpcError) -> status_pb2.Status:
    """The google.rpc.Status a failed call carries in its trailers."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, "no grpc-status-details-bin in the trailers"
    return status


def greedy(max_new_tokens: int = 24, **kwargs: Any) -> chat_pb2.SamplingParams:
    return chat_pb2.SamplingParams(temperature=0.0, repetition_penalty=1.0, max_new_tokens=max_new_tokens, **kwargs)


def script_checkpoint(src: Path, dst: Path, script: list[int]) -> Path:
    """Copy a float32 demo checkpoint and make its greedy output follow `script` exactly.

    Attention and MLP outputs are zeroed, so the last hidden state is the final layer norm of the current
    token's embedding: a bigram model. Then, for each consecutive pair (a, b) of script, b's output row is set
    to point along a's hidden state, which makes b the clear argmax after a. script[0] is the prompt's last
    token; every token may appear once as a source. The real converter, engine and transformers all run it."""
    from safetensors.numpy import load_file, save_file

    sources = script[:-1]
    if len(set(sources)) != len(sources):
        raise ValueError("each token may lead to one successor only")
    shutil.copytree(src, dst)
    weights = load_file(str(dst / "model.safetensors"))
    for name in list(weights):
        if name.endswith(
            ("attention.dense.weight", "attention.dense.bias", "mlp.dense_4h_to_h.weight", "mlp.dense_4h_to_h.bias")
        ):
            weights[name] = np.zeros_like(weights[name])
    embed_in, out = weights["gpt_neox.embed_in.weight"], weights["embed_out.weight"].copy()
    for a, b in itertools.pairwise(script):
        x = embed_in[a] - embed_in[a].mean()
        hidden = x / np.sqrt((x * x).mean() + 1e-5)
        out[b] = 10.0 * hidden / np.linalg.norm(hidden)
    weights["embed_out.weight"] = out
    save_file(weights, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def hf_generate(
    checkpoint: Path,
    prompt_ids: list[int],
    max_new_tokens: int,
    repetition_penalty: float = 1.0,
    logits_processor: object = None,
) -> list[int]:
    """Greedy ids from Hugging Face transformers' generate (the model card's code path), float32 CPU."""
    import torch
    import transformers

    model: Any = _hf_model(checkpoint)
    kwargs: dict[str, object] = {}
    if logits_processor is not None:
        kwargs["logits_processor"] = transformers.LogitsProcessorList([logits_processor])
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            repetition_penalty=repetition_penalty,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
            **kwargs,
        )
    ids: list[int] = out[0][len(prompt_ids) :].tolist()
    return ids


_HF_MODELS: dict[Path, object] = {}


def hf_model(checkpoint: Path) -> Any:
    """The Hugging Face model of a checkpoint (float32, CPU, eval), loaded once."""
    return _hf_model(checkpoint)


def _hf_model(checkpoint: Path) -> object:
    import torch
    import transformers

    if checkpoint not in _HF_MODELS:
        _HF_MODELS[checkpoint] = transformers.GPTNeoXForCausalLM.from_pretrained(
            str(checkpoint), dtype=torch.float32
        ).eval()
    return _HF_MODELS[checkpoint]


def piece_id(checkpoint: Path, piece: str) -> int:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(checkpoint / "spiece.model"))
    token_id: int = sp.piece_to_id(piece)
    return token_id


def read_json(path: Path) -> dict[str, object]:
    data: dict[str, object] = json.loads(path.read_text())
    return data


def wait_until(
    condition: Callable[[], bool], what: str, timeout: float = 30.0, shown: Callable[[], object] | None = None
) -> None:
    """Wait for a state (a metric, health, a log line), polling: never a fixed sleep standing in for it. The
    timeout only bounds a broken run; a passing one waits exactly as long as the state takes. `shown`: what a
    failure prints of the state it saw last."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"{what}: never happened within {timeout:g} s" + (f"; last {shown()}" if shown else "")
            )
        time.sleep(0.01)


async def until(condition: Callable[[], bool], what: str = "the condition", timeout: float = 30.0) -> None:
    """wait_until for a test's event loop."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: never happened within {timeout:g} s"
        await asyncio.sleep(0.01)
