"""The OpenAI-compatible HTTP API, through the official `openai` SDK and plain HTTP, against a real server that
also serves gRPC: same engine, same defaults, same limits, same tokens."""

from __future__ import annotations

import gzip
import http.client
import json
import select
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from jachat.v1 import chat_pb2
from tests.helpers import CARD_TURNS, system, user, wait_until
from tests.servers import Server, serving, start

ROLES = {"ユーザー": "user", "システム": "assistant"}
CARD_MESSAGES: list[Any] = [{"role": ROLES[s], "content": t} for s, t in CARD_TURNS]


def http_flags() -> tuple[str, ...]:
    return ("--http-host", "127.0.0.1", "--http-port", "0")


@pytest.fixture(scope="module")
def server(model_f32: Path) -> Iterator[Server]:
    with serving(model_f32, *http_flags()) as running:
        yield running


def client(server: Server, key: str = "unused") -> openai.OpenAI:
    # no retries: a 429 or 503 must reach the test, not be retried away by the SDK
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key=key, max_retries=0, timeout=60)


def model_id(server: Server) -> str:
    return client(server).models.list().data[0].id


def request(
    server: Server, method: str, path: str, body: object = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """Plain HTTP, no SDK: status, headers (lower-case names), body."""
    assert server.http_port is not None
    connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=60)
    data = body if isinstance(body, bytes) else None if body is None else json.dumps(body).encode()
    connection.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    response = connection.getresponse()
    payload = response.read()
    connection.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, payload


def oversized(server: Server) -> tuple[int, dict[str, str], bytes]:
    """A request announcing a body over the 4 MiB limit: refused before the body is read (none is sent)."""
    assert server.http_port is not None
    connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=60)
    connection.putrequest("POST", "/v1/chat/completions")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", str(5 * 1024 * 1024))
    connection.endheaders()
    response = connection.getresponse()
    payload = response.read()
    connection.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, payload


def grpc_reply(server: Server, turns: list[chat_pb2.Turn], **sampling: Any) -> chat_pb2.GenerateResponse:
    with server.channel() as channel:
        params = chat_pb2.SamplingParams(**sampling)
        response: chat_pb2.GenerateResponse = server.stub(channel).Generate(
            chat_pb2.GenerateRequest(
                turns=turns, sampling=params, response=chat_pb2.ResponseOptions(token_logprobs=True)
            ),
            timeout=60,
        )
        return response


def card_turns() -> list[chat_pb2.Turn]:
    return [user(t) if s == "ユーザー" else system(t) for s, t in CARD_TURNS]


def test_greedy_text_over_http_equals_grpc_with_the_same_defaults(server: Server) -> None:
    """Only temperature and the length set: every other option takes the same default on both APIs (the card's
    repetition penalty 1.1 included), so greedy replies agree to the token, and usage agrees too."""
    over_grpc = grpc_reply(server, card_turns(), temperature=0.0, max_new_tokens=24)
    reply = client(server).chat.completions.create(
        model=model_id(server), messages=CARD_MESSAGES, temperature=0, max_tokens=24
    )
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == over_grpc.text
    assert reply.choices[0].finish_reason == (
        "length" if over_grpc.finish_reason == chat_pb2.FINISH_REASON_LENGTH else "stop"
    )
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == over_grpc.usage.prompt_tokens
    assert reply.usage.completion_tokens == over_grpc.usage.completion_tokens
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    # max_completion_tokens is the same field under OpenAI's newer name; text parts are a string's equal
    parts: Any = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in CARD_MESSAGES]
    again = client(server).chat.completions.create(
        model=model_id(server), messages=parts, temperature=0, max_completion_tokens=24
    )
    assert again.choices[0].message.content == over_grpc.text


def test_streaming_with_usage_matches_the_whole_reply(server: Server) -> None:
    sdk = client(server)
    whole = sdk.chat.completions.create(model=model_id(server), messages=CARD_MESSAGES, temperature=0, max_tokens=20)
    chunks = list(
        sdk.chat.completions.create(
            model=model_id(server),
            messages=CARD_MESSAGES,
            temperature=0,
            max_tokens=20,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(content) == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert all(c.usage is None for c in chunks[:-1])  # include_usage: usage null until the last chunk
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert len({c.id for c in chunks}) == 1
    # without include_usage no chunk carries usage
    plain = list(
        sdk.chat.completions.create(
            model=model_id(server), messages=CARD_MESSAGES, temperature=0, max_tokens=5, stream=True
        )
    )
    assert all(c.usage is None for c in plain) and plain[-1].choices[0].finish_reason == "length"


def test_logprobs_are_each_chosen_tokens_as_over_grpc(server: Server) -> None:
    over_grpc = grpc_reply(
        server, [user("猫について教えて")], temperature=0.0, max_new_tokens=12, repetition_penalty=1.0
    )
    messages: Any = [{"role": "user", "content": "猫について教えて"}]
    reply = client(server).chat.completions.create(
        model=model_id(server),
        messages=messages,
        temperature=0,
        max_tokens=12,
        logprobs=True,
        extra_body={"repetition_penalty": 1.0},
    )
    assert reply.choices[0].logprobs is not None and reply.choices[0].logprobs.content is not None
    entries = reply.choices[0].logprobs.content
    tokens = list(over_grpc.tokens)
    assert len(entries) == len(tokens) > 0
    for entry, token in zip(entries, tokens, strict=True):
        assert entry.logprob == pytest.approx(token.logprob, abs=1e-5)
        assert entry.logprob <= 0 and entry.top_logprobs == []
        assert entry.bytes is not None
    streamed = client(server).chat.completions.create(
        model=model_id(server),
        messages=messages,
        temperature=0,
        max_tokens=12,
        logprobs=True,
        stream=True,
        extra_body={"repetition_penalty": 1.0},
    )
    logprobs = [
        e.logprob for c in streamed if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content or []
    ]
    assert logprobs == pytest.approx([e.logprob for e in entries], abs=1e-6)
    without = client(server).chat.completions.create(
        model=model_id(server), messages=messages, temperature=0, max_tokens=4
    )
    assert without.choices[0].logprobs is None


def test_stop_strings_end_the_reply_as_over_grpc(server: Server) -> None:
    messages: Any = [{"role": "user", "content": "こんにちは"}]
    whole = grpc_reply(server, [user("こんにちは")], temperature=0.0, max_new_tokens=40).text
    assert len(whole) >= 6, whole
    stop = whole[3:5]
    over_grpc = grpc_reply(server, [user("こんにちは")], temperature=0.0, max_new_tokens=40, stop=[stop])
    for value in (stop, [stop, "never-generated"]):
        reply = client(server).chat.completions.create(
            model=model_id(server), messages=messages, temperature=0, max_tokens=40, stop=value
        )
        assert reply.choices[0].message.content == over_grpc.text == whole[: whole.index(stop)]
        assert reply.choices[0].finish_reason == "stop"
    kept = client(server).chat.completions.create(
        model=model_id(server),
        messages=messages,
        temperature=0,
        max_tokens=40,
        stop=stop,
        extra_body={"include_stop_str_in_output": True},
    )
    assert kept.choices[0].message.content == whole[: whole.index(stop)] + stop


@pytest.mark.parametrize(
    ("change", "param", "words"),
    [
        (
            {"messages": [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"}]},
            "messages[0].role",
            "no system turn",
        ),
        (
            {"messages": [{"role": "tool", "content": "x"}, {"role": "user", "content": "hi"}]},
            "messages[0].role",
            "tools",
        ),
        (
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
            "messages[1].role",
            "last turn must be the user's",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages[0].content[0]",
            "only text parts",
        ),
        ({"messages": []}, "messages", "non-empty"),
        ({"top_logprobs": 3, "logprobs": True}, "top_logprobs", "alternatives"),
        ({"seed": -7}, "seed", "must be 0 to"),
        ({"n": 2}, "n", "only 1"),
        ({"temperature": -1}, "temperature", "must be 0 to"),
        ({"max_tokens": 0}, "max_tokens", "must be 1 to"),
        ({"max_completion_tokens": 5000}, "max_completion_tokens", "must be 1 to"),
        ({"top_p": 0}, "top_p", "(0, 1]"),
        ({"stop": [1, 2]}, "stop", "strings"),
        ({"priority": "urgent"}, "priority", "interactive"),
        # each of these was a 500 with a traceback (recorded INTERNAL, feeding the paging error-ratio alert)
        ({"model": None}, "model", "is required"),
        ({"messages": [{"role": ["user"], "content": "hi"}]}, "messages[0].role", "must be 'user' or 'assistant'"),
        ({"messages": [{"role": {"a": 1}, "content": "hi"}]}, "messages[0].role", "must be 'user' or 'assistant'"),
        ({"temperature": 10**400}, "temperature", "a number"),
        ({"top_p": -(10**400)}, "top_p", "a number"),
        ({"top_k": -1}, "top_k", "must be 0 to"),
        ({"min_tokens": -1}, "min_tokens", "must be 0 to"),
        ({"no_repeat_ngram_size": -2}, "no_repeat_ngram_size", "must be 0 to"),
        ({"stream_options": {"include_usage": True}}, "stream_options", "stream: true"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "not supported"),
        ({"frobnicate": 1}, "frobnicate", "unrecognized"),
        ({"messages": [{"role": "user", "content": "x" * 20_000}]}, "messages[0].content", "characters"),
    ],
)
def test_invalid_requests_get_400_naming_the_field(
    server: Server, change: dict[str, Any], param: str, words: str
) -> None:
    hello: Any = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.BadRequestError) as refused:  # extra_body: sent as given, past the SDK's types
        client(server).chat.completions.create(model=model_id(server), messages=hello, extra_body=change)
    assert refused.value.status_code == 400
    error = refused.value.body
    assert isinstance(error, dict) and error["type"] == "invalid_request_error"
    assert error["param"] == param, error
    assert words in error["message"], error


def test_plain_http_errors_have_openais_shape(server: Server) -> None:
    status, headers, body = request(server, "POST", "/v1/chat/completions", b"{not json")
    assert status == 400 and json.loads(body)["error"]["param"] == "body"
    status, _, body = request(
        server, "POST", "/v1/chat/completions", {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    )
    assert status == 404 and json.loads(body)["error"]["code"] == "model_not_found"
    status, _, body = oversized(server)
    assert status == 413 and json.loads(body)["error"]["type"] == "invalid_request_error"
    status, _, body = request(server, "GET", "/v1/nothing-here")
    assert status == 404 and "error" in json.loads(body)
    status, _, body = request(server, "GET", "/v1/chat/completions")
    assert status == 405 and "error" in json.loads(body)
    status, _, body = request(server, "GET", "/health")
    assert status == 200 and json.loads(body) == {"status": "SERVING"}
    status, headers, body = request(server, "GET", "/v1/models", headers={"x-request-id": "trace-me-42"})
    assert status == 200 and headers["x-request-id"] == "trace-me-42"
    assert json.loads(body)["data"][0]["object"] == "model"


def test_plain_http_streams_server_sent_events_ending_with_done(server: Server) -> None:
    body = {
        "model": model_id(server),
        "messages": [{"role": "user", "content": "やあ"}],
        "temperature": 0,
        "max_tokens": 6,
        "stream": True,
    }
    status, headers, payload = request(server, "POST", "/v1/chat/completions", body)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [line.removeprefix("data: ") for line in payload.decode().split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_a_deadline_from_the_caller_gives_504(server: Server) -> None:
    body = {
        "model": model_id(server),
        "messages": [{"role": "user", "content": "やあ"}],
        "max_tokens": 1500,
        "min_tokens": 1500,
    }
    status, _, payload = request(server, "POST", "/v1/chat/completions", body, {"x-jachat-timeout": "0.2"})
    assert status == 504 and json.loads(payload)["error"]["code"] == "timeout"
    status, _, payload = request(server, "POST", "/v1/chat/completions", body, {"x-jachat-timeout": "soon"})
    assert status == 400 and json.loads(payload)["error"]["param"] == "x-jachat-timeout"


def moved_tenant(before: dict[str, float], after: dict[str, float], prefix: str) -> float:
    """Tokens generated since `before` by the tenants whose label starts with `prefix`."""
    key = 'jachat_tenant_generated_tokens_total{tenant="'
    return sum(v - before.get(k, 0.0) for k, v in after.items() if k.startswith(key + prefix))


def test_http_calls_are_labelled_in_the_metrics(server: Server) -> None:
    before = server.scrape()
    client(server).chat.completions.create(
        model=model_id(server), messages=[{"role": "user", "content": "hi"}], max_tokens=2, user="team-u", temperature=0
    )
    with pytest.raises(openai.BadRequestError):
        client(server).chat.completions.create(model=model_id(server), messages=[{"role": "system", "content": "hi"}])
    # with auth off, `user` names the tenant; one that is not a safe label is known by its digest
    client(server).chat.completions.create(
        model=model_id(server), messages=[{"role": "user", "content": "hi"}], max_tokens=3, user="a b@c", temperature=0
    )
    after = server.scrape()
    assert moved_tenant(before, after, "team-u") == 2 and moved_tenant(before, after, "user-") == 3

    def moved(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert moved('jachat_requests_total{api="http",code="OK",rpc="/v1/chat/completions"}') == 2
    assert moved('jachat_requests_total{api="http",code="INVALID_ARGUMENT",rpc="/v1/chat/completions"}') == 1
    assert moved('jachat_rejected_total{api="http",priority="interactive",reason="invalid"}') == 1
    assert moved('jachat_requests_total{api="grpc",code="OK",rpc="Generate"}') == 0
    assert any(" http /v1/chat/completions OK " in line for line in server.log)


def test_tokens_and_tenants_are_grpcs(model_f32: Path, tmp_path: Path) -> None:
    """The same token file guards both APIs; a token's name is the tenant on both."""
    tokens = tmp_path / "tokens"
    tokens.write_text("team-a secret-a\n")
    with serving(model_f32, "--auth-token-file", str(tokens), *http_flags()) as guarded:
        with pytest.raises(openai.AuthenticationError) as refused:
            client(guarded, "wrong").models.list()
        assert refused.value.status_code == 401
        status, headers, _ = request(guarded, "GET", "/v1/models")
        assert status == 401 and headers["www-authenticate"] == "Bearer"
        assert request(guarded, "GET", "/health")[0] == 200  # health needs no token, as gRPC's
        sdk = client(guarded, "secret-a")
        model = sdk.models.list().data[0].id
        sdk.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=3, user="not-me"
        )
        scraped = guarded.scrape()
        assert scraped['jachat_tenant_generated_tokens_total{tenant="team-a"}'] >= 1
        assert 'jachat_tenant_generated_tokens_total{tenant="not-me"}' not in scraped
        assert scraped['jachat_rejected_total{api="http",priority="interactive",reason="unauthenticated"}'] == 2


def _raw(port: int, head: bytes, body: bytes = b"", read: bool = True) -> bytes:
    """One hand-written HTTP/1.1 exchange (what an HTTP client library would refuse to send)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        connection.sendall(head + b"\r\n\r\n" + body)
        if not read:
            return b""
        return connection.recv(65536)


def test_bytes_that_are_not_utf8_in_authorization_are_a_401_not_a_server_error(model_f32: Path, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("team-a secret-a\n")
    with serving(model_f32, "--auth-token-file", str(tokens), *http_flags()) as guarded:
        assert guarded.http_port is not None
        before = guarded.scrape()
        reply = _raw(guarded.http_port, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\xc3")
        assert reply.startswith(b"HTTP/1.1 401 ") and b"invalid_api_key" in reply
        key = 'jachat_requests_total{api="http",code="INTERNAL",rpc="/v1/models"}'
        assert guarded.scrape().get(key, 0.0) == before.get(key, 0.0)


def test_a_client_that_hangs_up_while_uploading_its_body_has_cancelled(server: Server) -> None:
    """A body cut off by the client's hang-up: a cancellation, logged in one line, never INTERNAL."""
    assert server.http_port is not None
    before = server.scrape()
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000"
    _raw(server.http_port, head, b'{"model": "' + b"a" * 5000, read=False)
    cancelled = 'jachat_requests_total{api="http",code="CANCELLED",rpc="/v1/chat/completions"}'
    wait_until(lambda: server.scrape().get(cancelled, 0.0) > before.get(cancelled, 0.0), "the hang-up recorded")
    internal = 'jachat_requests_total{api="http",code="INTERNAL",rpc="/v1/chat/completions"}'
    assert server.scrape().get(internal, 0.0) == before.get(internal, 0.0)


def test_a_full_server_refuses_with_429_and_retry_after(model_f32: Path) -> None:
    """One replica, batches of one, one waiting place: a running call and a waiting one fill it; an HTTP call then
    gets 429 with Retry-After at once, in OpenAI's shape."""
    flags = ("--max-batch-size", "1", "--max-queued-requests", "1", "--replicas", "1", *http_flags())
    with serving(model_f32, *flags) as full:
        sdk = client(full)
        model = sdk.models.list().data[0].id
        long: Any = {
            "model": model,
            "messages": [{"role": "user", "content": "長く"}],
            "max_tokens": 1500,
            "min_tokens": 1500,
        }
        running = sdk.chat.completions.create(
            model=model, messages=long["messages"], max_tokens=1500, extra_body={"min_tokens": 1500}, stream=True
        )
        next(iter(running))  # its batch started
        waiting = threading.Thread(
            target=lambda: request(full, "POST", "/v1/chat/completions", long, {"x-jachat-timeout": "30"})
        )
        waiting.start()
        wait_until(lambda: full.scrape()["jachat_queue_size"] >= 1, "the second call waiting in the queue")
        with pytest.raises(openai.RateLimitError) as refused:
            sdk.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert refused.value.status_code == 429
        assert int(refused.value.response.headers["retry-after"]) >= 1
        assert refused.value.body["code"] == "rate_limit_exceeded"  # type: ignore[index]
        running.close()
        waiting.join(60)


def test_sigterm_drains_http_calls_as_grpc_ones(model_f32: Path) -> None:
    """SIGTERM: /health 503 at once, new calls 503 with Retry-After, a stream in flight gets its grace and ends
    normally, then the process exits 0."""
    server = start(model_f32, "--grace-seconds", "20", *http_flags(), process=True)
    sdk = client(server)
    model = sdk.models.list().data[0].id
    stream = sdk.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "やあ"}],
        max_tokens=150,
        temperature=0,
        stream=True,
        extra_body={"min_tokens": 150},
    )
    chunks = iter(stream)
    next(chunks)  # generating
    server.process.terminate()
    wait_until(lambda: request(server, "GET", "/health")[0] == 503, "/health answering 503", timeout=10)
    status, headers, body = request(server, "GET", "/v1/models")
    assert status == 503 and headers["retry-after"] == "1" and "shutting down" in json.loads(body)["error"]["message"]
    rest = list(chunks)
    assert rest[-1].choices[0].finish_reason == "length"
    assert server.process.wait(30) == 0
    server.stop()


def test_a_client_that_hangs_up_mid_stream_cancels_its_sequence(server: Server) -> None:
    """Closing the connection in the middle of a stream is a cancellation (not a server error): the sequence stops
    within two tokens. Hanging up right after the last chunk, as the openai SDK does at [DONE], is a whole reply."""
    assert server.http_port is not None
    before = server.scrape()
    messages: Any = [{"role": "user", "content": "長く"}]
    body = {"model": model_id(server), "messages": messages, "stream": True}
    connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=60)
    connection.request(
        "POST", "/v1/chat/completions", json.dumps({**body, "max_tokens": 1500, "min_tokens": 1500}).encode()
    )
    response = connection.getresponse()
    assert response.status == 200 and response.fp is not None
    response.fp.readline()  # the first event has arrived: the sequence is generating
    if connection.sock is not None:
        connection.sock.close()
    response.close()
    key = 'jachat_requests_total{api="http",code="CANCELLED",rpc="/v1/chat/completions"}'
    wait_until(
        lambda: server.scrape().get(key, 0.0) - before.get(key, 0.0) >= 1, "the hang-up recorded as a cancellation"
    )
    stopped = "jachat_tokens_after_cancel_count"
    wait_until(lambda: server.scrape().get(stopped, 0.0) > before.get(stopped, 0.0), "the cancelled sequence stopped")
    for _ in range(5):  # whole replies read to [DONE] by the SDK, which then closes: never an error
        list(
            client(server).chat.completions.create(model=model_id(server), messages=messages, max_tokens=3, stream=True)
        )
    after = server.scrape()
    assert (
        after.get('jachat_tokens_after_cancel_bucket{le="2.0"}', 0.0)
        - before.get('jachat_tokens_after_cancel_bucket{le="2.0"}', 0.0)
        >= 1
    )
    internal = 'jachat_requests_total{api="http",code="INTERNAL",rpc="/v1/chat/completions"}'
    assert after.get(internal, 0.0) == before.get(internal, 0.0)


def test_a_body_that_never_arrives_is_a_400_not_a_server_error(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that sends its headers and then trickles (or withholds) the body gets 400 naming the body once the
    read timeout passes (shortened here; the server runs in this process), not an INTERNAL error."""
    from jachat.service.edge.http import body

    monkeypatch.setattr(body, "BODY_READ_TIMEOUT", 0.5)
    assert server.http_port is not None
    before = server.scrape()
    connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=60)
    connection.putrequest("POST", "/v1/chat/completions")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", "1000")
    connection.endheaders(b'{"model": ')
    response = connection.getresponse()
    error = json.loads(response.read())["error"]
    connection.close()
    assert response.status == 400 and error["param"] == "body" and "not received within" in error["message"]
    internal = 'jachat_requests_total{api="http",code="INTERNAL",rpc="/v1/chat/completions"}'
    assert server.scrape().get(internal, 0.0) == before.get(internal, 0.0)


def test_a_large_body_is_parsed_and_converted_off_the_event_loop(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its cost grows with what the client sent (thousands of content parts), so a body over 64 KiB is parsed and
    converted on the preparation pool; a small one, cheaper than the hand-off, stays on the loop."""
    import threading

    from jachat.service.edge.http.chat_request import parse_chat as convert

    threads: list[str] = []

    def recording(body: object, info: Any) -> Any:
        threads.append(threading.current_thread().name)
        return convert(body, info)

    monkeypatch.setattr("jachat.service.edge.http.chat.parse_chat", recording)
    parts = [{"type": "text", "text": ""}] * 4000  # about 120 KB of JSON (4000 newlines: too long a turn, a 400)
    for content, expected in ((parts, 400), ("hi", 200)):
        body = {"model": model_id(server), "messages": [{"role": "user", "content": content}], "max_tokens": 1}
        status, _, answer = request(server, "POST", "/v1/chat/completions", body)
        assert status == expected, answer
    assert threads[0].startswith("jachat-prepare") and threads[1] == "jachat-test-server", threads


def _closed_by_server(connection: socket.socket) -> bool:
    """Whether the server has closed this connection: it reads as end of file (or a reset), without waiting."""
    if not select.select([connection], [], [], 0)[0]:
        return False
    try:
        return connection.recv(65536) == b""
    except OSError:  # reset: closed too
        return True


def test_compressed_bodies_are_inflated_off_the_loop_within_the_limit(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gzip and deflate bodies work; we inflate them on the preparation pool, never past 4 MiB (413), gzip with at
    most 16 members; any other coding is 415 in OpenAI's shape, refused before the body is read."""
    import threading
    import zlib

    from jachat.service.edge.http import body as http_body

    threads: list[str] = []
    inflate = http_body.inflate

    def recording(data: bytes, coding: str, limit: int) -> bytes:
        threads.append(threading.current_thread().name)
        return inflate(data, coding, limit)

    monkeypatch.setattr(http_body, "inflate", recording)
    assert server.http_port is not None
    call = {"model": model_id(server), "messages": [{"role": "user", "content": "やあ"}], "max_tokens": 2}
    plain = json.dumps(call).encode()
    for coding, data in (("gzip", gzip.compress(plain)), ("deflate", zlib.compress(plain))):
        status, _, answer = request(server, "POST", "/v1/chat/completions", data, {"Content-Encoding": coding})
        assert status == 200, answer
    assert threads and all(name.startswith("jachat-prepare") for name in threads), threads

    bomb = gzip.compress(b" " * (5 * 1024 * 1024))  # 5 KB that inflate past the limit
    status, _, answer = request(server, "POST", "/v1/chat/completions", bomb, {"Content-Encoding": "gzip"})
    assert status == 413 and json.loads(answer)["error"]["param"] == "body", answer
    members = b"".join(gzip.compress(b" ") for _ in range(100))
    status, _, answer = request(server, "POST", "/v1/chat/completions", members, {"Content-Encoding": "gzip"})
    assert status == 400 and "gzip members" in json.loads(answer)["error"]["message"], answer
    for coding in ("br", "zstd", "gzip, gzip"):
        status, _, answer = request(server, "POST", "/v1/chat/completions", plain, {"Content-Encoding": coding})
        error = json.loads(answer)["error"]
        assert status == 415 and error["param"] == "content-encoding", answer


def test_a_body_no_route_reads_is_never_read_after_the_reply(server: Server) -> None:
    """aiohttp kept reading (and inflating, on the event loop) whatever body a client sent to any route for 10 s
    after the reply: one unauthenticated client uploading gzip to GET /health took the server's CPU. Now the
    connection is closed right after the reply instead."""
    assert server.http_port is not None
    head = b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Encoding: gzip\r\nContent-Length: 4000000\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=30) as connection:
        connection.sendall(head + gzip.compress(b"\0" * 1_000_000))
        reply = connection.recv(65536)
        assert reply.startswith(b"HTTP/1.1 200 "), reply[:100]
        wait_until(lambda: _closed_by_server(connection), "the server hung up on the unread body", timeout=5)


def test_a_connection_beyond_the_cap_takes_the_place_of_an_idle_one(model_f32: Path) -> None:
    """At the cap, a newcomer displaces the connection that has sent the fewest bytes a second (here one of eight
    idle ones) and is served; the other seven are kept."""
    with serving(
        model_f32, "--max-http-connections", "8", "--max-http-connections-per-peer", "8", *http_flags()
    ) as capped:
        assert capped.http_port is not None
        idle = [socket.create_connection(("127.0.0.1", capped.http_port), timeout=30) for _ in range(8)]
        try:
            wait_until(lambda: capped.service.http is not None and len(capped.service.http.admission.open) == 8, "8")
            assert request(capped, "GET", "/health")[0] == 200
            wait_until(lambda: sum(_closed_by_server(c) for c in idle) >= 1, "an idle connection displaced")
            assert sum(_closed_by_server(c) for c in idle) == 1
        finally:
            for connection in idle:
                connection.close()


def test_a_stream_nobody_reads_is_hung_up_on_even_when_it_fits_in_the_buffers(model_f32: Path) -> None:
    """A reply small enough for the socket buffers never blocks a write, so it used to be recorded OK and kept,
    unread, in the server's kernel memory for as long as the connection lived. Written is not delivered: the
    client must take it within --stream-write-timeout-seconds, or the call is DEADLINE_EXCEEDED and the
    connection is reset."""
    with serving(model_f32, "--stream-write-timeout-seconds", "1", *http_flags()) as server:
        assert server.http_port is not None
        body = {
            "model": model_id(server),
            "messages": [{"role": "user", "content": "長く"}],
            "stream": True,
            "max_tokens": 300,
            "min_tokens": 300,
        }
        data = json.dumps(body).encode()
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}"
        ).encode()
        before = server.scrape()
        with socket.socket() as reader:
            reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a client that takes next to nothing
            reader.connect(("127.0.0.1", server.http_port))
            reader.sendall(head + b"\r\n\r\n" + data)
            key = 'jachat_requests_total{api="http",code="DEADLINE_EXCEEDED",rpc="/v1/chat/completions"}'
            wait_until(lambda: server.scrape().get(key, 0.0) > before.get(key, 0.0), "the unread stream ended")
            ok = 'jachat_requests_total{api="http",code="OK",rpc="/v1/chat/completions"}'
            assert server.scrape().get(ok, 0.0) == before.get(ok, 0.0)
            assert server.scrape()["jachat_running_requests"] == 0


def test_slow_bodies_hold_no_call_slot(model_f32: Path) -> None:
    """Clients that send headers and then trickle their bodies used to hold the HTTP call slots: every other chat
    call got 429 for as long as they kept it up. A call now takes its slot once its body is in."""
    with serving(model_f32, "--max-concurrent-rpcs", "4", *http_flags()) as server:
        assert server.http_port is not None
        head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 999"
        slow = []
        try:
            for _ in range(6):  # more than the 4 slots: each sends its headers and one byte, then nothing
                connection = socket.create_connection(("127.0.0.1", server.http_port))
                connection.sendall(head + b"\r\n\r\n{")
                slow.append(connection)
            call = {"model": model_id(server), "messages": [{"role": "user", "content": "やあ"}], "max_tokens": 2}
            status, _, answer = request(server, "POST", "/v1/chat/completions", call)
            assert status == 200, answer
        finally:
            for connection in slow:
                connection.close()


def test_one_peer_holds_at_most_its_share_of_the_connections(model_f32: Path) -> None:
    """One address cannot take every place (--max-http-connections-per-peer; a quarter of the cap by default): its
    newcomer displaces its own idle connection, never another peer's."""
    flags = ("--max-http-connections", "32", "--max-http-connections-per-peer", "6")
    with serving(model_f32, *flags, *http_flags()) as server:
        assert server.http_port is not None and server.service.http is not None
        admission = server.service.http.admission
        other = socket.create_connection(("127.0.0.1", server.http_port), source_address=("127.0.0.2", 0))
        held = [socket.create_connection(("127.0.0.1", server.http_port)) for _ in range(6)]
        try:
            wait_until(lambda: admission.by_peer.get("127.0.0.1") == 6, "six connections of the peer")
            extra = socket.create_connection(("127.0.0.1", server.http_port))
            held.append(extra)
            wait_until(lambda: admission.displaced == 1, "the peer's own idle connection displaced")
            assert admission.by_peer == {"127.0.0.1": 6, "127.0.0.2": 1}
            assert not _closed_by_server(other) and not _closed_by_server(extra)
        finally:
            for connection in (*held, other):
                connection.close()


def test_expect_100_continue_is_not_said_to_a_body_over_the_limit_or_a_stranger(
    model_f32: Path, tmp_path: Path
) -> None:
    """aiohttp answered 100 Continue to anyone, so a 5 MiB upload was invited before its 413; a caller without a
    token too. Now each is answered at once, in OpenAI's shape; a good caller is still invited."""
    tokens = tmp_path / "tokens"
    tokens.write_text("team-a secret-a\n")
    with serving(model_f32, "--auth-token-file", str(tokens), *http_flags()) as guarded:
        assert guarded.http_port is not None
        start = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
        big = _raw(guarded.http_port, start + b"Authorization: Bearer secret-a\r\nContent-Length: 5000000")
        assert big.startswith(b"HTTP/1.1 413 ") and b"request_too_large" in big, big[:200]
        stranger = _raw(guarded.http_port, start + b"Content-Length: 10")
        assert stranger.startswith(b"HTTP/1.1 401 ") and b"invalid_api_key" in stranger, stranger[:200]
        invited = _raw(guarded.http_port, start + b"Authorization: Bearer secret-a\r\nContent-Length: 10")
        assert invited.startswith(b"HTTP/1.1 100 Continue"), invited[:200]


def test_a_malformed_request_is_refused_in_one_log_line_without_a_traceback(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    """A request aiohttp cannot parse (a NUL in a header) was a plain-text 400 and an ERROR with a traceback:
    now OpenAI's error shape and one WARNING line."""
    assert server.http_port is not None
    with caplog.at_level("INFO"):
        reply = _raw(server.http_port, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-A: a\x00b")
        assert reply.startswith(b"HTTP/1.") and b" 400 " in reply[:20]
        head, _, body = reply.partition(b"\r\n\r\n")
        assert b"application/json" in head and json.loads(body)["error"]["type"] == "invalid_request_error", reply
        wait_until(lambda: any("malformed HTTP request" in r.getMessage() for r in caplog.records), "its log line")
    records = [r for r in caplog.records if r.name.startswith(("aiohttp", "jachat.http"))]
    assert records and all(r.levelname == "WARNING" and not r.exc_info for r in records), records


def test_a_client_that_hangs_up_right_after_done_had_a_whole_reply(server: Server) -> None:
    """Closing the connection as soon as [DONE] arrives (as the openai SDK does) is a whole reply, recorded OK,
    however the hang-up races the server's check that the client took everything."""
    assert server.http_port is not None
    call = {"model": model_id(server), "messages": [{"role": "user", "content": "やあ"}], "stream": True}
    data = json.dumps({**call, "max_tokens": 3}).encode()
    head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n\r\n".encode()
    ok = 'jachat_requests_total{api="http",code="OK",rpc="/v1/chat/completions"}'
    cancelled = 'jachat_requests_total{api="http",code="CANCELLED",rpc="/v1/chat/completions"}'
    before = server.scrape()
    for _ in range(20):
        with socket.create_connection(("127.0.0.1", server.http_port), timeout=30) as connection:
            connection.sendall(head + data)
            received = b""
            while b"data: [DONE]" not in received:
                chunk = connection.recv(65536)
                assert chunk, received
                received += chunk
    wait_until(lambda: server.scrape().get(ok, 0.0) - before.get(ok, 0.0) == 20, "twenty whole replies recorded")
    assert server.scrape().get(cancelled, 0.0) == before.get(cancelled, 0.0)


def test_with_tokens_one_tenant_holds_at_most_half_of_the_call_slots(model_f32: Path, tmp_path: Path) -> None:
    """One valid token used to be able to take every HTTP call slot and shut the other tenants out."""
    tokens = tmp_path / "tokens"
    tokens.write_text("team-a secret-a\nteam-b secret-b\n")
    flags = ("--auth-token-file", str(tokens), "--max-concurrent-rpcs", "4")
    with serving(model_f32, *flags, *http_flags()) as server:
        a, b = client(server, "secret-a"), client(server, "secret-b")
        model = a.models.list().data[0].id
        hello: Any = [{"role": "user", "content": "長く"}]
        long = [
            a.chat.completions.create(
                model=model, messages=hello, max_tokens=1500, extra_body={"min_tokens": 1500}, stream=True
            )
            for _ in range(2)
        ]
        try:
            for stream in long:
                next(iter(stream))  # both run: team-a holds its two slots of four
            with pytest.raises(openai.RateLimitError) as refused:
                a.chat.completions.create(model=model, messages=hello, max_tokens=2)
            assert "its share" in str(refused.value)
            assert b.chat.completions.create(model=model, messages=hello, max_tokens=2).choices  # team-b gets in
        finally:
            for stream in long:
                stream.close()
