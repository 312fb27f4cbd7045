"""Soak test of an OpenAI-compatible server: a seeded mix of good, disconnecting and bad
requests, with every response checked, and leak checks (RSS, KV blocks) at the end.

Good requests mix chat and completions, streamed and not, n of 1 to 4, stop strings,
logprobs, several prompts in one completions request and short max_tokens. A share of
clients close their connection at a chosen point (before the response, or mid-stream
after k chunks); a share send bad requests (malformed JSON, wrong types, values out of
range, an unknown model, a prompt too long for the context), each of which must get a
4xx with an OpenAI error body. The mix is a function of --seed; the timing is not.

Leak checks: --warmup good requests go first, then the server's VmRSS is read ("before"),
since the first requests allocate caches and batch buffers: the growth from there to after
the run measures leaks, not warm-up. After the run it waits for /metrics to show 0 running
and 0 waiting and reads xllm_kv_cache_usage_ratio, which must be 0. That ratio counts the
blocks some sequence holds: blocks kept only by the prefix cache (no holder) sit in the
block manager's free queue and count as free, so 0 means every block is free.

Exit code 1 when anything failed: a malformed response, a request without an end, a bad
request not rejected with a 4xx error body, a good request answered with a status other
than 200 or 429, a stream that ended with an error event, a KV block still held once the
server is idle, or server RSS growth above --max-rss-growth. Run it as
`python benchmarks/soak.py ...` (it imports serve_bench from its own folder).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import httpx
from serve_bench import WORDS, summarize_ms

# Short, varied prompts: plain questions, code, JSON, lists, accents, CJK, emoji, multi-line.
PROMPTS = (
    "Hello! How are you today?",
    "Write a haiku about the sea.",
    "What is the capital of France?",
    "List three prime numbers.",
    "Translate 'good morning' into Spanish.",
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    "Once upon a time, in a small village by the mountains,",
    "Explain photosynthesis in one sentence.",
    "The quick brown fox jumps over the lazy dog.",
    "1, 2, 3, 4, 5,",
    "Résumé: naïve café, déjà vu. Ünïcödé test ✓",
    "请用一句话介绍你自己。",
    "Emoji test: 🙂🚀🌍 What do these mean?",
    '{"name": "Alice", "age": 30, "city": ',
    "Q: Why is the sky blue?\nA:",
    "Summarize: the meeting moved from Monday to Wednesday because the room was booked.",
)
SYSTEM_PROMPT = "You are a helpful assistant. Answer briefly and plainly."
STOP_STRINGS = (".", "\n", ",", " the", "!", "?", " and")
FINISH_REASONS = ("stop", "length")
# HTTP status -> the error `code` API.md section 5 gives it.
STATUS_CODES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    404: "UNKNOWN",
    413: "INVALID_ARGUMENT",
    415: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}
BAD_KINDS = (
    "malformed_json",
    "wrong_type_max_tokens",
    "wrong_type_prompt",
    "wrong_type_stream",
    "temperature_negative",
    "top_p_too_large",
    "n_zero",
    "max_tokens_negative",
    "unknown_model",
    "logit_bias_out_of_range",
    "logprobs_out_of_range",
    "missing_prompt",
    "prompt_too_long",
    "max_tokens_over_context",
)
MAX_REASONS = 10  # problems listed per category in the report


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# --------------------------------------------------------------------------- the plan


@dataclass
class Plan:
    """One request to send, fixed in advance by the seed."""

    index: int
    category: str  # "good", "disconnect" or "bad"
    endpoint: str  # "chat" or "completions"
    stream: bool
    payload: dict | None = None
    raw_body: bytes | None = None  # sent as-is instead of `payload` (malformed JSON)
    num_choices: int = 1  # prompts * n
    max_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # chat top_logprobs / completions logprobs; None: not asked
    include_usage: bool = False
    ignore_eos: bool = False
    multi_prompt: bool = False
    disconnect: str = ""  # "before" (close before the response) or "mid" (after k chunks)
    disconnect_delay: float = 0.0  # "before": seconds to wait for the response, at most
    disconnect_after: int = 0  # "mid": chunks to read
    bad_kind: str = ""
    expect_status: int = 200

    @property
    def label(self) -> str:
        return f"#{self.index} {self.category} {self.endpoint}{' stream' if self.stream else ''}"


def make_messages(rng: random.Random, prompt: str) -> list[dict]:
    messages = []
    if rng.random() < 0.5:
        messages.append({"role": "system", "content": SYSTEM_PROMPT})
    if rng.random() < 0.2:
        messages.append({"role": "user", "content": rng.choice(PROMPTS)})
        messages.append({"role": "assistant", "content": "Sure."})
    messages.append({"role": "user", "content": prompt})
    return messages


def make_good(rng: random.Random, index: int, model: str, category: str = "good") -> Plan:
    endpoint = "chat" if rng.random() < 0.5 else "completions"
    plan = Plan(index, category, endpoint, stream=rng.random() < 0.5)
    n = rng.randint(2, 4) if rng.random() < 0.3 else 1
    plan.max_tokens = rng.randint(4, 64)
    payload: dict = {"model": model, "max_tokens": plan.max_tokens, "n": n}
    payload["temperature"] = rng.choice((0.0, 0.7, 1.0))
    if rng.random() < 0.3:
        payload["top_p"] = 0.9
    if rng.random() < 0.3:
        payload["seed"] = rng.randint(0, 2**31)
    if rng.random() < 0.3:
        plan.stop = rng.sample(STOP_STRINGS, rng.randint(1, 2))
        payload["stop"] = plan.stop[0] if len(plan.stop) == 1 and rng.random() < 0.5 \
            else list(plan.stop)
    if rng.random() < 0.2:
        plan.ignore_eos = True
        payload["ignore_eos"] = True
    if rng.random() < 0.3:
        plan.logprobs = rng.randint(0, 5)
        if endpoint == "chat":
            payload["logprobs"] = True
            payload["top_logprobs"] = plan.logprobs
        else:
            payload["logprobs"] = plan.logprobs
    if endpoint == "chat":
        payload["messages"] = make_messages(rng, rng.choice(PROMPTS))
        plan.num_choices = n
    elif rng.random() < 0.15:
        plan.multi_prompt = True
        payload["prompt"] = rng.sample(PROMPTS, 2)
        plan.num_choices = 2 * n
    else:
        payload["prompt"] = rng.choice(PROMPTS)
        plan.num_choices = n
    if plan.stream:
        payload["stream"] = True
        if rng.random() < 0.5:
            plan.include_usage = True
            payload["stream_options"] = {"include_usage": True}
    plan.payload = payload
    return plan


def make_disconnect(rng: random.Random, index: int, model: str) -> Plan:
    plan = make_good(rng, index, model, "disconnect")
    if plan.stream and rng.random() < 0.7:
        plan.disconnect = "mid"
        plan.disconnect_after = rng.randint(1, 8)
    else:
        plan.disconnect = "before"
        plan.disconnect_delay = rng.uniform(0.0, 0.3) if plan.stream else rng.uniform(0.02, 1.5)
    return plan


def make_bad(rng: random.Random, index: int, model: str, max_model_len: int) -> Plan:
    kind = rng.choice(BAD_KINDS)
    endpoint = "chat" if rng.random() < 0.5 else "completions"
    plan = Plan(index, "bad", endpoint, stream=rng.random() < 0.3, bad_kind=kind,
                expect_status=404 if kind == "unknown_model" else 400)
    prompt = rng.choice(PROMPTS)
    payload: dict = {"model": model, "max_tokens": 8}
    if endpoint == "chat":
        payload["messages"] = [{"role": "user", "content": prompt}]
    else:
        payload["prompt"] = prompt
    if plan.stream:
        payload["stream"] = True
    text_field = "messages" if endpoint == "chat" else "prompt"
    if kind == "malformed_json":
        body = json.dumps(payload)
        plan.raw_body = body[: rng.randint(1, len(body) - 1)].encode()
    elif kind == "wrong_type_max_tokens":
        payload["max_tokens"] = "8"
    elif kind == "wrong_type_prompt":
        payload[text_field] = "hello" if endpoint == "chat" else {"text": prompt}
    elif kind == "wrong_type_stream":
        payload["stream"] = "yes"
    elif kind == "temperature_negative":
        payload["temperature"] = -1
    elif kind == "top_p_too_large":
        payload["top_p"] = 2
    elif kind == "n_zero":
        payload["n"] = 0
    elif kind == "max_tokens_negative":
        payload["max_tokens"] = -1  # 0 is valid: it scores the prompt
    elif kind == "unknown_model":
        payload["model"] = "no-such-model-" + str(rng.randint(0, 999))
    elif kind == "logit_bias_out_of_range":
        payload["logit_bias"] = {str(rng.randint(0, 1000)): rng.choice((-500, 101, 1e6))}
    elif kind == "logprobs_out_of_range":
        if endpoint == "chat":
            payload["logprobs"] = True
            payload["top_logprobs"] = rng.choice((21, 50, -1))
        else:
            payload["logprobs"] = rng.choice((21, 50, -1))
    elif kind == "missing_prompt":
        del payload[text_field]
    elif kind == "prompt_too_long":
        # about one token a word (serve_bench.WORDS), so half as much again as the context
        long_text = " ".join(rng.choice(WORDS) for _ in range(max_model_len * 3 // 2))
        if endpoint == "chat":
            payload["messages"] = [{"role": "user", "content": long_text}]
        else:
            payload["prompt"] = long_text
    elif kind == "max_tokens_over_context":
        payload["max_tokens"] = max_model_len + rng.randint(1, 100)
    plan.payload = None if plan.raw_body is not None else payload
    return plan


def make_plans(args: argparse.Namespace, model: str, max_model_len: int) -> list[Plan]:
    """The measured requests: exact shares of bad and disconnecting ones, in seeded order."""
    rng = random.Random(args.seed)
    num_bad = round(args.num_requests * args.bad_share)
    num_disc = round(args.num_requests * args.disconnect_share)
    categories = ["bad"] * num_bad + ["disconnect"] * num_disc
    categories += ["good"] * (args.num_requests - len(categories))
    rng.shuffle(categories)
    plans = []
    for i, category in enumerate(categories):
        if category == "bad":
            plans.append(make_bad(rng, i, model, max_model_len))
        elif category == "disconnect":
            plans.append(make_disconnect(rng, i, model))
        else:
            plans.append(make_good(rng, i, model))
    return plans


def make_warmup(args: argparse.Namespace, model: str) -> list[Plan]:
    rng = random.Random(f"warmup-{args.seed}")
    return [make_good(rng, -1 - i, model, "warmup") for i in range(args.warmup)]


# --------------------------------------------------------------------------- the checks


class Malformed(Exception):
    """A response that breaks the API's shape; the message says how."""


def expect(ok: bool, message: str) -> None:
    if not ok:
        raise Malformed(message)


def check_error_body(body, status: int) -> None:
    """`body` must be {"error": {"message", "type", "code", "param"}} with `status`'s code."""
    expect(isinstance(body, dict) and isinstance(body.get("error"), dict),
           f"HTTP {status}: body is not {{\"error\": {{...}}}}")
    err = body["error"]
    for key in ("message", "type", "code", "param"):
        expect(key in err, f"HTTP {status}: error body lacks {key!r}")
    expect(isinstance(err["message"], str) and err["message"] != "",
           f"HTTP {status}: error.message is not a non-empty string")
    expect(isinstance(err["type"], str), f"HTTP {status}: error.type is not a string")
    expect(err["param"] is None or isinstance(err["param"], str),
           f"HTTP {status}: error.param is not a string or null")
    want = STATUS_CODES.get(status)
    expect(want is None or err["code"] == want,
           f"HTTP {status}: error.code is {err['code']!r}, expected {want!r}")


def check_usage(usage, plan: Plan, finish: dict[int, str]) -> int:
    """Checks `usage` against the plan and the choices' finish reasons; the completion
    tokens."""
    expect(isinstance(usage, dict), "usage is not an object")
    counts = [usage.get(k) for k in ("prompt_tokens", "completion_tokens", "total_tokens")]
    expect(all(is_int(c) and c >= 0 for c in counts),
           f"usage counts are not non-negative integers: {usage}")
    prompt, completion, total = counts
    expect(total == prompt + completion, f"usage total_tokens != prompt + completion: {usage}")
    expect(prompt > 0, f"usage prompt_tokens is 0: {usage}")
    lengths = sum(1 for r in finish.values() if r == "length")
    low = lengths * plan.max_tokens + (plan.num_choices - lengths)
    high = plan.num_choices * plan.max_tokens
    expect(low <= completion <= high, f"usage completion_tokens {completion} outside "
           f"[{low}, {high}] ({plan.num_choices} choices, {lengths} of them at max_tokens "
           f"{plan.max_tokens})")
    return completion


def check_chat_logprobs(lp, k: int) -> int:
    """A chat choice's (or chunk's) logprobs; the number of token entries."""
    expect(isinstance(lp, dict) and isinstance(lp.get("content"), list),
           "logprobs is not {\"content\": [...]}")
    for entry in lp["content"]:
        expect(isinstance(entry, dict), "logprobs.content entry is not an object")
        expect(isinstance(entry.get("token"), str), "logprobs entry token is not a string")
        expect(is_number(entry.get("logprob")) and entry["logprob"] <= 1e-4,
               f"logprobs entry logprob is not a number <= 0: {entry.get('logprob')!r}")
        raw = entry.get("bytes")
        expect(raw is None or (isinstance(raw, list) and all(is_int(b) and 0 <= b < 256
                                                             for b in raw)),
               "logprobs entry bytes is not a list of bytes")
        top = entry.get("top_logprobs")
        expect(isinstance(top, list), "logprobs entry top_logprobs is not a list")
        expect(len(top) == k, f"top_logprobs has {len(top)} entries, asked for {k}")
        for alt in top:
            expect(isinstance(alt, dict) and isinstance(alt.get("token"), str)
                   and is_number(alt.get("logprob")), f"malformed top_logprobs entry {alt!r}")
    return len(lp["content"])


def check_completion_logprobs(lp, k: int) -> int:
    """A completions choice's (or chunk's) logprobs; the number of token entries."""
    expect(isinstance(lp, dict), "logprobs is not an object")
    names = ("tokens", "token_logprobs", "top_logprobs", "text_offset")
    lists = [lp.get(name) for name in names]
    expect(all(isinstance(x, list) for x in lists), f"logprobs lacks one of {names}")
    expect(len({len(x) for x in lists}) == 1, "logprobs lists differ in length")
    tokens, values, tops, offsets = lists
    expect(all(isinstance(t, str) for t in tokens), "logprobs.tokens are not strings")
    expect(all(is_number(v) and v <= 1e-4 for v in values),
           "logprobs.token_logprobs are not numbers <= 0")
    expect(all(is_int(o) for o in offsets), "logprobs.text_offset are not integers")
    expect(all(b >= a for a, b in zip(offsets, offsets[1:])), "text_offset decreases")
    for top in tops:
        expect(isinstance(top, dict) and all(is_number(v) for v in top.values()),
               f"malformed top_logprobs entry {top!r}")
        expect(len(top) <= k and (k == 0 or len(top) >= 1),
               f"top_logprobs entry has {len(top)} alternatives, asked for {k}")
    return len(tokens)


def check_texts(plan: Plan, texts: dict[int, str]) -> None:
    for index, text in texts.items():
        for stop in plan.stop:
            expect(stop not in text, f"choice {index} text contains stop string {stop!r}: "
                   f"{text[:80]!r}")


def check_token_counts(plan: Plan, finish: dict[int, str], counts: dict[int, int]) -> None:
    """With logprobs, each choice's token entries against max_tokens and its finish."""
    if plan.logprobs is None:
        return
    for index in range(plan.num_choices):
        got = counts.get(index, 0)
        if finish.get(index) == "length":
            expect(got == plan.max_tokens, f"choice {index} finished by length after "
                   f"{got} logprob entries, max_tokens {plan.max_tokens}")
        else:
            expect(got <= plan.max_tokens, f"choice {index} has {got} logprob entries, "
                   f"max_tokens {plan.max_tokens}")


def check_response(plan: Plan, body) -> int:
    """A non-streamed 200 body; the completion tokens."""
    chat = plan.endpoint == "chat"
    expect(isinstance(body, dict), "body is not an object")
    expect(isinstance(body.get("id"), str) and body["id"], "id is not a non-empty string")
    want = "chat.completion" if chat else "text_completion"
    expect(body.get("object") == want, f"object is {body.get('object')!r}, expected {want!r}")
    expect(is_int(body.get("created")), "created is not an integer")
    expect(isinstance(body.get("model"), str), "model is not a string")
    choices = body.get("choices")
    expect(isinstance(choices, list), "choices is not a list")
    expect(len(choices) == plan.num_choices,
           f"{len(choices)} choices, expected {plan.num_choices}")
    finish: dict[int, str] = {}
    texts: dict[int, str] = {}
    counts: dict[int, int] = {}
    for choice in choices:
        expect(isinstance(choice, dict), "choice is not an object")
        index = choice.get("index")
        expect(is_int(index) and 0 <= index < plan.num_choices and index not in finish,
               f"bad or repeated choice index {index!r}")
        reason = choice.get("finish_reason")
        expect(reason in FINISH_REASONS, f"choice {index} finish_reason is {reason!r}")
        finish[index] = reason
        if chat:
            message = choice.get("message")
            expect(isinstance(message, dict) and message.get("role") == "assistant"
                   and isinstance(message.get("content"), str),
                   f"choice {index} message is not an assistant message with text")
            texts[index] = message["content"]
        else:
            expect(isinstance(choice.get("text"), str), f"choice {index} text is not a string")
            texts[index] = choice["text"]
        lp = choice.get("logprobs")
        if plan.logprobs is None:
            expect(lp is None, f"choice {index} has logprobs nobody asked for")
        elif chat:
            counts[index] = check_chat_logprobs(lp, plan.logprobs)
        else:
            counts[index] = check_completion_logprobs(lp, plan.logprobs)
    check_texts(plan, texts)
    check_token_counts(plan, finish, counts)
    return check_usage(body.get("usage"), plan, finish)


class StreamCheck:
    """Checks an SSE stream line by line; `problem` holds the first fault found."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.chat = plan.endpoint == "chat"
        self.object = "chat.completion.chunk" if self.chat else "text_completion"
        self.chunks = 0  # JSON events that carried choices
        self.done = False
        self.error: dict | None = None
        self.head: tuple | None = None
        self.finish: dict[int, str] = {}
        self.texts: dict[int, list[str]] = defaultdict(list)
        self.counts: dict[int, int] = defaultdict(int)
        self.seen: set[int] = set()
        self.usage: dict | None = None
        self.completion_tokens = 0

    def feed(self, line: str) -> None:
        line = line.rstrip("\r")
        if not line or line.startswith(":"):
            return
        expect(line.startswith("data:"), f"SSE line is not data: {line[:60]!r}")
        data = line[len("data:"):].strip()
        expect(not self.done, "event after data: [DONE]")
        if data == "[DONE]":
            self.done = True
            return
        expect(self.error is None, "event after the error event")
        try:
            obj = json.loads(data)
        except ValueError:
            raise Malformed(f"unparsable chunk: {data[:60]!r}") from None
        expect(isinstance(obj, dict), "chunk is not an object")
        if "error" in obj:
            check_error_body(obj, 500)
            self.error = obj["error"]
            return
        self.chunk(obj)

    def chunk(self, obj: dict) -> None:
        head = (obj.get("id"), obj.get("object"), obj.get("created"), obj.get("model"))
        expect(isinstance(head[0], str) and head[0], "chunk id is not a non-empty string")
        expect(head[1] == self.object, f"chunk object is {head[1]!r}, expected {self.object!r}")
        expect(is_int(head[2]) and isinstance(head[3], str), "chunk created/model malformed")
        expect(self.head is None or head == self.head,
               "chunks differ in id, object, created or model")
        self.head = head
        expect(self.usage is None, "chunk after the usage chunk")
        choices = obj.get("choices")
        expect(isinstance(choices, list), "chunk choices is not a list")
        usage = obj.get("usage")
        if not choices:
            expect(self.plan.include_usage and usage is not None,
                   "chunk with no choices and no usage")
            expect(len(self.finish) == self.plan.num_choices,
                   "usage chunk before every choice finished")
            self.completion_tokens = check_usage(usage, self.plan, self.finish)
            self.usage = usage
            return
        if self.plan.include_usage:
            expect("usage" in obj and usage is None, "choice chunk without \"usage\": null")
        else:
            expect(usage is None, "usage in a chunk without stream_options.include_usage")
        self.chunks += 1
        for choice in choices:
            self.choice(choice)

    def choice(self, choice) -> None:
        plan = self.plan
        expect(isinstance(choice, dict), "chunk choice is not an object")
        index = choice.get("index")
        expect(is_int(index) and 0 <= index < plan.num_choices,
               f"chunk choice index {index!r} out of range")
        expect(index not in self.finish, f"chunk for choice {index} after its finish_reason")
        first = index not in self.seen
        self.seen.add(index)
        if self.chat:
            delta = choice.get("delta")
            expect(isinstance(delta, dict), f"choice {index} delta is not an object")
            expect(delta.get("role", "assistant") == "assistant",
                   f"choice {index} delta role is {delta.get('role')!r}")
            expect(not first or delta.get("role") == "assistant",
                   f"first chunk of choice {index} has no role")
            content = delta.get("content")
            expect(content is None or isinstance(content, str),
                   f"choice {index} delta content is not a string")
            self.texts[index].append(content or "")
        else:
            expect(isinstance(choice.get("text"), str), f"choice {index} text is not a string")
            self.texts[index].append(choice["text"])
        lp = choice.get("logprobs")
        if plan.logprobs is None:
            expect(lp is None, f"choice {index} has logprobs nobody asked for")
        elif lp is not None:
            check = check_chat_logprobs if self.chat else check_completion_logprobs
            self.counts[index] += check(lp, plan.logprobs)
        reason = choice.get("finish_reason")
        expect(reason is None or reason in FINISH_REASONS,
               f"choice {index} finish_reason is {reason!r}")
        if reason is not None:
            self.finish[index] = reason

    def end(self) -> None:
        """The checks once the stream is over (not for an error or a disconnect)."""
        expect(self.done, "stream ended without data: [DONE]")
        if self.error is not None:
            return
        missing = [i for i in range(self.plan.num_choices) if i not in self.finish]
        expect(not missing, f"choices {missing} got no finish_reason")
        expect(not self.plan.include_usage or self.usage is not None,
               "no usage chunk with stream_options.include_usage")
        check_texts(self.plan, {i: "".join(parts) for i, parts in self.texts.items()})
        check_token_counts(self.plan, self.finish, self.counts)


# --------------------------------------------------------------------------- sending


@dataclass
class Outcome:
    """What happened to one request. `result` is one of: ok, rejected (a bad request
    answered as it should be), status (a non-2xx for a good request), stream_error,
    disconnected, malformed, no_end, bad_accepted (a bad request not rejected properly)."""

    index: int
    category: str
    result: str
    status: int | None = None
    reason: str = ""
    disconnect_done: str = ""  # "before" or "mid" when this client did close early
    latency: float = 0.0
    completion_tokens: int = 0


class Runner:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        # Idle connections are dropped after 2 s, well before the server's keep-alive timeout
        # (uvicorn's is 5 s): otherwise a request sent on a connection the server is closing
        # at that moment gets no answer, a race of the client, not a fault of the server.
        limits = httpx.Limits(max_connections=args.concurrency + 8,
                              max_keepalive_connections=args.concurrency + 8,
                              keepalive_expiry=2.0)
        self.timeout = httpx.Timeout(args.timeout)
        self.client = httpx.AsyncClient(base_url=args.base_url, timeout=self.timeout,
                                        limits=limits, headers=self.headers)

    @staticmethod
    def path(plan: Plan) -> str:
        return "/v1/chat/completions" if plan.endpoint == "chat" else "/v1/completions"

    def request(self, client: httpx.AsyncClient, plan: Plan) -> httpx.Request:
        if plan.raw_body is not None:
            return client.build_request("POST", self.path(plan), content=plan.raw_body,
                                        headers={"Content-Type": "application/json"})
        return client.build_request("POST", self.path(plan), json=plan.payload)

    async def run(self, plan: Plan) -> Outcome:
        """Send one request and judge its answer; never raises."""
        start = time.perf_counter()
        try:
            outcome = await asyncio.wait_for(self._run(plan), self.args.timeout)
        except asyncio.TimeoutError:
            outcome = Outcome(plan.index, plan.category, "no_end",
                              reason=f"{plan.label}: no answer within {self.args.timeout} s")
        except httpx.HTTPError as exc:
            outcome = Outcome(plan.index, plan.category, "no_end",
                              reason=f"{plan.label}: {type(exc).__name__} after "
                              f"{time.perf_counter() - start:.2f} s: {exc}")
        except Malformed as exc:
            outcome = Outcome(plan.index, plan.category, "malformed",
                              reason=f"{plan.label}: {exc}")
        outcome.latency = time.perf_counter() - start
        return outcome

    async def _run(self, plan: Plan) -> Outcome:
        if plan.category == "bad":
            return await self._bad(plan)
        if plan.disconnect:
            # A client of its own, closed at the end: closing it closes the connection.
            async with httpx.AsyncClient(base_url=self.args.base_url, timeout=self.timeout,
                                         headers=self.headers) as client:
                return await self._good(client, plan)
        return await self._good(self.client, plan)

    async def _bad(self, plan: Plan) -> Outcome:
        resp = await self.client.send(self.request(self.client, plan))
        status = resp.status_code
        out = Outcome(plan.index, plan.category, "rejected", status=status)
        problem = ""
        if not 400 <= status < 500:
            problem = f"HTTP {status} for a bad request"
        elif status != plan.expect_status:
            problem = f"HTTP {status}, expected {plan.expect_status}"
        else:
            try:
                check_error_body(resp.json(), status)
            except ValueError:
                problem = f"HTTP {status} with a body that is not JSON: {resp.text[:80]!r}"
            except Malformed as exc:
                problem = str(exc)
        if problem:
            out.result = "bad_accepted"
            out.reason = f"{plan.label} {plan.bad_kind}: {problem}"
        return out

    async def _status(self, plan: Plan, resp: httpx.Response) -> Outcome:
        """A non-200 answer to a good request: counted by status; the body must still be an
        error body."""
        await resp.aread()
        status = resp.status_code
        try:
            check_error_body(resp.json(), status)
        except ValueError:
            raise Malformed(f"HTTP {status} with a body that is not JSON: "
                            f"{resp.text[:80]!r}") from None
        return Outcome(plan.index, plan.category, "status", status=status,
                       reason=f"{plan.label}: HTTP {status}: {resp.text[:160]}")

    async def _good(self, client: httpx.AsyncClient, plan: Plan) -> Outcome:
        send = client.send(self.request(client, plan), stream=True)
        if plan.disconnect == "before":
            try:
                resp = await asyncio.wait_for(send, plan.disconnect_delay)
            except asyncio.TimeoutError:  # cancelling the send drops the connection
                return Outcome(plan.index, plan.category, "disconnected",
                               disconnect_done="before")
            if plan.stream:  # the headers came first: leave before reading any chunk
                await resp.aclose()
                return Outcome(plan.index, plan.category, "disconnected", status=200,
                               disconnect_done="before")
        else:
            resp = await send
        try:
            if resp.status_code != 200:
                return await self._status(plan, resp)
            if plan.stream:
                return await self._stream(plan, resp)
            await resp.aread()
            try:
                body = resp.json()
            except ValueError:
                raise Malformed(f"body is not JSON: {resp.text[:80]!r}") from None
            tokens = check_response(plan, body)
            return Outcome(plan.index, plan.category, "ok", status=200,
                           completion_tokens=tokens)
        finally:
            await resp.aclose()

    async def _stream(self, plan: Plan, resp: httpx.Response) -> Outcome:
        ctype = resp.headers.get("content-type", "")
        expect(ctype.startswith("text/event-stream"), f"stream content-type is {ctype!r}")
        check = StreamCheck(plan)
        async for line in resp.aiter_lines():
            check.feed(line)
            if plan.disconnect == "mid" and check.chunks >= plan.disconnect_after \
                    and not check.done:
                return Outcome(plan.index, plan.category, "disconnected", status=200,
                               disconnect_done="mid")
        check.end()
        if check.error is not None:
            return Outcome(plan.index, plan.category, "stream_error", status=200,
                           reason=f"{plan.label}: error event {json.dumps(check.error)[:160]}")
        return Outcome(plan.index, plan.category, "ok", status=200,
                       completion_tokens=check.completion_tokens)

    async def run_all(self, plans: list[Plan]) -> list[Outcome]:
        semaphore = asyncio.Semaphore(self.args.concurrency)

        async def limited(plan: Plan) -> Outcome:
            async with semaphore:
                return await self.run(plan)

        return list(await asyncio.gather(*(limited(p) for p in plans)))

    # ----------------------------------------------------------------------- server state

    async def metrics(self) -> dict[str, float]:
        """The unlabelled samples of /metrics."""
        resp = await self.client.get("/metrics")
        resp.raise_for_status()
        values = {}
        for line in resp.text.splitlines():
            parts = line.split()
            if len(parts) == 2 and not line.startswith("#") and "{" not in parts[0]:
                try:
                    values[parts[0]] = float(parts[1])
                except ValueError:
                    pass
        return values

    async def wait_idle(self, timeout: float) -> dict:
        """Poll /metrics until nothing runs or waits (up to `timeout` s), then give KV blocks
        a few seconds to reach zero use; the last readings."""
        deadline = time.monotonic() + timeout
        state = {"idle": False, "running": None, "waiting": None, "kv_usage": None,
                 "waited_s": 0.0}
        start = time.monotonic()
        grace_end = None
        while True:
            try:
                m = await self.metrics()
            except httpx.HTTPError as exc:
                state["error"] = f"{type(exc).__name__}: {exc}"
                m = {}
            state["running"] = m.get("xllm_num_requests_running")
            state["waiting"] = m.get("xllm_num_requests_waiting")
            state["kv_usage"] = m.get("xllm_kv_cache_usage_ratio")
            state["idle"] = state["running"] == 0 and state["waiting"] == 0
            now = time.monotonic()
            if state["idle"]:
                grace_end = grace_end or now + 5.0
                if state["kv_usage"] == 0 or now >= grace_end:
                    break
            if now >= deadline:
                break
            await asyncio.sleep(0.25)
        state["waited_s"] = time.monotonic() - start
        return state


def read_rss_kb(pid: int | None) -> int | None:
    """The VmRSS of process `pid` in kB, or None."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


async def sample_rss(pid: int | None, peak: list[int], stop: asyncio.Event) -> None:
    while not stop.is_set():
        rss = read_rss_kb(pid)
        if rss is not None:
            peak[0] = max(peak[0], rss)
        try:
            await asyncio.wait_for(stop.wait(), 0.5)
        except asyncio.TimeoutError:
            pass


async def server_info(runner: Runner, args: argparse.Namespace) -> tuple[str, int]:
    resp = await runner.client.get("/v1/models")
    resp.raise_for_status()
    first = resp.json()["data"][0]
    return args.model or first["id"], int(first.get("max_model_len") or args.max_model_len)


# --------------------------------------------------------------------------- report


FAILURES = ("malformed", "no_end", "bad_accepted", "unexpected_status", "stream_error")


def summarize(args, plans: list[Plan], warm: list[Outcome], outcomes: list[Outcome],
              wall: float, rss: dict, kv: dict) -> dict:
    by_index = {p.index: p for p in plans}
    kinds: Counter = Counter()
    for p in plans:
        kinds[f"category: {p.category}"] += 1
        if p.category == "bad":
            kinds[f"bad: {p.bad_kind}"] += 1
            continue
        kinds[f"endpoint: {p.endpoint}{' stream' if p.stream else ''}"] += 1
        kinds["feature: n > 1"] += p.num_choices > (2 if p.multi_prompt else 1)
        kinds["feature: multi-prompt completions"] += p.multi_prompt
        kinds["feature: stop strings"] += bool(p.stop)
        kinds["feature: logprobs"] += p.logprobs is not None
        kinds["feature: stream include_usage"] += p.include_usage
        kinds["feature: ignore_eos"] += p.ignore_eos
    order = ("category", "endpoint", "feature", "bad")
    kinds = Counter(dict(sorted(kinds.items(),
                                key=lambda kv: (order.index(kv[0].split(":")[0]), kv[0]))))
    everything = warm + outcomes
    results = Counter(o.result for o in outcomes)
    statuses = Counter(o.status for o in outcomes if o.status is not None and o.status >= 300)
    unexpected = [o for o in everything if o.result == "status" and o.status != 429]
    reasons: dict[str, list[str]] = {
        "malformed": [o.reason for o in everything if o.result == "malformed"],
        "no_end": [o.reason for o in everything if o.result == "no_end"],
        "bad_accepted": [o.reason for o in everything if o.result == "bad_accepted"],
        "unexpected_status": [o.reason for o in unexpected],
        "stream_error": [o.reason for o in everything if o.result == "stream_error"],
    }
    done = [o for o in outcomes if o.result == "ok"]
    tokens = sum(o.completion_tokens for o in done)
    disconnects = Counter(o.disconnect_done for o in outcomes if o.disconnect_done)
    late = sum(1 for o in outcomes if by_index[o.index].disconnect and not o.disconnect_done)
    failed = [f"{name}: {len(items)}" for name, items in reasons.items() if items]
    if kv.get("kv_usage") != 0:
        failed.append(f"KV blocks in use after the run: {kv.get('kv_usage')}"
                      + ("" if kv.get("idle") else " (server never idle)"))
    growth = rss.get("growth_pct")
    if growth is not None and growth > args.max_rss_growth:
        failed.append(f"RSS growth {growth:.2f}% > {args.max_rss_growth}%")
    return {
        "base_url": args.base_url,
        "model": args.model,
        "seed": args.seed,
        "num_requests": len(plans),
        "concurrency": args.concurrency,
        "warmup_requests": len(warm),
        "requests_by_kind": dict(kinds),
        "results": dict(sorted(results.items())),
        "non_2xx_status_counts": {str(k): v for k, v in sorted(statuses.items())},
        "disconnects_done": {"before_response": disconnects["before"],
                             "mid_stream": disconnects["mid"],
                             "planned_but_completed_first": late},
        "failure_counts": {name: len(items) for name, items in reasons.items()},
        "failure_examples": {name: items[:MAX_REASONS] for name, items in reasons.items()},
        "wall_time_s": wall,
        "completed_ok": len(done),
        "completion_tokens": tokens,
        "requests_per_s": len(done) / wall if wall > 0 else 0.0,
        "completion_tokens_per_s": tokens / wall if wall > 0 else 0.0,
        "latency_ms": summarize_ms([o.latency for o in done]),
        "rss": rss,
        "kv_after": kv,
        "failed": failed,
        "passed": not failed,
    }


def format_report(s: dict) -> str:
    def mb(kb):
        return "n/a" if kb is None else f"{kb / 1024:.1f} MiB"

    rows: list[tuple[str, object]] = [
        ("Requests (measured)", s["num_requests"]),
        ("Warm-up requests", s["warmup_requests"]),
        ("Concurrency", s["concurrency"]),
    ]
    rows += [(f"  {k}", v) for k, v in s["requests_by_kind"].items()]
    rows += [(f"Result: {k}", v) for k, v in s["results"].items()]
    rows += [(f"HTTP {k}", v) for k, v in s["non_2xx_status_counts"].items()]
    d = s["disconnects_done"]
    rows += [
        ("Disconnects before response", d["before_response"]),
        ("Disconnects mid-stream", d["mid_stream"]),
        ("Disconnect planned, completed first", d["planned_but_completed_first"]),
    ]
    rows += [(f"Failures: {k}", v) for k, v in s["failure_counts"].items()]
    rss, kv, lat = s["rss"], s["kv_after"], s["latency_ms"]
    growth = rss.get("growth_pct")
    rows += [
        ("Wall time (s)", f"{s['wall_time_s']:.2f}"),
        ("Completed OK", s["completed_ok"]),
        ("Requests/s (completed)", f"{s['requests_per_s']:.3f}"),
        ("Completion tokens/s", f"{s['completion_tokens_per_s']:.2f}"),
        ("Latency mean/median/p99 (ms)",
         f"{lat['mean']:.0f}/{lat['median']:.0f}/{lat['p99']:.0f}"),
        ("RSS before (after warm-up)", mb(rss.get("before_kb"))),
        ("RSS after", mb(rss.get("after_kb"))),
        ("RSS peak during run", mb(rss.get("peak_kb"))),
        ("RSS growth", "n/a" if growth is None else f"{growth:+.2f}%"),
        ("Server idle after run", f"{kv.get('idle')} ({kv.get('waited_s', 0):.1f} s)"),
        ("Running / waiting after run", f"{kv.get('running')} / {kv.get('waiting')}"),
        ("KV usage ratio after run", kv.get("kv_usage")),
    ]
    width = max(len(name) for name, _ in rows)
    bar = "=" * (width + 22)
    lines = [bar, " Soak test ".center(width + 22, "="), bar]
    lines += [f"{name:<{width}}  {str(value):>20}" for name, value in rows]
    lines.append(bar)
    for name, items in s["failure_examples"].items():
        for item in items:
            lines.append(f"{name}: {item}")
    lines.append("RESULT: " + ("PASS" if s["passed"] else "FAIL: " + "; ".join(s["failed"])))
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


async def soak(args: argparse.Namespace) -> dict:
    runner = Runner(args)
    try:
        args.model, max_model_len = await server_info(runner, args)
        warm_plans = make_warmup(args, args.model)
        plans = make_plans(args, args.model, max_model_len)
        warm = await runner.run_all(warm_plans)
        await runner.wait_idle(args.idle_timeout)
        before = read_rss_kb(args.server_pid)
        peak = [before or 0]
        stop = asyncio.Event()
        sampler = asyncio.ensure_future(sample_rss(args.server_pid, peak, stop))
        start = time.perf_counter()
        outcomes = await runner.run_all(plans)
        wall = time.perf_counter() - start
        kv = await runner.wait_idle(args.idle_timeout)
        stop.set()
        await sampler
        after = read_rss_kb(args.server_pid)
        rss: dict = {"pid": args.server_pid, "before_kb": before, "after_kb": after,
                     "peak_kb": peak[0] or None, "growth_pct": None}
        if before and after:
            rss["growth_pct"] = (after - before) * 100.0 / before
        return summarize(args, plans, warm, outcomes, wall, rss, kv)
    finally:
        await runner.client.aclose()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:9977",
                        help="server root (a trailing /v1 is accepted)")
    parser.add_argument("--model", default=None,
                        help="model name to send (default: the first of /v1/models)")
    parser.add_argument("--api-key", default=None, help="sent as Authorization: Bearer KEY")
    parser.add_argument("--num-requests", type=int, default=200, help="measured requests")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight at once")
    parser.add_argument("--disconnect-share", type=float, default=0.1,
                        help="share of requests whose client closes the connection early")
    parser.add_argument("--bad-share", type=float, default=0.05,
                        help="share of bad requests (each must get a 4xx error body)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the request mix")
    parser.add_argument(
        "--warmup", type=int, default=32,
        help="good requests sent (at --concurrency) before RSS 'before' is read: the first "
        "requests allocate caches and batch buffers, so RSS growth then measures leaks, not "
        "warm-up; their answers are checked too")
    parser.add_argument("--server-pid", type=int, default=None,
                        help="the server's PID, to read its VmRSS from /proc/PID/status")
    parser.add_argument("--max-rss-growth", type=float, default=5.0,
                        help="most RSS growth (%%) from after warm-up to after the run")
    parser.add_argument("--max-model-len", type=int, default=2048,
                        help="context length to assume when /v1/models does not say")
    parser.add_argument("--timeout", type=float, default=180.0,
                        help="seconds one request may take before it counts as without an end")
    parser.add_argument("--idle-timeout", type=float, default=60.0,
                        help="seconds to wait after the run for 0 running and 0 waiting")
    parser.add_argument("--json-out", default=None, help="also write the numbers here")
    args = parser.parse_args(argv)
    if args.concurrency < 1 or args.num_requests < 1 or args.warmup < 0:
        parser.error("--concurrency and --num-requests must be at least 1, --warmup >= 0")
    if not (0 <= args.bad_share and 0 <= args.disconnect_share
            and args.bad_share + args.disconnect_share <= 1):
        parser.error("--bad-share and --disconnect-share must be >= 0 and sum to at most 1")
    base_url = args.base_url.rstrip("/")
    args.base_url = base_url[: -len("/v1")] if base_url.endswith("/v1") else base_url
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    summary = asyncio.run(soak(args))
    print(format_report(summary))
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
            f.write("\n")
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
