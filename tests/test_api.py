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


def test_chat_n2(openai_client):
    resp = openai_client.chat.completions.create(
        model=MODEL, messages=CHAT_PROMPT, max_tokens=6, temperature=1.0, seed=7, n=2
    )
    assert sorted(c.index for c in resp.choices) == [0, 1]
    assert all(c.message.content is not None for c in resp.choices)
    check_usage(resp.usage)


def test_completions_n2(openai_client):
    resp = openai_client.completions.create(
        model=MODEL,
        prompt=TEXT_PROMPT,
        max_tokens=5,
        temperature=1.0,
        seed=7,
        n=2,
        extra_body={"ignore_eos": True},
    )
    assert sorted(c.index for c in resp.choices) == [0, 1]
    assert resp.usage.completion_tokens == 10


def test_completions_n2_streaming(openai_client):
    chunks = list(
        openai_client.completions.create(
            model=MODEL,
            prompt=TEXT_PROMPT,
            max_tokens=5,
            temperature=1.0,
            seed=7,
            n=2,
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    indexes = {c.index for chunk in chunks for c in chunk.choices}
    assert indexes == {0, 1}
    finished = [c.index for chunk in chunks for c in chunk.choices if c.finish_reason]
    assert sorted(finished) == [0, 1]


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
            "temperature": 0.8, "seed": 3}  # fmt: skip
    chunks = post_stream(f"{server_url}/v1/chat/completions", body)
    check_chunks(chunks, "chat.completion.chunk")
    assert chunks[0]["choices"][0]["delta"].get("role") == "assistant"
    seen_roles = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            seen_roles.setdefault(choice["index"], choice["delta"].get("role"))
    assert seen_roles == {0: "assistant", 1: "assistant"}


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
