"""API contract tests on the real server: the seed's requests, the openai client, SSE framing."""

from __future__ import annotations

import json
import re

import pytest
import requests

MODEL = "Qwen2-7B-Instruct"

# The seed document's curl bodies, byte for byte.
SEED_CHAT_BODY = (
    '{ "model": "Qwen2-7B-Instruct", "max_tokens": 10, "temperature": 0, "stream": true, '
    '"messages": [ { "role": "system", "content": "You are a helpful assistant." }, '
    '{ "role": "user", "content": "hello xllm" } ] }'
)
SEED_COMPLETIONS_BODY = (
    '{ "model": "Qwen2-7B-Instruct", "prompt": "hello xllm", "max_tokens": 10, '
    '"temperature": 0, "stream": true }'
)
SEED_PY_MESSAGES = [{"role": "user", "content": "列出三个国家和他的首都。"}]

CHAT_PROMPT = [{"role": "user", "content": "Name three colors."}]
TEXT_PROMPT = "The capital of France is"


def sse_payloads(resp: requests.Response) -> list[str]:
    """The `data:` payloads of a finished SSE body, asserting the framing on the way."""
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/event-stream")
    body = resp.content.decode("utf-8").replace("\r\n", "\n")
    events = [e for e in body.split("\n\n") if e.strip()]
    assert body.endswith("\n\n"), "the stream must end with a blank line"
    payloads = []
    for event in events:
        lines = event.split("\n")
        assert len(lines) == 1, f"one data line per event, got {event!r}"
        assert lines[0].startswith("data: "), f"not a data line: {lines[0]!r}"
        payloads.append(lines[0][len("data: ") :])
    assert payloads[-1] == "[DONE]"
    assert "[DONE]" not in payloads[:-1]
    return payloads[:-1]


def check_chunks(chunks: list[dict], obj: str) -> None:
    """Same id / object / created / model on every chunk; one finish_reason per choice."""
    assert chunks
    first = chunks[0]
    assert isinstance(first["id"], str) and first["id"]
    assert isinstance(first["created"], int)
    for chunk in chunks:
        assert "error" not in chunk, chunk
        assert chunk["id"] == first["id"]
        assert chunk["object"] == obj
        assert chunk["created"] == first["created"]
        assert chunk["model"] == MODEL
    finishes: dict[int, list] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            if choice.get("finish_reason") is not None:
                finishes.setdefault(choice["index"], []).append(choice["finish_reason"])
    assert finishes, "no chunk carried a finish_reason"
    for reasons in finishes.values():
        assert len(reasons) == 1 and reasons[0] in ("stop", "length")


def post_stream(url: str, body: dict) -> list[dict]:
    resp = requests.post(url, json=body, timeout=300)
    return [json.loads(p) for p in sse_payloads(resp)]


# --- the seed's requests -------------------------------------------------------------


def test_seed_chat_stream_as_written(server_url):
    resp = requests.post(
        f"{server_url}/v1/chat/completions",
        data=SEED_CHAT_BODY.encode(),
        headers={"Content-Type": "application/json"},
        timeout=300,
    )
    chunks = [json.loads(p) for p in sse_payloads(resp)]
    check_chunks(chunks, "chat.completion.chunk")
    assert chunks[0]["choices"][0]["delta"].get("role") == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text.strip()


def test_seed_completions_stream_as_written(server_url):
    resp = requests.post(
        f"{server_url}/v1/completions",
        data=SEED_COMPLETIONS_BODY.encode(),
        headers={"Content-Type": "application/json"},
        timeout=300,
    )
    chunks = [json.loads(p) for p in sse_payloads(resp)]
    check_chunks(chunks, "text_completion")
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text
    # max_tokens 10 and greedy: at most 10 tokens, and the same text as the non-streamed call
    body = json.loads(SEED_COMPLETIONS_BODY) | {"stream": False}
    full = requests.post(f"{server_url}/v1/completions", json=body, timeout=300).json()
    assert full["choices"][0]["text"] == text
    assert full["usage"]["completion_tokens"] <= 10


def check_seed_python_response(response: requests.Response) -> None:
    assert response.status_code == 200, response.text
    ans = json.loads(response.text)["choices"]
    message = ans[0]["message"]
    assert message["role"] == "assistant"
    assert isinstance(message["content"], str) and message["content"]


def test_seed_python_example_short(server_url):
    request_data = {
        "model": "Qwen2-7B-Instruct",
        "messages": SEED_PY_MESSAGES,
        "stream": False,
        "temperature": 0.6,
        "max_tokens": 48,
    }
    check_seed_python_response(
        requests.post(f"{server_url}/v1/chat/completions", json=request_data, timeout=300)
    )


def test_seed_python_example_as_written(server_url):
    request_data = {
        "model": "Qwen2-7B-Instruct",
        "messages": SEED_PY_MESSAGES,
        "stream": False,
        "temperature": 0.6,
        "max_tokens": 2048,
    }
    check_seed_python_response(
        requests.post(f"{server_url}/v1/chat/completions", json=request_data, timeout=600)
    )


# --- /v1/models and /health ----------------------------------------------------------


def test_models_shape(server_url):
    resp = requests.get(f"{server_url}/v1/models", timeout=30)
    assert resp.status_code == 200
    body = resp.json()
    assert body["object"] == "list"
    assert len(body["data"]) == 1
    card = body["data"][0]
    assert card["id"] == MODEL
    assert card["object"] == "model"
    assert isinstance(card["created"], int)
    assert card["owned_by"] == "xllm"
    assert card["max_model_len"] == 4096


def test_models_via_openai_client(openai_client):
    ids = [m.id for m in openai_client.models.list()]
    assert ids == [MODEL]


def test_health(server_url):
    resp = requests.get(f"{server_url}/health", timeout=30)
    assert resp.status_code == 200
    assert resp.json() == {"status": "healthy"}


# --- openai client: chat and completions --------------------------------------------


def check_usage(usage) -> None:
    assert usage.prompt_tokens > 0
    assert usage.completion_tokens > 0
    assert usage.prompt_tokens + usage.completion_tokens == usage.total_tokens


def test_chat_non_streaming(openai_client):
    resp = openai_client.chat.completions.create(
        model=MODEL, messages=CHAT_PROMPT, max_tokens=8, temperature=0
    )
    assert resp.object == "chat.completion"
    assert resp.model == MODEL
    assert len(resp.choices) == 1
    choice = resp.choices[0]
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason in ("stop", "length")
    check_usage(resp.usage)
    assert resp.usage.completion_tokens <= 8


def test_chat_streaming_matches_non_streaming(openai_client):
    kwargs = dict(model=MODEL, messages=CHAT_PROMPT, max_tokens=8, temperature=0)
    full = openai_client.chat.completions.create(**kwargs)
    chunks = list(openai_client.chat.completions.create(stream=True, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason


def test_completions_non_streaming(openai_client):
    resp = openai_client.completions.create(
        model=MODEL, prompt=TEXT_PROMPT, max_tokens=6, temperature=0
    )
    assert resp.object == "text_completion"
    assert resp.model == MODEL
    assert len(resp.choices) == 1
    assert resp.choices[0].index == 0
    assert resp.choices[0].text
    assert resp.choices[0].finish_reason in ("stop", "length")
    check_usage(resp.usage)


def test_completions_streaming_matches_non_streaming(openai_client):
    kwargs = dict(model=MODEL, prompt=TEXT_PROMPT, max_tokens=6, temperature=0)
    full = openai_client.completions.create(**kwargs)
    chunks = list(openai_client.completions.create(stream=True, **kwargs))
    assert len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason


def test_completions_prompt_forms(openai_client):
    """A string, a list of strings, token ids and lists of token ids are all prompts."""
    one = openai_client.completions.create(
        model=MODEL, prompt=TEXT_PROMPT, max_tokens=3, temperature=0
    )
    two = openai_client.completions.create(
        model=MODEL, prompt=[TEXT_PROMPT, "Hello"], max_tokens=3, temperature=0
    )
    assert sorted(c.index for c in two.choices) == [0, 1]
    assert two.choices[0].text == one.choices[0].text
    ids = openai_client.completions.create(
        model=MODEL, prompt=[504, 3575, 282], max_tokens=3, temperature=0
    )
    assert ids.usage.prompt_tokens == 3
    many = openai_client.completions.create(
        model=MODEL, prompt=[[504, 3575, 282], [19556]], max_tokens=3, temperature=0
    )
    assert sorted(c.index for c in many.choices) == [0, 1]
    assert many.choices[0].text == ids.choices[0].text
    assert many.usage.prompt_tokens == 4


def texts_by_index(chunks) -> dict[int, str]:
    """Streamed chat or completion chunks (openai objects) -> index -> joined text."""
    texts: dict[int, str] = {}
    for chunk in chunks:
        for c in chunk.choices:
            piece = c.text if hasattr(c, "text") else (c.delta.content or "")
            texts[c.index] = texts.get(c.index, "") + piece
    return texts


def finish_reasons_by_index(chunks) -> dict[int, list[str]]:
    reasons: dict[int, list[str]] = {}
    for chunk in chunks:
        for c in chunk.choices:
            if c.finish_reason is not None:
                reasons.setdefault(c.index, []).append(c.finish_reason)
    return reasons


N2_CHAT = dict(model=MODEL, messages=CHAT_PROMPT, max_tokens=6, temperature=1.0, seed=7, n=2,
               extra_body={"ignore_eos": True})  # fmt: skip
N2_COMPLETIONS = dict(model=MODEL, prompt=TEXT_PROMPT, max_tokens=5, temperature=1.0, seed=7,
                      n=2, extra_body={"ignore_eos": True})  # fmt: skip


def test_chat_n2(openai_client):
    resp = openai_client.chat.completions.create(**N2_CHAT)
    assert [c.index for c in resp.choices] == [0, 1]
    for c in resp.choices:
        assert c.message.role == "assistant"
        assert isinstance(c.message.content, str) and c.message.content.strip(), resp
        assert c.finish_reason == "length"
    check_usage(resp.usage)
    assert resp.usage.completion_tokens == 2 * 6
    # the same seed samples the same two choices again, and streaming does not change them
    again = openai_client.chat.completions.create(**N2_CHAT)
    assert [c.message.content for c in again.choices] == [c.message.content for c in resp.choices]
    chunks = list(openai_client.chat.completions.create(stream=True, **N2_CHAT))
    assert texts_by_index(chunks) == {c.index: c.message.content for c in resp.choices}
    assert finish_reasons_by_index(chunks) == {0: ["length"], 1: ["length"]}


def test_completions_n2(openai_client):
    resp = openai_client.completions.create(**N2_COMPLETIONS)
    assert [c.index for c in resp.choices] == [0, 1]
    for c in resp.choices:
        assert isinstance(c.text, str) and c.text.strip(), resp
        assert c.finish_reason == "length"
    assert resp.usage.completion_tokens == 10
    again = openai_client.completions.create(**N2_COMPLETIONS)
    assert [c.text for c in again.choices] == [c.text for c in resp.choices]


def test_completions_n2_streaming(openai_client):
    full = openai_client.completions.create(**N2_COMPLETIONS)
    chunks = list(openai_client.completions.create(stream=True, **N2_COMPLETIONS))
    texts = texts_by_index(chunks)
    assert set(texts) == {0, 1}
    assert all(t.strip() for t in texts.values()), texts
    assert texts == {c.index: c.text for c in full.choices}
    assert finish_reasons_by_index(chunks) == {0: ["length"], 1: ["length"]}


@pytest.mark.parametrize("stream", [False, True], ids=["full", "stream"])
def test_n2_greedy_choices_equal_n1(openai_client, stream):
    """At temperature 0 every one of the n choices is the n=1 greedy text."""
    chat_kwargs = dict(model=MODEL, messages=CHAT_PROMPT, max_tokens=8, temperature=0)
    cmpl_kwargs = dict(model=MODEL, prompt=TEXT_PROMPT, max_tokens=8, temperature=0)
    chat_one = openai_client.chat.completions.create(**chat_kwargs).choices[0].message.content
    cmpl_one = openai_client.completions.create(**cmpl_kwargs).choices[0].text
    assert chat_one.strip() and cmpl_one.strip()
    if stream:
        chat_chunks = list(openai_client.chat.completions.create(n=2, stream=True, **chat_kwargs))
        cmpl_chunks = list(openai_client.completions.create(n=2, stream=True, **cmpl_kwargs))
        assert texts_by_index(chat_chunks) == {0: chat_one, 1: chat_one}
        assert texts_by_index(cmpl_chunks) == {0: cmpl_one, 1: cmpl_one}
        assert set(finish_reasons_by_index(chat_chunks)) == {0, 1}
        assert set(finish_reasons_by_index(cmpl_chunks)) == {0, 1}
    else:
        chat_two = openai_client.chat.completions.create(n=2, **chat_kwargs)
        cmpl_two = openai_client.completions.create(n=2, **cmpl_kwargs)
        assert [(c.index, c.message.content) for c in chat_two.choices] == [
            (0, chat_one), (1, chat_one)
        ]  # fmt: skip
        assert [(c.index, c.text) for c in cmpl_two.choices] == [(0, cmpl_one), (1, cmpl_one)]


# --- several prompts and n > 1: choice index = prompt_index * n + choice_index ----------

MULTI_PROMPTS = ["The capital of France is", "Once upon a time", "Water boils at"]
MULTI_N = 2
MULTI_MAX_TOKENS = 6


@pytest.fixture(scope="module")
def prompts_alone(openai_client) -> list:
    """Each of MULTI_PROMPTS sent alone, greedy: (text, prompt_tokens)."""
    alone = []
    for prompt in MULTI_PROMPTS:
        resp = openai_client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=MULTI_MAX_TOKENS, temperature=0,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        alone.append((resp.choices[0].text, resp.usage.prompt_tokens))
    texts = [text for text, _ in alone]
    assert len(set(texts)) == len(texts), f"the prompts must continue differently: {texts}"
    return alone


@pytest.mark.parametrize("stream", [False, True], ids=["full", "stream"])
def test_multi_prompt_n_choice_index(openai_client, prompts_alone, stream):
    kwargs = dict(model=MODEL, prompt=MULTI_PROMPTS, n=MULTI_N, max_tokens=MULTI_MAX_TOKENS,
                  temperature=0, extra_body={"ignore_eos": True})  # fmt: skip
    total = len(MULTI_PROMPTS) * MULTI_N
    expected = {p * MULTI_N + j: prompts_alone[p][0]
                for p in range(len(MULTI_PROMPTS)) for j in range(MULTI_N)}  # fmt: skip
    prompt_tokens = sum(tokens for _, tokens in prompts_alone)
    if stream:
        chunks = list(openai_client.completions.create(
            stream=True, stream_options={"include_usage": True}, **kwargs))  # fmt: skip
        assert texts_by_index(chunks) == expected
        assert finish_reasons_by_index(chunks) == {i: ["length"] for i in range(total)}
        usage = chunks[-1].usage
        assert chunks[-1].choices == []
    else:
        resp = openai_client.completions.create(**kwargs)
        assert [c.index for c in resp.choices] == list(range(total))
        assert {c.index: c.text for c in resp.choices} == expected
        assert all(c.finish_reason == "length" for c in resp.choices)
        usage = resp.usage
    assert usage.completion_tokens == total * MULTI_MAX_TOKENS
    assert usage.prompt_tokens == prompt_tokens
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


# --- stop strings and finish reasons -------------------------------------------------


def greedy_completion(openai_client, max_tokens: int = 16, **kwargs):
    return openai_client.completions.create(
        model=MODEL, prompt=TEXT_PROMPT, max_tokens=max_tokens, temperature=0, **kwargs
    )


def pick_stop_word(text: str) -> str:
    words = re.findall(r"[A-Za-z]{3,}", text)
    assert words, f"greedy text has no word to stop on: {text!r}"
    return words[1] if len(words) > 1 else words[0]


def test_stop_string_cuts_text(openai_client):
    base = greedy_completion(openai_client, extra_body={"ignore_eos": True}).choices[0].text
    stop = pick_stop_word(base)
    expected = base[: base.index(stop)]
    resp = greedy_completion(openai_client, stop=[stop], extra_body={"ignore_eos": True})
    choice = resp.choices[0]
    assert stop not in choice.text
    assert choice.text == expected
    assert choice.finish_reason == "stop"


def test_stop_string_streaming(openai_client):
    base = greedy_completion(openai_client, extra_body={"ignore_eos": True}).choices[0].text
    stop = pick_stop_word(base)
    chunks = list(
        greedy_completion(openai_client, stop=stop, stream=True, extra_body={"ignore_eos": True})
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == base[: base.index(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_include_stop_str_in_output(openai_client):
    base = greedy_completion(openai_client, extra_body={"ignore_eos": True}).choices[0].text
    stop = pick_stop_word(base)
    resp = greedy_completion(
        openai_client,
        stop=[stop],
        extra_body={"ignore_eos": True, "include_stop_str_in_output": True},
    )
    assert resp.choices[0].text == base[: base.index(stop) + len(stop)]
    assert resp.choices[0].finish_reason == "stop"


def test_chat_stop_string(openai_client):
    kwargs = dict(model=MODEL, messages=CHAT_PROMPT, max_tokens=16, temperature=0)
    base = openai_client.chat.completions.create(**kwargs).choices[0].message.content
    stop = pick_stop_word(base)
    resp = openai_client.chat.completions.create(stop=[stop], **kwargs)
    assert resp.choices[0].message.content == base[: base.index(stop)]
    assert resp.choices[0].finish_reason == "stop"


STOP_CHAT_PROMPT = [{"role": "user", "content": "Describe the moon in two sentences."}]
STOP_TEXT_PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def hf_tokenizer():
    """The default model's own tokenizer, loaded by transformers from its folder."""
    from transformers import AutoTokenizer

    from xllm.model.loader import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model("default"))


def stop_request(endpoint: str) -> dict:
    if endpoint == "chat":
        return dict(model=MODEL, messages=STOP_CHAT_PROMPT, max_tokens=24, temperature=0)
    return dict(model=MODEL, prompt=STOP_TEXT_PROMPT, max_tokens=24, temperature=0,
                extra_body={"ignore_eos": True})  # fmt: skip


def create(openai_client, endpoint: str, **kwargs):
    api = openai_client.chat.completions if endpoint == "chat" else openai_client.completions
    return api.create(**kwargs)


def greedy_text_and_tokens(openai_client, endpoint: str) -> tuple[str, list[str]]:
    """The greedy text of `stop_request(endpoint)` and the texts of its generated tokens."""
    if endpoint == "chat":
        resp = create(openai_client, endpoint, logprobs=True, **stop_request(endpoint))
        choice = resp.choices[0]
        return choice.message.content, [e.token for e in choice.logprobs.content]
    resp = create(openai_client, endpoint, logprobs=1, **stop_request(endpoint))
    return resp.choices[0].text, resp.choices[0].logprobs.tokens


def pick_multi_token_stop(text: str, tokens: list[str], tokenizer, aligned: bool) -> str:
    """A stop string from the middle of the greedy text that spans three generated tokens
    (`aligned`: on token boundaries; else starting one character into a token and ending
    one character into another), occurs first where it was generated, and that the
    tokenizer encodes as two tokens or more."""
    n = len(tokens)
    for i in sorted(range(1, n - 4), key=lambda i: abs(i - n // 2)):
        if not text.startswith("".join(tokens[: i + 4])):
            continue  # a special token or a split character: no clean text offsets here
        start = len("".join(tokens[:i]))
        piece = "".join(tokens[i : i + 3])
        if aligned:
            stop = piece
        else:
            if len(tokens[i]) < 2 or not tokens[i + 3]:
                continue
            stop, start = piece[1:] + tokens[i + 3][0], start + 1
        if not stop.strip() or start == 0 or text.find(stop) != start:
            continue
        if len(tokenizer.encode(stop, add_special_tokens=False)) < 2:
            continue
        return stop
    pytest.fail(f"no multi-token stop string found in {text!r} ({tokens})")


@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "mid_token"])
@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_multi_token_stop_string_streaming(openai_client, hf_tokenizer, endpoint, aligned):
    base, tokens = greedy_text_and_tokens(openai_client, endpoint)
    stop = pick_multi_token_stop(base, tokens, hf_tokenizer, aligned)
    expected = base[: base.index(stop)]
    assert expected and len(expected) < len(base) - len(stop)  # cut in the middle
    chunks = list(create(openai_client, endpoint, stream=True, stop=[stop],
                         **stop_request(endpoint)))  # fmt: skip
    streamed = ""
    finishes = []
    for chunk in chunks:
        assert len(chunk.choices) <= 1
        for c in chunk.choices:
            assert not finishes, f"a chunk after the finishing one: {chunk}"
            piece = c.text if endpoint == "completions" else (c.delta.content or "")
            streamed += piece
            # no chunk ever runs past the cut: no part of the stop string leaks out
            assert expected.startswith(streamed), (stop, streamed, piece)
            if c.finish_reason is not None:
                finishes.append(c.finish_reason)
    assert streamed == expected, (stop, base)
    assert finishes == ["stop"]
    # and the non-streamed response cuts at the same place
    full = create(openai_client, endpoint, stop=[stop], **stop_request(endpoint)).choices[0]
    text = full.message.content if endpoint == "chat" else full.text
    assert text == expected
    assert full.finish_reason == "stop"


def test_completions_default_max_tokens_is_16(openai_client):
    resp = openai_client.completions.create(
        model=MODEL, prompt=TEXT_PROMPT, temperature=0, extra_body={"ignore_eos": True}
    )
    assert resp.usage.completion_tokens == 16
    assert resp.choices[0].finish_reason == "length"


def test_max_completion_tokens_wins(openai_client):
    resp = openai_client.chat.completions.create(
        model=MODEL,
        messages=CHAT_PROMPT,
        max_tokens=10,
        max_completion_tokens=3,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert resp.usage.completion_tokens == 3
    assert resp.choices[0].finish_reason == "length"


def test_unknown_fields_are_ignored(server_url):
    body = {"model": MODEL, "prompt": TEXT_PROMPT, "max_tokens": 2, "user": "u1",
            "some_future_field": {"x": 1}}  # fmt: skip
    resp = requests.post(f"{server_url}/v1/completions", json=body, timeout=300)
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_finish_reason_length(openai_client):
    resp = greedy_completion(openai_client, max_tokens=3, extra_body={"ignore_eos": True})
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.completion_tokens == 3


# --- logprobs and echo ---------------------------------------------------------------


def test_chat_logprobs_shape(openai_client):
    resp = openai_client.chat.completions.create(
        model=MODEL,
        messages=CHAT_PROMPT,
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    choice = resp.choices[0]
    content = choice.logprobs.content
    assert len(content) == resp.usage.completion_tokens
    for entry in content:
        assert isinstance(entry.token, str)
        assert entry.logprob <= 0.0
        assert isinstance(entry.bytes, list) and all(0 <= b < 256 for b in entry.bytes)
        try:
            assert bytes(entry.bytes).decode("utf-8") == entry.token
        except UnicodeDecodeError:
            pass  # part of a multi-byte character: its text cannot match its bytes
        assert len(entry.top_logprobs) == 3
        for top in entry.top_logprobs:
            assert isinstance(top.token, str)
            assert top.logprob <= 0.0
            assert isinstance(top.bytes, list)
        tops = [t.logprob for t in entry.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        # greedy: the chosen token is the most likely one
        assert entry.token == entry.top_logprobs[0].token
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-4)
    joined = b"".join(bytes(e.bytes) for e in content).decode("utf-8", errors="replace")
    assert joined.startswith(choice.message.content)


def test_chat_logprobs_without_top(openai_client):
    resp = openai_client.chat.completions.create(
        model=MODEL, messages=CHAT_PROMPT, max_tokens=3, temperature=0, logprobs=True
    )
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens
    assert all(e.top_logprobs == [] for e in content)


def test_chat_no_logprobs_by_default(openai_client):
    resp = openai_client.chat.completions.create(
        model=MODEL, messages=CHAT_PROMPT, max_tokens=3, temperature=0
    )
    assert resp.choices[0].logprobs is None


def test_completions_logprobs_shape(openai_client):
    resp = greedy_completion(openai_client, max_tokens=5, logprobs=3)
    choice = resp.choices[0]
    lp = choice.logprobs
    n = resp.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == n
    assert len(lp.text_offset) == n
    assert all(isinstance(t, str) for t in lp.tokens)
    assert all(v <= 0.0 for v in lp.token_logprobs)
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert isinstance(top, dict) and 1 <= len(top) <= 3
        assert all(v <= 0.0 for v in top.values())
        # greedy: the chosen token is the best of the top list
        assert value == pytest.approx(max(top.values()), abs=1e-4)
        assert token in top
    for i in range(n - 1):
        assert lp.text_offset[i + 1] - lp.text_offset[i] == len(lp.tokens[i])
    assert "".join(lp.tokens).startswith(choice.text)


def test_completions_echo(openai_client):
    resp = greedy_completion(openai_client, max_tokens=3, echo=True)
    alone = greedy_completion(openai_client, max_tokens=3)
    assert resp.choices[0].text == TEXT_PROMPT + alone.choices[0].text


def test_completions_echo_with_logprobs(openai_client):
    resp = greedy_completion(openai_client, max_tokens=3, echo=True, logprobs=1)
    lp = resp.choices[0].logprobs
    total = resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == total
    assert lp.token_logprobs[0] is None
    assert all(v is not None and v <= 0.0 for v in lp.token_logprobs[1:])
    assert lp.text_offset[0] == 0
    assert "".join(lp.tokens).startswith(TEXT_PROMPT)


# --- usage ---------------------------------------------------------------------------


def test_usage_counts_streamed_tokens(openai_client):
    chunks = list(
        openai_client.chat.completions.create(
            model=MODEL,
            messages=CHAT_PROMPT,
            max_tokens=7,
            temperature=0,
            logprobs=True,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == 1 and usage_chunks[0] is chunks[-1]
    assert chunks[-1].choices == []
    usage = chunks[-1].usage
    streamed = sum(len(c.choices[0].logprobs.content or []) for c in chunks[:-1] if c.choices
                   and c.choices[0].logprobs)  # fmt: skip
    assert usage.completion_tokens == 7 == streamed
    assert usage.prompt_tokens + usage.completion_tokens == usage.total_tokens


def test_completions_include_usage(openai_client):
    chunks = list(
        greedy_completion(
            openai_client,
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 4
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + 4
    assert all(c.usage is None for c in chunks[:-1])


def test_no_usage_chunk_unless_asked(server_url):
    body = {"model": MODEL, "prompt": TEXT_PROMPT, "max_tokens": 3, "stream": True}
    chunks = post_stream(f"{server_url}/v1/completions", body)
    assert all(c["choices"] for c in chunks)
    assert all(c.get("usage") is None for c in chunks)


# --- determinism ---------------------------------------------------------------------


def test_temperature_zero_is_deterministic(openai_client):
    kwargs = dict(model=MODEL, messages=CHAT_PROMPT, max_tokens=12, temperature=0)
    first = openai_client.chat.completions.create(**kwargs).choices[0].message.content
    second = openai_client.chat.completions.create(**kwargs).choices[0].message.content
    assert first == second


def test_seed_reproducible_at_temperature_one(openai_client):
    def sample(seed: int) -> str:
        resp = openai_client.completions.create(
            model=MODEL,
            prompt="Once upon a time",
            max_tokens=12,
            temperature=1.0,
            seed=seed,
            extra_body={"ignore_eos": True},
        )
        return resp.choices[0].text

    assert sample(1234) == sample(1234)
    assert len({sample(s) for s in (1, 2, 3)}) > 1, "different seeds should sample differently"


# --- SSE framing over raw HTTP -------------------------------------------------------


def test_chat_sse_framing(server_url):
    body = {"model": MODEL, "messages": CHAT_PROMPT, "max_tokens": 6, "stream": True, "n": 2,
            "temperature": 0.8, "seed": 3, "ignore_eos": True}  # fmt: skip
    chunks = post_stream(f"{server_url}/v1/chat/completions", body)
    check_chunks(chunks, "chat.completion.chunk")
    assert chunks[0]["choices"][0]["delta"].get("role") == "assistant"
    seen_roles = {}
    texts: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            seen_roles.setdefault(choice["index"], choice["delta"].get("role"))
            texts[choice["index"]] = texts.get(choice["index"], "") + (
                choice["delta"].get("content") or ""
            )
    assert seen_roles == {0: "assistant", 1: "assistant"}
    assert set(texts) == {0, 1}
    assert all(t.strip() for t in texts.values()), texts


def test_completions_sse_framing(server_url):
    body = {"model": MODEL, "prompt": TEXT_PROMPT, "max_tokens": 4, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    chunks = post_stream(f"{server_url}/v1/completions", body)
    check_chunks(chunks, "text_completion")
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["total_tokens"] == (
        chunks[-1]["usage"]["prompt_tokens"] + chunks[-1]["usage"]["completion_tokens"]
    )


# --- multi-byte text -----------------------------------------------------------------

MULTIBYTE_CASES = [
    ("completions", "中文:今天天气很好,我们一起去公园散步。然后"),
    ("chat", "Reply only with emoji: 😀🎉🚀🌟🍕"),
]


@pytest.mark.parametrize(("endpoint", "prompt"), MULTIBYTE_CASES)
def test_multibyte_streaming(openai_client, endpoint, prompt):
    if endpoint == "chat":
        kwargs = dict(model=MODEL, messages=[{"role": "user", "content": prompt}],
                      max_tokens=24, temperature=0)  # fmt: skip
        full = openai_client.chat.completions.create(**kwargs).choices[0].message.content
        chunks = list(openai_client.chat.completions.create(stream=True, **kwargs))
        deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    else:
        kwargs = dict(model=MODEL, prompt=prompt, max_tokens=24, temperature=0)
        full = openai_client.completions.create(**kwargs).choices[0].text
        chunks = list(openai_client.completions.create(stream=True, **kwargs))
        deltas = [c.choices[0].text for c in chunks if c.choices]
    assert any(ord(ch) > 127 for ch in full), f"the model wrote no multi-byte text: {full!r}"
    assert "\ufffd" not in full
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == full
