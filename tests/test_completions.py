"""/v1/completions through the official `openai` SDK against a real server (float32 demo model): generation, streams,
echoed prompts with their log-probabilities (equal to Hugging Face's and to the Score RPC's), the chat API's greedy
reply, errors naming their field, auth, and the route turned off."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from jachat.service.text.prompt import Speaker, Turn, render_prompt
from jachat.service.text.tokenizer import Tokenizer
from jachat.v1 import chat_pb2
from tests.helpers import hf_model, user
from tests.servers import Server, serving
from tests.test_http_api import client, http_flags, model_id, request

PROMPT = "ユーザー: 日本の首都はどこですか?<NL>システム: "


@pytest.fixture(scope="module")
def server(model_f32: Path) -> Iterator[Server]:
    with serving(model_f32, *http_flags()) as running:
        yield running


def complete(server: Server, **body: Any) -> Any:
    return client(server).completions.create(model=model_id(server), **body)


def test_a_completion_continues_the_prompt_as_written_and_counts_its_tokens(
    server: Server, tokenizer: Tokenizer
) -> None:
    before = server.scrape()
    reply = complete(server, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=0)
    [choice] = reply.choices
    assert reply.object == "text_completion" and choice.index == 0 and choice.finish_reason in ("length", "stop")
    assert reply.usage.prompt_tokens == len(tokenizer.encode(PROMPT))
    assert 0 < reply.usage.completion_tokens <= 8
    assert len(choice.logprobs.tokens) == len(choice.logprobs.token_logprobs) == reply.usage.completion_tokens
    assert choice.logprobs.top_logprobs is None and all(p <= 0 for p in choice.logprobs.token_logprobs)
    assert choice.text == "".join(choice.logprobs.tokens)  # raw: <NL> stays as the model wrote it
    name = 'jachat_requests_total{api="http",code="OK",rpc="/v1/completions"}'
    assert server.scrape()[name] - before.get(name, 0.0) == 1


def test_echo_with_max_tokens_0_gives_the_prompts_log_probabilities_equal_to_hugging_faces(
    server: Server, demo_checkpoint: Path, tokenizer: Tokenizer
) -> None:
    import torch

    texts = [PROMPT, "吾輩は猫である。名前はまだ無い。"]
    reply = complete(server, prompt=texts, max_tokens=0, echo=True, logprobs=1)
    assert [c.index for c in reply.choices] == [0, 1] and reply.usage.completion_tokens == 0
    model = hf_model(demo_checkpoint)
    for text, choice in zip(texts, reply.choices, strict=True):
        assert choice.text == text and choice.finish_reason == "length"
        ids = tokenizer.encode(text)
        logprobs = choice.logprobs
        assert len(logprobs.tokens) == len(ids) and logprobs.token_logprobs[0] is None
        assert logprobs.top_logprobs[0] is None and logprobs.text_offset[0] == 0
        with torch.no_grad():
            expected = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
        for place in range(1, len(ids)):
            assert abs(logprobs.token_logprobs[place] - float(expected[place - 1, ids[place]])) < 1e-3
            [(_, best)] = logprobs.top_logprobs[place].items()
            assert abs(best - float(expected[place - 1].max())) < 1e-3 and best >= logprobs.token_logprobs[place]
    assert reply.usage.prompt_tokens == sum(len(tokenizer.encode(t)) for t in texts)


def test_a_prompt_of_token_ids_is_echoed_decoded_and_scored_as_its_text_is(
    server: Server, tokenizer: Tokenizer
) -> None:
    ids = tokenizer.encode(PROMPT)
    by_ids = complete(server, prompt=ids, max_tokens=0, echo=True, logprobs=0).choices[0]
    by_text = complete(server, prompt=PROMPT, max_tokens=0, echo=True, logprobs=0).choices[0]
    assert by_ids.text == by_text.text == PROMPT
    assert by_ids.logprobs.token_logprobs == pytest.approx(by_text.logprobs.token_logprobs, abs=1e-6)


def test_the_score_rpc_gives_the_echo_paths_numbers(server: Server) -> None:
    turns = [user("日本の首都はどこですか?")]
    candidate = "東京です。\n京都も近い。"
    with server.channel() as channel:
        stub = server.stub(channel)
        prompt = stub.Tokenize(chat_pb2.TokenizeRequest(turns=turns), timeout=60)
        scored = stub.Score(chat_pb2.ScoreRequest(turns=turns, candidates=[candidate]), timeout=60).candidates[0]
    ids = list(prompt.token_ids) + [t.id for t in scored.tokens]
    echoed = complete(server, prompt=ids, max_tokens=0, echo=True, logprobs=0).choices[0].logprobs
    tail = echoed.token_logprobs[len(prompt.token_ids) :]
    assert tail == pytest.approx([t.logprob for t in scored.tokens], abs=1e-5)
    assert sum(tail) == pytest.approx(scored.logprob, abs=1e-4)


def test_a_greedy_completion_of_a_rendered_chat_prompt_is_the_chat_apis_greedy_reply(server: Server) -> None:
    text = "日本の首都はどこですか?"
    sampling: dict[str, Any] = {"temperature": 0, "max_tokens": 24, "extra_body": {"repetition_penalty": 1.1}}
    chat = client(server).chat.completions.create(
        model=model_id(server),
        messages=[{"role": "user", "content": text}],
        logprobs=True,
        temperature=0,
        max_tokens=24,
        extra_body={"repetition_penalty": 1.1},
    )
    prompt = render_prompt([Turn(Speaker.USER, text)])
    completion = complete(server, prompt=prompt, logprobs=1, **sampling).choices[0]
    logprobs, content = chat.choices[0].logprobs, chat.choices[0].message.content
    assert logprobs is not None and logprobs.content is not None and content
    chat_tokens = [t.token for t in logprobs.content]
    # the chat reply ends where the model starts the user's turn (or at </s>); the completion goes on as written
    assert completion.logprobs.tokens[: len(chat_tokens)] == chat_tokens
    assert completion.text.replace("<NL>", "\n").startswith(content)
    # greedy: each chosen token is its place's most likely
    for chosen, top in zip(completion.logprobs.token_logprobs, completion.logprobs.top_logprobs, strict=True):
        assert list(top.values()) == [chosen]


def test_a_stream_sends_the_echo_then_the_deltas_then_usage(server: Server) -> None:
    chunks = list(
        complete(
            server,
            prompt=PROMPT,
            max_tokens=6,
            temperature=0,
            stream=True,
            echo=True,
            logprobs=0,
            stream_options={"include_usage": True},
        )
    )
    texts = [c.choices[0].text for c in chunks if c.choices]
    whole = complete(server, prompt=PROMPT, max_tokens=6, temperature=0, echo=True).choices[0].text
    assert texts[0] == PROMPT and "".join(texts) == whole
    finished = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finished in (["length"], ["stop"])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 6
    offsets = [o for c in chunks if c.choices and c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    assert offsets == sorted(offsets) and offsets[0] == 0
    echo_only = list(complete(server, prompt=PROMPT, max_tokens=0, echo=True, stream=True))
    assert [c.choices[0].text for c in echo_only] == [PROMPT, ""] and echo_only[-1].choices[0].finish_reason == "length"


def test_stop_strings_end_a_completion(server: Server) -> None:
    whole = complete(server, prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text
    stop = whole[3:5]
    cut = complete(server, prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop]).choices[0]
    assert cut.text == whole[: whole.index(stop)] and cut.finish_reason == "stop"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": PROMPT, "max_tokens": 0}, "max_tokens"),
        ({"prompt": PROMPT, "logprobs": 5}, "logprobs"),
        ({"prompt": PROMPT, "logprobs": 1, "temperature": 0.7}, "logprobs"),
        ({"prompt": PROMPT, "seed": 2**64}, "seed"),
        ({"prompt": PROMPT, "n": 2}, "n"),
        ({"prompt": PROMPT, "suffix": "x"}, "suffix"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": [[1, 2], []]}, "prompt[1]"),
        ({"prompt": [[1, 2], "x"]}, "prompt"),
        ({"prompt": [[5, 99999]]}, "prompt[0][1]"),
        ({"prompt": ["a"] * 17}, "prompt"),
        ({"prompt": ["a", "b"], "stream": True}, "prompt"),
        ({"prompt": PROMPT, "max_tokens": 5000}, "max_tokens"),
        ({"prompt": PROMPT, "top_k": -1}, "top_k"),
        ({"prompt": PROMPT, "best_of": 3}, "best_of"),
        ({"prompt": PROMPT, "bogus": 1}, "bogus"),
    ],
)
def test_a_bad_request_is_a_400_naming_its_field(server: Server, body: dict[str, Any], field: str) -> None:
    status, _, payload = request(server, "POST", "/v1/completions", {"model": model_id(server), **body})
    assert status == 400, payload
    message = json.loads(payload)["error"]["message"]
    assert message.startswith(f"{field}: ") or f"; {field}: " in message, message


def test_a_seed_is_accepted_where_it_changes_nothing(server: Server) -> None:
    seeded = complete(server, prompt=PROMPT, max_tokens=4, temperature=0, seed=1234).choices[0].text
    assert seeded == complete(server, prompt=PROMPT, max_tokens=4, temperature=0).choices[0].text


def test_completions_need_a_token_and_can_be_turned_off(model_f32: Path, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("s3cret\n")
    flags = ("--auth-token-file", str(tokens), "--completions", "false", *http_flags())
    with serving(model_f32, *flags) as guarded:
        with pytest.raises(openai.AuthenticationError):
            client(guarded, "wrong").completions.create(model="m", prompt="x")
        with pytest.raises(openai.NotFoundError) as off:
            client(guarded, "s3cret").completions.create(model="m", prompt="x")
        assert "--completions false" in str(off.value)
        chat = client(guarded, "s3cret").chat.completions.create(
            model=model_id_with(guarded, "s3cret"), messages=[{"role": "user", "content": "やあ"}], max_tokens=2
        )
        assert chat.choices[0].finish_reason in ("length", "stop")


def model_id_with(server: Server, key: str) -> str:
    return client(server, key).models.list().data[0].id
