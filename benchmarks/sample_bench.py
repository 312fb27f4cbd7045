"""/v1/sample on a running server, in one run (issue 9's targets in brackets):

- cost: one /v1/sample request with M matches on an N-token prompt / one 1-token completion
  of the same prompt [<= 1.2]; each measured request has a prompt of its own (a cold prefix
  cache for both), the median of R rounds;
- concurrency: requests/s of C concurrent sample requests / requests/s of the same requests
  one at a time [>= 4]. `--shared-prefix` gives all of them one prompt, cached before either
  run (the prefix cache serves them; the points are run again), else each has its own.

    python benchmarks/sample_bench.py --base-url http://127.0.0.1:9977
"""

import argparse
import asyncio
import random
import statistics
import sys
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).parent))
from serve_bench import WORDS, post_json, print_result, resolve_model  # noqa: E402

MARK = "<emb_0>"


def marked_prompt(rng: random.Random, words: int, matches: int) -> str:
    """`words` random words with `matches` marks spread evenly through them."""
    out = [rng.choice(WORDS) for _ in range(words)]
    for i in range(matches):
        out.insert((i + 1) * len(out) // (matches + 1), MARK)
    return " ".join(out)


async def timed(session: aiohttp.ClientSession, url: str, body: dict) -> float:
    """Seconds one request took."""
    start = time.perf_counter()
    await post_json(session, url, body)
    return time.perf_counter() - start


async def run(args: argparse.Namespace) -> dict:
    base = args.base_url.rstrip("/")
    rng = random.Random(args.seed)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600)) as session:
        model = args.model or await resolve_model(session, base)

        def sample_body(prompt: str) -> dict:
            return {"model": model, "prompt": prompt, "logprobs": 5,
                    "selector": {"type": "literal", "value": MARK}}

        def prompt() -> str:
            return marked_prompt(rng, args.words, args.matches)

        await timed(session, base + "/v1/sample", sample_body(prompt()))  # warm-up
        samples, completions = [], []
        for _ in range(args.rounds):
            text = prompt()
            samples.append(await timed(session, base + "/v1/sample", sample_body(text)))
            text = prompt()
            completions.append(await timed(session, base + "/v1/completions", {
                "model": model, "prompt": text, "max_tokens": 1, "temperature": 0}))
        shared = prompt()
        bodies = [sample_body(shared if args.shared_prefix else prompt())
                  for _ in range(2 * args.concurrency)]
        if args.shared_prefix:  # cached for both runs alike
            await timed(session, base + "/v1/sample", bodies[0])
        start = time.perf_counter()
        for b in bodies[: args.concurrency]:
            await timed(session, base + "/v1/sample", b)
        serial = args.concurrency / (time.perf_counter() - start)
        start = time.perf_counter()
        await asyncio.gather(*(timed(session, base + "/v1/sample", b)
                               for b in bodies[args.concurrency :]))
        concurrent = args.concurrency / (time.perf_counter() - start)
    sample_s, completion_s = statistics.median(samples), statistics.median(completions)
    return {
        "model": model,
        "prompt_words": args.words,
        "matches": args.matches,
        "sample_s": round(sample_s, 3),
        "completion_1_token_s": round(completion_s, 3),
        "cost_ratio": round(sample_s / completion_s, 3),
        "shared_prefix": args.shared_prefix,
        "concurrency": args.concurrency,
        "serial_req_per_s": round(serial, 2),
        "concurrent_req_per_s": round(concurrent, 2),
        "concurrency_ratio": round(concurrent / serial, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:9977")
    parser.add_argument("--model", default=None, help="default: the server's model")
    parser.add_argument("--words", type=int, default=940, help="about 1,000 tokens")
    parser.add_argument("--matches", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--shared-prefix", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print_result(asyncio.run(run(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
