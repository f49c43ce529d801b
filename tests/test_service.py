"""The real server process on loopback: RPCs, streaming, errors, health, reflection, metrics."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from jachat.converter.convert import ConvertOptions, convert
from jachat.service.text.prompt import Speaker, Turn, render_prompt
from jachat.service.text.tokenizer import Tokenizer
from jachat.v1 import chat_pb2, chat_pb2_grpc
from tests.conftest import SCRIPTED_REPLY
from tests.helpers import (
    card_turns_pb,
    details,
    greedy,
    health_stub,
    hf_generate,
    status_of,
    system,
    user,
)
from tests.servers import Server, serving, start


def stream(
    stub: chat_pb2_grpc.ChatServiceStub, turns: list[chat_pb2.Turn], sampling: chat_pb2.SamplingParams
) -> list[chat_pb2.GenerateStreamResponse]:
    return list(stub.GenerateStream(chat_pb2.GenerateStreamRequest(turns=turns, sampling=sampling), timeout=60))


def generate(
    stub: chat_pb2_grpc.ChatServiceStub, turns: list[chat_pb2.Turn], sampling: chat_pb2.SamplingParams
) -> chat_pb2.GenerateResponse:
    return stub.Generate(chat_pb2.GenerateRequest(turns=turns, sampling=sampling), timeout=60)


def test_health_is_serving_after_load(server: Server) -> None:
    with server.channel() as channel:
        health = health_stub(channel)
        for service in ("", "jachat.v1.ChatService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_chat_service(server: Server) -> None:
    with server.channel() as channel:
        stub: Any = reflection_pb2_grpc.ServerReflectionStub(channel)  # its type stubs leave the method untyped
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (reply,) = list(stub.ServerReflectionInfo(iter([request]), timeout=5))
        names = {s.name for s in reply.list_services_response.service}
        assert {"jachat.v1.ChatService", "grpc.health.v1.Health"} <= names


def test_stream_concatenates_to_generate(stub: chat_pb2_grpc.ChatServiceStub) -> None:
    sampling = greedy(40)
    whole = generate(stub, card_turns_pb(), sampling)
    messages = stream(stub, card_turns_pb(), sampling)
    assert "".join(m.text for m in messages) == whole.text
    assert len([m for m in messages if m.text]) > 1  # it really streams
    last = messages[-1]
    assert last.finish_reason == whole.finish_reason == chat_pb2.FINISH_REASON_LENGTH
    assert last.usage == whole.usage and whole.usage.completion_tokens == 40
    assert all(m.finish_reason == chat_pb2.FINISH_REASON_UNSPECIFIED for m in messages[:-1])
    assert all(not m.HasField("usage") for m in messages[:-1])


def test_generate_text_is_hugging_faces_greedy_reply(
    stub: chat_pb2_grpc.ChatServiceStub, demo_checkpoint: Path, tokenizer: Tokenizer
) -> None:
    turns = [Turn(Speaker.USER, "日本の首都はどこですか?")]
    prompt_ids = tokenizer.encode(render_prompt(turns))
    expected = hf_generate(demo_checkpoint, prompt_ids, 24)
    reply = generate(stub, [user("日本の首都はどこですか?")], greedy(24))
    assert reply.text == tokenizer.decode(expected).replace("<NL>", "\n")
    assert reply.usage.prompt_tokens == len(prompt_ids)


def test_stop_string_ends_the_reply_before_it(stub: chat_pb2_grpc.ChatServiceStub) -> None:
    full = generate(stub, [user("吾輩は猫である")], greedy(30)).text
    stop = full[10:13]
    first = full.find(stop)
    reply = generate(stub, [user("吾輩は猫である")], greedy(30, stop=[stop, "never-there"]))
    assert reply.finish_reason == chat_pb2.FINISH_REASON_STOP
    assert reply.text == full[:first]
    streamed = stream(stub, [user("吾輩は猫である")], greedy(30, stop=[stop]))
    assert "".join(m.text for m in streamed) == full[:first]
    assert reply.usage.completion_tokens < 30


def test_unset_sampling_fields_take_the_model_cards_values(stub: chat_pb2_grpc.ChatServiceStub) -> None:
    info = stub.GetModelInfo(chat_pb2.GetModelInfoRequest(), timeout=5)
    d = info.sampling_defaults
    assert (d.max_new_tokens, d.min_new_tokens, d.top_k, d.no_repeat_ngram_size) == (128, 0, 50, 0)
    assert (d.temperature, d.top_p, d.repetition_penalty) == pytest.approx((0.7, 1.0, 1.1))
    assert (info.context_length, info.vocab_size) == (2048, 32000)
    assert (info.device, info.compute_type, info.quantization) == ("cpu", "float32", "float32")
    assert info.model_name.endswith("demo")
    reply = generate(stub, [user("こんにちは")], chat_pb2.SamplingParams())  # sampled, card defaults
    assert reply.usage.completion_tokens <= 128
    assert reply.finish_reason in (chat_pb2.FINISH_REASON_LENGTH, chat_pb2.FINISH_REASON_END_OF_TURN)


def test_tokenize_returns_the_prompt_tokens(stub: chat_pb2_grpc.ChatServiceStub, tokenizer: Tokenizer) -> None:
    reply = stub.Tokenize(chat_pb2.TokenizeRequest(turns=card_turns_pb()), timeout=5)
    golden = (Path(__file__).parent / "data" / "model_card_prompt.txt").read_text(encoding="utf-8")
    assert reply.prompt == golden
    assert list(reply.token_ids) == tokenizer.encode(golden)
    assert reply.token_count == len(reply.token_ids) == len(reply.pieces)
    assert list(reply.pieces) == [tokenizer.pieces[i] for i in reply.token_ids]


@pytest.mark.parametrize(
    ("turns", "field", "words"),
    [
        ([], "turns", "must not be empty"),
        ([chat_pb2.Turn(speaker=chat_pb2.SPEAKER_UNSPECIFIED, text="やあ")], "turns[0].speaker", "SPEAKER_UNSPECIFIED"),
        ([user("やあ"), system("こんにちは")], "turns[1].speaker", "last turn must be the user's"),
        (
            [user("a"), chat_pb2.Turn(speaker=chat_pb2.Speaker.ValueType(7), text="b"), user("c")],
            "turns[1].speaker",
            "is 7",
        ),
    ],
)
def test_bad_conversations_are_invalid_argument_naming_the_problem(
    stub: chat_pb2_grpc.ChatServiceStub, turns: list[chat_pb2.Turn], field: str, words: str
) -> None:
    for call in (
        lambda: generate(stub, turns, greedy(4)),
        lambda: stream(stub, turns, greedy(4)),
        lambda: stub.Tokenize(chat_pb2.TokenizeRequest(turns=turns), timeout=5),
    ):
        with pytest.raises(grpc.RpcError) as info:
            call()
        error = info.value
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in details(error) and words in details(error)
        status = status_of(error)
        assert status is not None
        bad_request = error_details_pb2.BadRequest()
        assert status.details[0].Unpack(bad_request)
        assert [v.field for v in bad_request.field_violations] == [field]


@pytest.mark.parametrize(
    ("sampling", "field"),
    [
        (chat_pb2.SamplingParams(temperature=-1), "sampling.temperature"),
        (chat_pb2.SamplingParams(top_p=0), "sampling.top_p"),
        (chat_pb2.SamplingParams(top_p=1.5), "sampling.top_p"),
        (chat_pb2.SamplingParams(repetition_penalty=0), "sampling.repetition_penalty"),
        (chat_pb2.SamplingParams(max_new_tokens=0), "sampling.max_new_tokens"),
        (chat_pb2.SamplingParams(max_new_tokens=4, min_new_tokens=5), "sampling.min_new_tokens"),
        (chat_pb2.SamplingParams(max_new_tokens=2048), "sampling.max_new_tokens"),
        (chat_pb2.SamplingParams(stop=[""]), "sampling.stop[0]"),
    ],
)
def test_bad_sampling_is_invalid_argument_naming_the_field(
    stub: chat_pb2_grpc.ChatServiceStub, sampling: chat_pb2.SamplingParams, field: str
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        generate(stub, [user("やあ")], sampling)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(info.value).startswith(field + ":")


def test_metrics_count_requests_by_rpc_and_code_and_generated_tokens(
    server: Server, stub: chat_pb2_grpc.ChatServiceStub
) -> None:
    before = server.scrape()
    for _ in range(3):
        generate(stub, [user("やあ")], greedy(5))
    with pytest.raises(grpc.RpcError):
        generate(stub, [], greedy(5))
    after = server.scrape()

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta('jachat_requests_total{api="grpc",code="OK",rpc="Generate"}') == 3
    assert delta('jachat_requests_total{api="grpc",code="INVALID_ARGUMENT",rpc="Generate"}') == 1
    assert delta("jachat_generated_tokens_total") == 15
    assert delta('jachat_finished_total{reason="length"}') == 3
    assert delta("jachat_time_to_first_token_seconds_count") == 3
    assert after["jachat_running_requests"] == 0


@pytest.fixture(scope="module")
def scripted_server(scripted_model: Path) -> Iterator[Server]:
    with serving(scripted_model) as server:
        yield server


def test_min_new_tokens_holds_the_end_of_turn_back(scripted_server: Server) -> None:
    """The scripted model writes </s> as its 12th token; min_new_tokens 20 keeps it from ending before 20 tokens
    (max 40 leaves room, so only min_new_tokens can explain the length)."""
    with scripted_server.channel() as channel:
        stub = scripted_server.stub(channel)
        free = generate(stub, [user("x")], greedy(40))
        held = generate(stub, [user("x")], greedy(40, min_new_tokens=20))
    assert free.finish_reason == chat_pb2.FINISH_REASON_END_OF_TURN and free.usage.completion_tokens == 12
    assert held.usage.completion_tokens >= 20


def coarsens(parts: list[str], fine: list[str]) -> bool:
    """`parts` is `fine` with some neighbours joined: the same text, cut only where `fine` is cut."""

    def cuts(texts: list[str]) -> set[int]:
        return {sum(len(t) for t in texts[: i + 1]) for i in range(len(texts))}

    return "".join(parts) == "".join(fine) and cuts(parts) <= cuts(fine)


def test_scripted_reply_streams_whole_characters_and_ends_at_eos(
    scripted_server: Server, scripted_checkpoint: Path
) -> None:
    """The scripted model writes あ as three byte pieces, a stray byte, <NL>, 猫, an emoji as four byte pieces, a
    stray continuation byte and </s>. Each message holds whole characters; the text is sentencepiece's decode
    of Hugging Face's ids with <NL> as a newline; </s> ends the turn and is not sent."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(scripted_checkpoint / "spiece.model"))
    tokenizer = Tokenizer(scripted_checkpoint / "spiece.model")
    expected_ids = hf_generate(scripted_checkpoint, tokenizer.encode(render_prompt([Turn(Speaker.USER, "猫")])), 32)
    assert expected_ids[-1] == 3 and len(expected_ids) == 12
    with scripted_server.channel() as channel:
        stub = scripted_server.stub(channel)
        messages = stream(stub, [user("猫")], greedy(32))
        whole = generate(stub, [user("猫")], greedy(32))
    texts = [m.text for m in messages]
    # a newline is held until the next text shows it does not start "\nユーザー:" (the model opening a user turn);
    # a stream whose edge fell behind this fast model gets neighbours of these in one message (coalescing)
    assert coarsens(texts, ["あ", "\ufffd", "\n猫", "😺", "\ufffd", ""])
    assert "".join(texts) == whole.text == SCRIPTED_REPLY == sp.decode(expected_ids[:-1]).replace("<NL>", "\n")
    for m in messages:
        assert m.SerializeToString()  # protobuf refuses to serialise strings that are not valid UTF-8
    assert messages[-1].finish_reason == whole.finish_reason == chat_pb2.FINISH_REASON_END_OF_TURN
    assert messages[-1].usage.completion_tokens == whole.usage.completion_tokens == len(expected_ids)  # with </s>


def test_nl_spelled_with_several_pieces_streams_as_one_newline(
    scripted_split_nl_checkpoint: Path, tmp_path: Path
) -> None:
    model = convert(ConvertOptions(str(scripted_split_nl_checkpoint), tmp_path / "split", "float32"))
    server = start(model)
    try:
        with server.channel() as channel:
            messages = stream(server.stub(channel), [user("猫")], greedy(32))
        texts = [m.text for m in messages]
        assert "".join(texts) == SCRIPTED_REPLY
        assert not any("<" in t or "N" in t for t in texts)  # the pieces of <NL> are held back, never sent
        assert messages[-1].finish_reason == chat_pb2.FINISH_REASON_END_OF_TURN
    finally:
        assert server.stop() == 0


@pytest.mark.parametrize(
    ("turns", "sampling", "fields"),
    [
        ([user("a")] * 257, chat_pb2.SamplingParams(), ["turns"]),
        ([user("あ" * 16_385)], chat_pb2.SamplingParams(), ["turns[0].text"]),
        (
            [user("猫" * 2100)],
            chat_pb2.SamplingParams(),
            ["turns[0].text"],
        ),  # under the character limit, too many tokens
        ([user("a")], chat_pb2.SamplingParams(temperature=float("nan")), ["sampling.temperature"]),
        ([user("a")], chat_pb2.SamplingParams(temperature=1000), ["sampling.temperature"]),
        ([user("a")], chat_pb2.SamplingParams(top_k=40000), ["sampling.top_k"]),
        ([user("a")], chat_pb2.SamplingParams(top_p=float("nan")), ["sampling.top_p"]),
        ([user("a")], chat_pb2.SamplingParams(repetition_penalty=float("inf")), ["sampling.repetition_penalty"]),
        ([user("a")], chat_pb2.SamplingParams(no_repeat_ngram_size=65), ["sampling.no_repeat_ngram_size"]),
        ([user("a")], chat_pb2.SamplingParams(stop=["x"] * 17), ["sampling.stop"]),
        ([user("a")], chat_pb2.SamplingParams(stop=["x" * 257]), ["sampling.stop[0]"]),
        (
            [user("a")],
            chat_pb2.SamplingParams(temperature=-1, top_p=2, max_new_tokens=0),
            ["sampling.max_new_tokens", "sampling.temperature", "sampling.top_p"],
        ),
    ],
)
def test_validation_table(
    stub: chat_pb2_grpc.ChatServiceStub,
    turns: list[chat_pb2.Turn],
    sampling: chat_pb2.SamplingParams,
    fields: list[str],
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        generate(stub, turns, sampling)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = status_of(info.value)
    assert status is not None
    bad_request = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad_request)
    assert [v.field for v in bad_request.field_violations] == fields


def test_dropping_the_oldest_turns_makes_a_long_conversation_fit(stub: chat_pb2_grpc.ChatServiceStub) -> None:
    history = []
    for i in range(12):
        history += [user(f"{i}番目の質問です。" + "吾輩は猫である。" * 20), system("はい。" + "名前はまだ無い。" * 20)]
    history.append(user("最後の質問"))
    sampling = greedy(100)
    with pytest.raises(grpc.RpcError) as info:
        generate(stub, history, sampling)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(info.value).startswith("turns: the prompt has") and "drop_oldest_turns" in details(info.value)
    request = chat_pb2.GenerateRequest(turns=history, sampling=sampling, drop_oldest_turns=True)
    reply = stub.Generate(request, timeout=60)
    dropped = reply.usage.dropped_turns
    assert 0 < dropped < len(history)
    assert reply.usage.prompt_tokens + 100 <= 2048
    tokens_kept = stub.Tokenize(chat_pb2.TokenizeRequest(turns=history[dropped:])).token_count
    assert reply.usage.prompt_tokens == tokens_kept  # exactly the newest turns that fit, oldest dropped first
    assert stub.Tokenize(chat_pb2.TokenizeRequest(turns=history[dropped - 1 :])).token_count + 100 > 2048
    streamed = list(
        stub.GenerateStream(
            chat_pb2.GenerateStreamRequest(turns=history, sampling=sampling, drop_oldest_turns=True), timeout=60
        )
    )
    assert streamed[-1].usage.dropped_turns == dropped
    assert "".join(m.text for m in streamed) == reply.text


def test_tokens_logprobs_stop_sequence_and_timing(scripted_server: Server) -> None:
    """Every generated token comes back (the final </s> too), in Generate and spread over the stream; logprobs only
    when asked; the stop string that ended the reply, left out of the text or included on request, also when it
    straddles <NL> (the scripted reply writes <NL> as its own piece, then 猫); timings ordered."""
    with scripted_server.channel() as channel:
        stub = scripted_server.stub(channel)
        plain = generate(stub, [user("猫")], greedy(32))
        pieces = [t.piece for t in plain.tokens]
        assert len(plain.tokens) == plain.usage.completion_tokens == 12 and pieces[-1] == "</s>"
        assert pieces[:5] == ["<0xE3>", "<0x81>", "<0x82>", "<0xFF>", "<NL>"]
        assert all(t.logprob == 0.0 for t in plain.tokens) and plain.stop_sequence == ""
        asked = chat_pb2.ResponseOptions(token_logprobs=True)
        scored = stub.Generate(
            chat_pb2.GenerateRequest(turns=[user("猫")], sampling=greedy(32), response=asked), timeout=60
        )
        assert [t.id for t in scored.tokens] == [t.id for t in plain.tokens]
        assert all(-30.0 < t.logprob <= 0.0 for t in scored.tokens)  # near 0: the scripted model is sure
        streamed = list(
            stub.GenerateStream(
                chat_pb2.GenerateStreamRequest(turns=[user("猫")], sampling=greedy(32), response=asked), timeout=60
            )
        )
        assert [t for m in streamed for t in m.tokens] == list(scored.tokens)  # </s> the last, on whichever message

        for include, text in ((False, "あ\ufffd"), (True, "あ\ufffd\n猫")):
            options = chat_pb2.ResponseOptions(include_stop_sequence=include)
            sampling = greedy(32, stop=["\n猫"])
            reply = stub.Generate(
                chat_pb2.GenerateRequest(turns=[user("猫")], sampling=sampling, response=options), timeout=60
            )
            assert (reply.text, reply.stop_sequence) == (text, "\n猫")
            assert reply.finish_reason == chat_pb2.FINISH_REASON_STOP
            messages = list(
                stub.GenerateStream(
                    chat_pb2.GenerateStreamRequest(turns=[user("猫")], sampling=sampling, response=options), timeout=60
                )
            )
            assert "".join(m.text for m in messages) == text and messages[-1].stop_sequence == "\n猫"

    for timing in (plain.timing, scored.timing, streamed[-1].timing):
        queued, first, total = (d.ToNanoseconds() for d in (timing.queued, timing.time_to_first_token, timing.total))
        assert 0 <= queued <= first <= total and total > 0
    assert not any(m.HasField("timing") for m in streamed[:-1])


def test_logprobs_are_returned_only_when_asked(stub: chat_pb2_grpc.ChatServiceStub) -> None:
    request = chat_pb2.GenerateRequest(turns=card_turns_pb(), sampling=greedy(12))
    plain = stub.Generate(request, timeout=60)
    request.response.token_logprobs = True
    scored = stub.Generate(request, timeout=60)
    assert [t.id for t in scored.tokens] == [t.id for t in plain.tokens] and len(plain.tokens) == 12
    assert all(t.logprob == 0.0 for t in plain.tokens)
    assert all(t.logprob < 0.0 for t in scored.tokens)  # a random-weight model is never sure
