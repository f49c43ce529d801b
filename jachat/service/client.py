"""jachat-chat: talk to a jachat service from the terminal.

With text, it streams one reply. Without, it runs an interactive chat that keeps the conversation as turns
(your lines as SPEAKER_USER, the model's replies as SPEAKER_SYSTEM). Commands: /reset, /quit.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import grpc

from jachat.v1 import chat_pb2, chat_pb2_grpc


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jachat-chat", description=__doc__.split("\n\n")[0])
    parser.add_argument("text", nargs="?", help="one message to send; omit for an interactive chat")
    parser.add_argument("--target", default="localhost:50051", help="HOST:PORT of the service")
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--temperature", type=float, help="0 for greedy decoding")
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--repetition-penalty", type=float)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--timeout", type=float, default=300.0, help="deadline per reply, in seconds")
    parser.add_argument(
        "--logprobs", action="store_true", help="after the reply, print each token with its log-probability"
    )
    parser.add_argument(
        "--priority",
        choices=("interactive", "batch"),
        default="interactive",
        help="batch calls wait while interactive ones queue, and are shed first when the queue is full",
    )
    return parser


def sampling_params(args: argparse.Namespace) -> chat_pb2.SamplingParams:
    params = chat_pb2.SamplingParams(stop=args.stop)
    for name in ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty"):
        value = getattr(args, name)
        if value is not None:
            setattr(params, name, value)
    return params


def stream_reply(
    stub: chat_pb2_grpc.ChatServiceStub,
    turns: Sequence[chat_pb2.Turn],
    params: chat_pb2.SamplingParams,
    timeout: float,
    logprobs: bool = False,
    priority: chat_pb2.Priority.ValueType = chat_pb2.PRIORITY_INTERACTIVE,
) -> str:
    """Print the reply as it streams (then, with logprobs, its tokens); returns it."""
    parts = []
    tokens: list[chat_pb2.Token] = []
    response = chat_pb2.ResponseOptions(token_logprobs=logprobs)
    request = chat_pb2.GenerateStreamRequest(turns=turns, sampling=params, response=response, priority=priority)
    for message in stub.GenerateStream(request, timeout=timeout):
        tokens.extend(message.tokens)
        if message.text:
            parts.append(message.text)
            print(message.text, end="", flush=True)
    print()
    for token in tokens if logprobs else ():
        print(f"{token.id:>6}  {token.logprob:9.4f}  {token.piece}")
    return "".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    params = sampling_params(args)
    priority = chat_pb2.PRIORITY_BATCH if args.priority == "batch" else chat_pb2.PRIORITY_INTERACTIVE
    with grpc.insecure_channel(args.target) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        try:
            if args.text is not None:
                turn = chat_pb2.Turn(speaker=chat_pb2.SPEAKER_USER, text=args.text)
                stream_reply(stub, [turn], params, args.timeout, args.logprobs, priority)
                return 0
            return interactive(stub, params, args.timeout, args.logprobs, priority)
        except grpc.RpcError as exc:
            print(f"jachat-chat: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
        except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as Unix tools do
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
            return 0


def interactive(
    stub: chat_pb2_grpc.ChatServiceStub,
    params: chat_pb2.SamplingParams,
    timeout: float,
    logprobs: bool = False,
    priority: chat_pb2.Priority.ValueType = chat_pb2.PRIORITY_INTERACTIVE,
) -> int:
    turns: list[chat_pb2.Turn] = []
    print("jachat: type a message (/reset clears the conversation, /quit or Ctrl-D leaves)")
    while True:
        try:
            line = input("ユーザー> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if line.strip() == "/quit":
            return 0
        if line.strip() == "/reset":
            turns.clear()
            continue
        if not line.strip():
            continue
        turns.append(chat_pb2.Turn(speaker=chat_pb2.SPEAKER_USER, text=line))
        print("システム> ", end="", flush=True)
        try:
            reply = stream_reply(stub, turns, params, timeout, logprobs, priority)
        except grpc.RpcError as exc:
            turns.pop()
            print(f"\n[{exc.code().name}: {exc.details()}]", file=sys.stderr)
            continue
        turns.append(chat_pb2.Turn(speaker=chat_pb2.SPEAKER_SYSTEM, text=reply))
