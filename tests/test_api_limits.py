"""No request can hurt another, through the real server: sampling values that would break a
step, prompts too large to tokenize on the event loop, `n` and the in-flight limit counted in
sequences, tiny and infinite floats, unserved fields, scoring a prompt with max_tokens 0, and
the client's X-Request-Id."""

import json
import threading
import time

import pytest
import requests

MODEL = "Qwen2-7B-Instruct"
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


def post(base_url: str, path: str, body: dict | str, **kwargs) -> requests.Response:
    data = body if isinstance(body, str) else json.dumps(body)
    return requests.post(base_url + path, data=data, timeout=300,
                         headers={"Content-Type": "application/json", **kwargs})


def chat_body(content: str = "Tell me a story.", **fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **fields}


def check_invalid(resp: requests.Response, param: str) -> dict:
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["code"] == "INVALID_ARGUMENT" and error["param"] == param, error
    return error


def stream_chunks(base_url: str, body: dict, arrivals: list[float] | None = None) -> list:
    """The events of a streamed request ('[DONE]' as a string); `arrivals` gets each
    content event's arrival time."""
    events = []
    with requests.post(base_url + CHAT, json={**body, "stream": True}, stream=True,
                       timeout=300) as resp:
        assert resp.status_code == 200, resp.text
        for line in resp.iter_lines(decode_unicode=True):
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
            if arrivals is not None:
                arrivals.append(time.monotonic())
    return events


def finish_reasons(events: list) -> list[str]:
    return [c["finish_reason"] for e in events if isinstance(e, dict)
            for c in e.get("choices", []) if c.get("finish_reason")]


# --- 1. a value that used to break the step ----------------------------------------------


def test_huge_top_k_is_the_whole_vocabulary_and_hurts_no_one(server_url):
    others: list[list] = [[] for _ in range(3)]
    body = chat_body(max_tokens=24, temperature=0, ignore_eos=True)

    def run(i: int) -> None:
        others[i] = stream_chunks(server_url, body)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    bad = post(server_url, CHAT, chat_body(max_tokens=8, temperature=1, seed=1,
                                           top_k=9223372036854775808))
    for thread in threads:
        thread.join()
    assert bad.status_code == 200, bad.text
    assert bad.json()["choices"][0]["finish_reason"] == "length"
    # top_k above the vocabulary samples exactly like no top_k at all
    whole = post(server_url, CHAT, chat_body(max_tokens=8, temperature=1, seed=1))
    assert bad.json()["choices"][0]["message"] == whole.json()["choices"][0]["message"]
    for events in others:
        assert events[-1] == "[DONE]" and not any("error" in e for e in events[:-1])
        assert finish_reasons(events) == ["length"]


# --- 2. prompts too large for the event loop ----------------------------------------------


def health_latencies(base_url: str, busy: threading.Thread) -> list[float]:
    """GET /health round trips, every 20 ms, for as long as `busy` runs."""
    latencies = []
    while busy.is_alive():
        start = time.monotonic()
        assert requests.get(base_url + "/health", timeout=30).status_code == 200
        latencies.append(time.monotonic() - start)
        time.sleep(0.02)
    return latencies


@pytest.mark.parametrize("size", ["over_characters", "over_tokens"])
def test_health_and_streams_do_not_wait_on_a_huge_prompt(server_url, size):
    # over_characters: no tokenization can make 3.9 MB fit; refused before tokenizing.
    # over_tokens: 300,000 characters pass that bound and are tokenized (off the event
    # loop), then refused for their length.
    chars = 3_900_000 if size == "over_characters" else 300_000
    words = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta")
    text = " ".join(words[i % 7] + str(i % 97) for i in range(chars // 7))[:chars]
    arrivals: list[float] = []
    streamer = threading.Thread(target=stream_chunks, args=(
        server_url, chat_body(max_tokens=60, temperature=0, ignore_eos=True), arrivals))
    streamer.start()
    while not arrivals:
        time.sleep(0.01)
    answers: list[requests.Response] = []
    for _ in range(3):
        sender = threading.Thread(target=lambda: answers.append(
            post(server_url, CHAT, chat_body(text, max_tokens=4))))
        sender.start()
        latencies = health_latencies(server_url, sender)
        sender.join()
    streamer.join()
    for resp in answers:
        error = check_invalid(resp, "messages")
        assert "maximum context length" in error["message"] and len(error["message"]) < 300
    assert latencies and max(latencies) < 0.1, f"/health took {max(latencies):.3f} s"
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    assert max(gaps) < 2.0, f"a running stream stalled {max(gaps):.1f} s"


# --- 3. n and the in-flight limit count sequences -----------------------------------------


def test_n_is_capped(server_url):
    error = check_invalid(post(server_url, CHAT, chat_body(n=129, max_tokens=1)), "n")
    assert "128" in error["message"]
    ok = post(server_url, COMPLETIONS, {"model": MODEL, "prompt": "Hi", "n": 128,
                                         "max_tokens": 1})
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 128


def test_a_request_of_many_choices_does_not_starve_a_small_one(server_url):
    # 128 choices of 48 tokens run in two waves of 64 (the server's max_num_seqs). A chat
    # sent during the first wave is admitted before the second wave's choices, so it ends
    # first; admitted after them, it would wait for a third wave.
    big = {"model": MODEL, "prompt": "Once upon a time", "n": 128, "max_tokens": 48,
           "ignore_eos": True, "temperature": 1}
    done: dict[str, float] = {}

    def run_big() -> None:
        assert post(server_url, COMPLETIONS, big).status_code == 200
        done["big"] = time.monotonic()

    thread = threading.Thread(target=run_big)
    thread.start()
    time.sleep(1.0)
    small = post(server_url, CHAT, chat_body(max_tokens=4, temperature=0, ignore_eos=True))
    done["small"] = time.monotonic()
    thread.join()
    assert small.status_code == 200
    assert done["small"] < done["big"]


@pytest.fixture(scope="module")
def narrow_server(start_inproc_server):
    """An in-process server that runs at most 3 sequences at once."""
    with start_inproc_server(max_concurrent_requests=3) as server:
        yield server


def test_limit_counts_sequences_not_requests(narrow_server):
    url = narrow_server.base_url
    four_prompts = {"model": MODEL, "prompt": ["a", "b", "c", "d"], "max_tokens": 2}
    error = check_invalid(post(url, COMPLETIONS, four_prompts), "n")
    assert "4 sequences" in error["message"]
    long_n2 = {"model": MODEL, "prompt": "Once upon a time", "n": 2, "max_tokens": 400,
               "ignore_eos": True, "stream": True}
    with requests.post(url + COMPLETIONS, json=long_n2, stream=True, timeout=300) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()  # held: a dropped line iterator closes the connection
        assert next(lines).startswith(b"data: ")  # admitted: 2 of 3 sequences in flight
        two = post(url, COMPLETIONS, {"model": MODEL, "prompt": ["a", "b"], "max_tokens": 2})
        assert two.status_code == 429 and two.json()["error"]["code"] == "RESOURCE_EXHAUSTED"
        assert int(two.headers["Retry-After"]) >= 1
        one = post(url, COMPLETIONS, {"model": MODEL, "prompt": "a", "max_tokens": 2})
        assert one.status_code == 200, one.text


# --- 6. tiny and infinite floats -----------------------------------------------------------


def test_tiny_temperature_is_greedy(server_url):
    greedy = post(server_url, CHAT, chat_body(max_tokens=12, temperature=0)).json()
    tiny = post(server_url, CHAT, chat_body(max_tokens=12, temperature=1e-300)).json()
    assert tiny["choices"][0]["message"]["content"]
    assert tiny["choices"][0]["message"] == greedy["choices"][0]["message"]


@pytest.mark.parametrize(("field", "value"), [
    ("temperature", "Infinity"), ("temperature", "1e308"), ("temperature", "2.5"),
    ("temperature", "NaN"), ("top_p", "Infinity"), ("top_p", "NaN"), ("min_p", "NaN"),
    ("presence_penalty", "-Infinity"), ("frequency_penalty", "NaN"),
    ("repetition_penalty", "Infinity"), ("repetition_penalty", "1e308"),
])  # fmt: skip
def test_non_finite_and_out_of_range_floats_are_invalid(server_url, field, value):
    body = json.dumps(chat_body(max_tokens=2))[:-1] + f', "{field}": {value}}}'
    resp = post(server_url, CHAT, body)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["code"] == "INVALID_ARGUMENT"


def test_non_finite_length_penalty_is_invalid(server_url):
    body = json.dumps(chat_body(max_tokens=2))[:-1] + ', "length_penalty": NaN}'
    check_invalid(post(server_url, CHAT, body), "length_penalty")


@pytest.mark.parametrize("value", ["Infinity", "NaN", "1e308"])
def test_non_finite_logit_bias_is_invalid(server_url, value):
    body = json.dumps(chat_body(max_tokens=2))[:-1] + f', "logit_bias": {{"42": {value}}}}}'
    check_invalid(post(server_url, CHAT, body), "logit_bias")


# --- 7. smaller ones -----------------------------------------------------------------------


@pytest.mark.parametrize(("field", "value"), [
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
    ("functions", [{"name": "f", "parameters": {}}]),
    ("tool_choice", "required"),
    ("function_call", "auto"),
    ("response_format", {"type": "json_object"}),
])  # fmt: skip
def test_unserved_fields_are_refused_by_name(server_url, field, value):
    error = check_invalid(post(server_url, CHAT, chat_body(max_tokens=2, **{field: value})),
                          field)
    assert field in error["message"]


def test_unserved_fields_that_ask_nothing_are_accepted(server_url):
    body = chat_body(max_tokens=2, tools=[], tool_choice="none",
                     response_format={"type": "text"})
    assert post(server_url, CHAT, body).status_code == 200


def test_a_huge_logit_bias_key_is_not_echoed(server_url):
    key = "9" * 5000
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 2, "logit_bias": {key: 1}}
    error = check_invalid(post(server_url, COMPLETIONS, body), "logit_bias")
    assert len(error["message"]) < 200 and key[:100] not in error["message"]
    huge_id = {"model": MODEL, "prompt": [int("7" * 4000)], "max_tokens": 2}
    error = check_invalid(post(server_url, COMPLETIONS, huge_id), "prompt")
    assert len(error["message"]) < 200


def test_echo_with_max_tokens_zero_scores_the_prompt(server_url):
    prompt = "The quick brown fox jumps over the lazy dog"
    base = {"model": MODEL, "prompt": prompt, "echo": True, "logprobs": 2, "temperature": 0}
    scored = post(server_url, COMPLETIONS, {**base, "max_tokens": 0})
    assert scored.status_code == 200, scored.text
    choice, usage = scored.json()["choices"][0], scored.json()["usage"]
    assert choice["text"] == prompt and choice["finish_reason"] == "length"
    assert usage["completion_tokens"] == 0 and usage["prompt_tokens"] > 5
    # the same prompt logprobs as a request that also generates a token
    one = post(server_url, COMPLETIONS, {**base, "max_tokens": 1}).json()["choices"][0]
    lp, lp1 = choice["logprobs"], one["logprobs"]
    assert len(lp["tokens"]) == usage["prompt_tokens"] == len(lp1["tokens"]) - 1
    assert lp["token_logprobs"][0] is None
    assert lp["token_logprobs"][1:] == pytest.approx(lp1["token_logprobs"][1:-1], abs=1e-5)
    plain = post(server_url, COMPLETIONS, {"model": MODEL, "prompt": prompt, "echo": True,
                                           "max_tokens": 0})
    assert plain.status_code == 200 and plain.json()["choices"][0]["text"] == prompt
    check_invalid(post(server_url, COMPLETIONS, {"model": MODEL, "prompt": prompt,
                                                 "max_tokens": 0}), "max_tokens")


def test_client_request_id_names_the_request(server_url):
    rid = "trace-4f2a:client.42"
    answers: list[requests.Response] = []
    threads = [threading.Thread(target=lambda: answers.append(
        post(server_url, CHAT, chat_body(max_tokens=4), **{"X-Request-Id": rid})))
        for _ in range(2)]  # the same id twice at once: both are served
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for resp in answers:
        assert resp.status_code == 200, resp.text
        assert resp.headers["X-Request-Id"] == rid and resp.json()["id"] == rid
    bad = post(server_url, CHAT, chat_body(max_tokens=-1), **{"X-Request-Id": rid})
    assert bad.status_code == 400 and bad.headers["X-Request-Id"] == rid
    made = post(server_url, CHAT, chat_body(max_tokens=2))
    assert made.headers["X-Request-Id"] == made.json()["id"]
    assert made.json()["id"].startswith("chatcmpl-")
