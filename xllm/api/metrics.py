"""The metric registry behind GET /metrics: counters, histograms, Prometheus text rendering.

Everything here runs on the event loop (no locks). Per-token cost is one clock read and one
bucket search per engine output. No label ever carries request content.
"""

import time
from bisect import bisect_left
from collections.abc import Mapping

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
CLIENT_CLOSED = 499  # nginx's status for a request whose client went away; no body is sent

# Seconds. TTFT and e2e span CPU prefill of long prompts; ITL is one decode step.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
               5.0, 10.0)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)

# Endpoints counted under their own name; any other path is "other" (bounded cardinality).
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/sample", "/v1/models", "/health",
             "/metrics", "/sleep", "/wakeup")


class Histogram:
    """Cumulative-bucket histogram in Prometheus' sense (le = upper bound, +Inf implied)."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.bounds = tuple(sorted(buckets))
        self.counts = [0] * (len(self.bounds) + 1)  # last: above every bound
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for bound, n in zip(self.bounds, self.counts):
            running += n
            out.append(f'{name}_bucket{{le="{_number(bound)}"}} {running}')
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        out.append(f"{name}_sum {_number(self.sum)}")
        out.append(f"{name}_count {self.count}")
        return out


class RequestTimer:
    """One generation request's clock: TTFT at its first engine output, ITL between later
    outputs of the same prompt, e2e and token counts when it finishes."""

    __slots__ = ("metrics", "start", "first", "last", "failed", "disconnected")

    def __init__(self, metrics: "Metrics") -> None:
        self.metrics = metrics
        self.start = time.perf_counter()
        self.first: float | None = None
        self.last: dict[int, float] = {}
        self.failed = False  # set when a stream ends in an error event after a 200
        self.disconnected = False  # set when the client left before the end

    def output(self, prompt_index: int = 0) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = now
            self.metrics.ttft.observe(now - self.start)
        prev = self.last.get(prompt_index)
        if prev is not None:
            self.metrics.itl.observe(now - prev)
        self.last[prompt_index] = now

    def finish(self, prompt_tokens: int, generation_tokens: int) -> None:
        """A request served to the end."""
        self.metrics.e2e.observe(time.perf_counter() - self.start)
        self.count_tokens(prompt_tokens, generation_tokens)

    def count_tokens(self, prompt_tokens: int, generation_tokens: int) -> None:
        """Tokens a request used, whether it ended well or not."""
        self.metrics.prompt_tokens += prompt_tokens
        self.metrics.generation_tokens += generation_tokens


class Metrics:
    """The server's counters and histograms; engine gauges are read at render time."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, str], int] = {}  # (endpoint, status, outcome)
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.sample_requests = 0
        self.sample_points = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)

    def timer(self) -> RequestTimer:
        return RequestTimer(self)

    def count_sample(self, points: int) -> None:
        """A /v1/sample request and its number of sample points."""
        self.sample_requests += 1
        self.sample_points += points

    def count_request(self, path: str, status: int, failed: bool = False,
                      disconnected: bool = False) -> None:
        endpoint = path if path in ENDPOINTS else "other"
        if disconnected or status == CLIENT_CLOSED:
            outcome = "disconnected"
        else:
            outcome = "error" if failed or status >= 400 else "success"
        key = (endpoint, str(status), outcome)
        self.requests[key] = self.requests.get(key, 0) + 1

    def render(self, stats: Mapping[str, int], sleeping: bool = False) -> str:
        """The exposition text; `stats` is the engine's stats() dict."""
        total = stats.get("num_total_blocks", 0) or 0
        free = stats.get("num_free_blocks", total) or 0
        queries = stats.get("prefix_cache_queries", 0) or 0
        hits = stats.get("prefix_cache_hits", 0) or 0
        out: list[str] = []

        def family(name: str, kind: str, help_text: str, lines: list[str]) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(lines)

        def single(name: str, kind: str, help_text: str, value: float) -> None:
            family(name, kind, help_text, [f"{name} {_number(value)}"])

        family("xllm_requests_total", "counter",
               "HTTP requests by endpoint, status code and outcome (success, error, or "
               "disconnected: the client left before the end).",
               [f'xllm_requests_total{{endpoint="{e}",status="{s}",outcome="{o}"}} {n}'
                for (e, s, o), n in sorted(self.requests.items())])
        single("xllm_num_requests_running", "gauge", "Sequences being run by the engine.",
               stats.get("num_running", 0))
        single("xllm_num_requests_waiting", "gauge", "Sequences waiting to be scheduled.",
               stats.get("num_waiting", 0))
        single("xllm_kv_cache_usage_ratio", "gauge", "Fraction of KV-cache blocks in use.",
               (total - free) / total if total else 0.0)
        single("xllm_prefix_cache_queries_total", "counter",
               "Prompt blocks looked up in the prefix cache.", queries)
        single("xllm_prefix_cache_hits_total", "counter",
               "Prompt blocks found in the prefix cache.", hits)
        single("xllm_prefix_cache_hit_rate", "gauge",
               "Prefix-cache hits / queries since start (0 with no queries).",
               hits / queries if queries else 0.0)
        single("xllm_num_preemptions_total", "counter", "Sequences preempted by the scheduler.",
               stats.get("num_preemptions", 0))
        single("xllm_sleeping", "gauge", "1 while the model is asleep.", 1 if sleeping else 0)
        single("xllm_prompt_tokens_total", "counter", "Prompt tokens of finished requests.",
               self.prompt_tokens)
        single("xllm_generation_tokens_total", "counter",
               "Generated tokens of finished requests.", self.generation_tokens)
        single("xllm_sample_requests_total", "counter", "/v1/sample requests taken.",
               self.sample_requests)
        single("xllm_sample_points_total", "counter",
               "Sample points (selector matches) of /v1/sample requests.", self.sample_points)
        family("xllm_time_to_first_token_seconds", "histogram",
               "Time from request arrival to its first engine output.",
               self.ttft.lines("xllm_time_to_first_token_seconds"))
        family("xllm_inter_token_latency_seconds", "histogram",
               "Time between consecutive engine outputs of one prompt.",
               self.itl.lines("xllm_inter_token_latency_seconds"))
        family("xllm_e2e_request_latency_seconds", "histogram",
               "Time from request arrival to its last output.",
               self.e2e.lines("xllm_e2e_request_latency_seconds"))
        return "\n".join(out) + "\n"


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    return repr(float(value))


TIMER_KEY = "xllm.timer"


def request_timer(scope: dict, metrics: Metrics) -> RequestTimer:
    """The timer MetricsMiddleware started for this request (a new one if none)."""
    timer = scope.get(TIMER_KEY)
    return timer if timer is not None else metrics.timer()


class MetricsMiddleware:
    """Pure ASGI middleware: starts each request's timer at arrival and counts the request
    by path and response status once it is over (streams included)."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        timer = scope[TIMER_KEY] = self.metrics.timer()
        status = 500

        async def send_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.count_request(scope.get("path", ""), status, timer.failed,
                                       timer.disconnected)
