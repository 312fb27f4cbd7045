"""HTTP load generator for any OpenAI-compatible server: streaming latency and throughput."""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import dataclass, field

import aiohttp

# Short, common English words: nearly every BPE tokenizer maps each (with its leading
# space) to one token, so a prompt of N words is about N tokens.
WORDS = (
    "the of and to in is was for on are as with his they at be this from have or by one had "
    "not but what all were when we there can an your which their said if do will each about "
    "how up out them then she many some so these would other into has more her two like him "
    "see time could no make than first been its who now people my made over did down only way "
    "find use may water long little very after words called just where most know get through "
    "back much go good new write our used me man too any day same right look think also around "
    "another came come work three word must because does part even place well such here take "
    "why things help put years different away again off went old number great tell men say "
    "small every found still between name should home big give air line set own under read last "
    "never us left end along while might next sound below saw something thought both few those "
    "always looked show large often together asked house world going want school important "
    "until form food keep children feet land side without boy once animals life enough took "
    "sometimes four head above kind began almost live page got earth need far hand high year "
    "mother light parts country father let night following picture being study second eyes "
    "soon times story boys since white days ever paper hard near sentence better best across "
    "during today others however sure means knew try told young miles sun ways thing whole "
    "hear example heard several change answer room sea against top turned learn point city "
    "play toward five using himself usually money seen car morning given"
).split()


@dataclass
class RequestResult:
    """What one streamed request measured; times are seconds."""

    ok: bool = False
    error: str = ""
    prompt_tokens: int | None = None
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)


def make_prompts(num: int, input_len: int, seed: int) -> list[str]:
    """Fixed-seed synthetic prompts of about `input_len` tokens, all different."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(max(1, input_len))) for _ in range(num)]


def build_payload(args: argparse.Namespace, prompt: str) -> dict:
    payload: dict = {
        "model": args.model,
        "max_tokens": args.output_len,
        "temperature": args.temperature,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if args.endpoint == "chat":
        payload["messages"] = [{"role": "user", "content": prompt}]
    else:
        payload["prompt"] = prompt
    return payload


def chunk_text(chunk: dict, endpoint: str) -> str:
    """The generated text a chunk carries (all choices), or ""."""
    parts = []
    for choice in chunk.get("choices") or []:
        if endpoint == "chat":
            parts.append((choice.get("delta") or {}).get("content") or "")
        else:
            parts.append(choice.get("text") or "")
    return "".join(parts)


async def run_one(
    session: aiohttp.ClientSession, url: str, payload: dict, endpoint: str
) -> RequestResult:
    """Send one streaming request and time its chunks."""
    result = RequestResult()
    num_chunks = 0
    usage_tokens = None
    start = time.perf_counter()
    last = start
    try:
        async with session.post(url, json=payload) as resp:
            if resp.status != 200:
                body = await resp.text()
                result.error = f"HTTP {resp.status}: {body[:200]}"
                return result
            done = False
            async for raw in resp.content:
                line = raw.decode("utf-8").strip()
                if not line.startswith("data:"):
                    continue
                data = line[len("data:") :].strip()
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = f"stream error: {json.dumps(chunk['error'])[:200]}"
                    return result
                usage = chunk.get("usage")
                if usage:
                    usage_tokens = usage.get("completion_tokens")
                    result.prompt_tokens = usage.get("prompt_tokens")
                if chunk_text(chunk, endpoint):
                    now = time.perf_counter()
                    if num_chunks == 0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                    num_chunks += 1
            if not done:
                result.error = "stream ended without data: [DONE]"
                return result
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.latency = time.perf_counter() - start
    result.output_tokens = usage_tokens if usage_tokens is not None else num_chunks
    result.ok = num_chunks > 0
    if not result.ok:
        result.error = "no content in stream"
    return result


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]); 0.0 for an empty list."""
    if not values:
        return 0.0
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize_ms(values: list[float]) -> dict[str, float]:
    """Mean, median and p99 of second-valued samples, in milliseconds."""
    ms = [v * 1000.0 for v in values]
    mean = sum(ms) / len(ms) if ms else 0.0
    return {"mean": mean, "median": percentile(ms, 50), "p99": percentile(ms, 99)}


def summarize(results: list[RequestResult], duration: float, args: argparse.Namespace) -> dict:
    done = [r for r in results if r.ok]
    output_tokens = sum(r.output_tokens for r in done)
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    errors = sorted({r.error for r in results if not r.ok})
    return {
        "base_url": args.base_url,
        "endpoint": args.endpoint,
        "model": args.model,
        "concurrency": args.concurrency,
        "num_prompts": args.num_prompts,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "temperature": args.temperature,
        "seed": args.seed,
        "completed": len(done),
        "failed": len(results) - len(done),
        "duration_s": duration,
        "total_input_tokens": sum(r.prompt_tokens or 0 for r in done),
        "total_output_tokens": output_tokens,
        "output_tokens_per_s": output_tokens / duration if duration > 0 else 0.0,
        "requests_per_s": len(done) / duration if duration > 0 else 0.0,
        "ttft_ms": summarize_ms([r.ttft for r in done]),
        "tpot_ms": summarize_ms(tpot),
        "itl_ms": summarize_ms([gap for r in done for gap in r.itl]),
        "errors": errors[:10],
    }


def format_table(summary: dict) -> str:
    rows = [
        ("Endpoint", summary["endpoint"]),
        ("Concurrency", summary["concurrency"]),
        ("Completed requests", summary["completed"]),
        ("Failed requests", summary["failed"]),
        ("Duration (s)", f"{summary['duration_s']:.2f}"),
        ("Total input tokens", summary["total_input_tokens"]),
        ("Total output tokens", summary["total_output_tokens"]),
        ("Output tokens/s", f"{summary['output_tokens_per_s']:.2f}"),
        ("Requests/s", f"{summary['requests_per_s']:.3f}"),
    ]
    for key, label in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL")):
        for stat in ("mean", "median", "p99"):
            rows.append((f"{label} {stat} (ms)", f"{summary[key][stat]:.2f}"))
    width = max(len(name) for name, _ in rows)
    bar = "=" * (width + 16)
    lines = [bar, " Serving benchmark ".center(width + 16, "="), bar]
    lines += [f"{name:<{width}}  {value:>14}" for name, value in rows]
    lines.append(bar)
    for err in summary["errors"]:
        lines.append(f"error: {err}")
    return "\n".join(lines)


async def resolve_model(session: aiohttp.ClientSession, base_url: str) -> str:
    async with session.get(f"{base_url}/v1/models") as resp:
        resp.raise_for_status()
        body = await resp.json()
    return body["data"][0]["id"]


async def post_json(session: aiohttp.ClientSession, url: str, body: dict) -> dict:
    """POST `body`; the JSON answer, raising on a status other than 200."""
    async with session.post(url, json=body) as resp:
        data = await resp.json()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {data}")
        return data


def print_result(result: dict) -> None:
    """A benchmark's figures as aligned `name  value` lines, then as one JSON line."""
    width = max(len(key) for key in result)
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")
    print(json.dumps(result))


async def run_benchmark(args: argparse.Namespace) -> dict:
    """One concurrency level against one server: warm-up, measured requests, summary."""
    base_url = args.base_url.rstrip("/")
    if base_url.endswith("/v1"):
        base_url = base_url[: -len("/v1")]
    args.base_url = base_url
    path = "/v1/chat/completions" if args.endpoint == "chat" else "/v1/completions"
    url = base_url + path
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    # A connection per request: a pooled one that the server closed while idle (llama-server
    # does) fails the next request on it ("Can not write request body"), which is the
    # client's race, not the server's fault. Opening one on localhost costs well under 1 ms.
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        if not args.model:
            args.model = await resolve_model(session, base_url)
        prompts = make_prompts(args.warmup + args.num_prompts, args.input_len, args.seed)
        warm, measured = prompts[: args.warmup], prompts[args.warmup :]
        for prompt in warm:
            res = await run_one(session, url, build_payload(args, prompt), args.endpoint)
            if not res.ok:
                print(f"warmup request failed: {res.error}", file=sys.stderr)
        semaphore = asyncio.Semaphore(args.concurrency)

        async def limited(prompt: str) -> RequestResult:
            async with semaphore:
                return await run_one(session, url, build_payload(args, prompt), args.endpoint)

        start = time.perf_counter()
        results = await asyncio.gather(*(limited(p) for p in measured))
        duration = time.perf_counter() - start
    return summarize(list(results), duration, args)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--base-url",
        default="http://127.0.0.1:9977",
        help="server root (a trailing /v1 is accepted)",
    )
    parser.add_argument(
        "--model", default=None, help="model name to send (default: the first of /v1/models)"
    )
    parser.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    parser.add_argument("--concurrency", type=int, default=1, help="requests in flight at once")
    parser.add_argument("--num-prompts", type=int, default=16, help="measured requests")
    parser.add_argument("--input-len", type=int, default=128, help="approximate prompt tokens")
    parser.add_argument(
        "--output-len", type=int, default=128, help="max_tokens (sent with ignore_eos)"
    )
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic prompts")
    parser.add_argument(
        "--warmup", type=int, default=1, help="requests sent one by one before measuring"
    )
    parser.add_argument("--timeout", type=float, default=3600.0, help="per-request timeout (s)")
    parser.add_argument(
        "--json", dest="json_path", default=None, help="also write the results here"
    )
    args = parser.parse_args(argv)
    if args.concurrency < 1 or args.num_prompts < 1 or args.output_len < 1:
        parser.error("--concurrency, --num-prompts and --output-len must be at least 1")
    return args


def bench_args(**settings) -> argparse.Namespace:
    """This CLI's defaults with `settings` (same names as parse_args' fields) put over them."""
    args = parse_args([])
    for key, value in settings.items():
        if not hasattr(args, key):
            raise TypeError(f"unknown serve_bench setting: {key}")
        setattr(args, key, value)
    return args


async def run_level(base_url: str, concurrency: int, **settings) -> dict:
    """Run one concurrency level against `base_url`; its summary (as `summarize` returns it).

    `settings` overrides this CLI's other defaults: model, endpoint, num_prompts, input_len,
    output_len, temperature, seed, warmup, timeout.
    """
    return await run_benchmark(bench_args(base_url=base_url, concurrency=concurrency, **settings))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    summary = asyncio.run(run_benchmark(args))
    print(format_table(summary))
    text = json.dumps(summary, indent=2)
    if args.json_path:
        with open(args.json_path, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    else:
        print(text)
    return 0 if summary["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
