"""Concurrent requests on the real server: each response goes to its own client, unchanged.

Twelve different prompts (chat and completions, streamed and not, of different lengths) are
sent at the same moment at temperature 0; each answer must be the one the same request gets
when it is sent alone. A mix-up of outputs between requests batched together shows here.
"""

from __future__ import annotations

import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
import requests

MODEL = "Qwen2-7B-Instruct"
# A greedy token whose top-2 logprob gap is below this may flip between batch shapes.
NEAR_TIE = 1e-3

PROMPTS = [
    "The capital of France is",
    "Once upon a time",
    "The best way to learn programming is",
    "Water boils at",
    "My favourite food is",
    "In 1492, Columbus",
    "The tallest mountain in the world",
    "A haiku about the sea:",
    "Photosynthesis is the process",
    "The quick brown fox",
    "To make a cup of tea,",
    "The three primary colors are",
]


@dataclass(frozen=True)
class Case:
    endpoint: str  # "chat" or "completions"
    stream: bool
    prompt: str
    max_tokens: int

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self.endpoint == "chat" else "/v1/completions"

    def body(self, **extra) -> dict:
        body = {"model": MODEL, "max_tokens": self.max_tokens, "temperature": 0} | extra
        if self.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": self.prompt}]
        else:
            body["prompt"] = self.prompt
        return body


# every combination of endpoint and streaming three times, with lengths from 6 to 28 tokens
CASES = [
    Case("chat" if i % 2 == 0 else "completions", (i // 2) % 2 == 0, prompt, 6 + 2 * i)
    for i, prompt in enumerate(PROMPTS)
]


@dataclass
class Answer:
    text: str
    finish_reason: str | None
    request_id: str
    usage: dict | None = None
    tokens: list[str] | None = None  # generated token texts (baseline only)
    gaps: list[float] | None = None  # top-1 minus top-2 logprob at each token (baseline only)


def parse_full(case: Case, body: dict) -> Answer:
    choices = body["choices"]
    assert len(choices) == 1 and choices[0]["index"] == 0, body
    choice = choices[0]
    text = choice["message"]["content"] if case.endpoint == "chat" else choice["text"]
    return Answer(text, choice["finish_reason"], body["id"], usage=body["usage"])


def parse_stream(case: Case, resp: requests.Response) -> Answer:
    assert resp.headers["content-type"].startswith("text/event-stream"), resp.headers
    events = [e for e in resp.text.replace("\r\n", "\n").split("\n\n") if e.strip()]
    assert events and events[-1] == "data: [DONE]", events[-3:]
    text, finish, ids = "", [], set()
    for event in events[:-1]:
        assert event.startswith("data: "), event
        chunk = json.loads(event[len("data: ") :])
        assert "error" not in chunk, chunk
        ids.add(chunk["id"])
        for choice in chunk["choices"]:
            assert choice["index"] == 0, chunk
            if case.endpoint == "chat":
                text += choice["delta"].get("content") or ""
            else:
                text += choice["text"]
            if choice.get("finish_reason") is not None:
                finish.append(choice["finish_reason"])
    assert len(ids) == 1, f"one id per stream, got {ids}"
    assert len(finish) == 1, finish
    return Answer(text, finish[0], ids.pop())


def send(server_url: str, case: Case, stream: bool) -> Answer:
    body = case.body(stream=stream)
    resp = requests.post(server_url + case.path, json=body, timeout=600, stream=stream)
    assert resp.status_code == 200, resp.text
    return parse_stream(case, resp) if stream else parse_full(case, resp.json())


def send_alone_with_logprobs(server_url: str, case: Case) -> Answer:
    """The baseline: the request alone, not streamed, with the top-2 logprobs of each token."""
    extra = {"logprobs": True, "top_logprobs": 2} if case.endpoint == "chat" else {"logprobs": 2}
    resp = requests.post(server_url + case.path, json=case.body(**extra), timeout=600)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    answer = parse_full(case, body)
    logprobs = body["choices"][0]["logprobs"]
    if case.endpoint == "chat":
        entries = logprobs["content"]
        answer.tokens = [e["token"] for e in entries]
        tops = [sorted((t["logprob"] for t in e["top_logprobs"]), reverse=True) for e in entries]
    else:
        answer.tokens = logprobs["tokens"]
        tops = [sorted(top.values(), reverse=True) for top in logprobs["top_logprobs"]]
    answer.gaps = [top[0] - top[1] if len(top) > 1 else float("inf") for top in tops]
    return answer


def running_gauge(server_url: str) -> float:
    text = requests.get(f"{server_url}/metrics", timeout=30).text
    match = re.search(r"^xllm_num_requests_running (\S+)$", text, re.MULTILINE)
    assert match, text
    return float(match.group(1))


def check_same_as_alone(case: Case, alone: Answer, got: Answer) -> None:
    """`got` equals `alone`, or departs from it only at a near tie of the alone run."""
    if got.text == alone.text:
        assert got.finish_reason == alone.finish_reason, (case, alone, got)
        return
    prefix, k = "", 0
    while k < len(alone.tokens) and got.text.startswith(prefix + alone.tokens[k]):
        prefix += alone.tokens[k]
        k += 1
    assert k < len(alone.tokens) and alone.gaps[k] < NEAR_TIE, (
        f"{case}: concurrent answer {got.text!r} differs from the one sent alone "
        f"{alone.text!r} after {k} tokens, where the alone run had no near tie "
        f"(gaps {alone.gaps})"
    )


@pytest.fixture(scope="module")
def alone_answers(server_url) -> list[Answer]:
    answers = [send_alone_with_logprobs(server_url, case) for case in CASES]
    texts = [a.text for a in answers]
    assert all(t.strip() for t in texts), texts
    assert len(set(texts)) == len(texts), f"every prompt must have its own answer: {texts}"
    return answers


def test_concurrent_requests_get_their_own_answers(server_url, alone_answers):
    barrier = threading.Barrier(len(CASES))
    done = threading.Event()
    running_seen: list[float] = []

    def one(case: Case) -> Answer:
        barrier.wait(timeout=60)
        return send(server_url, case, case.stream)

    def watch() -> None:
        while not done.is_set():
            running_seen.append(running_gauge(server_url))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        with ThreadPoolExecutor(max_workers=len(CASES)) as pool:
            answers = list(pool.map(one, CASES))
    finally:
        done.set()
        watcher.join(timeout=30)

    # the requests did run together (else this test would check nothing)
    assert running_seen and max(running_seen) >= 4, running_seen
    assert len({a.request_id for a in answers}) == len(CASES)
    for case, alone, got in zip(CASES, alone_answers, answers, strict=True):
        check_same_as_alone(case, alone, got)
        if not case.stream:
            assert got.usage["prompt_tokens"] == alone.usage["prompt_tokens"], (case, got)
            if got.text == alone.text:
                assert got.usage == alone.usage, (case, alone, got)


def test_streamed_alone_matches_baseline(server_url, alone_answers):
    """Sent alone, the streamed and non-streamed forms of each request agree: the baseline of
    the concurrent test does not depend on the form."""
    for case, alone in zip(CASES, alone_answers, strict=True):
        got = send(server_url, case, stream=True)
        assert (got.text, got.finish_reason) == (alone.text, alone.finish_reason), case
