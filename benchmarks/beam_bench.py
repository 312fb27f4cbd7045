"""Beam search against greedy decoding on a running server, in one run.

Two ratios (issue 8's targets in brackets):
- latency: one beam_width-W request of N new tokens / one greedy request of N tokens [<= 2];
- throughput: generated tokens/s of C_beam concurrent beam requests (every returned beam's
  tokens counted) / tokens/s of C_greedy concurrent greedy requests [>= 0.6].

Every request runs to exactly N tokens (ignore_eos), so both sides do the same work per beam.

    python benchmarks/beam_bench.py --base-url http://127.0.0.1:9977 --beam-width 4 \\
        --new-tokens 128 --beam-concurrency 8 --greedy-concurrency 32
"""

import argparse
import asyncio
import sys
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).parent))
from serve_bench import make_prompts, post_json, print_result, resolve_model  # noqa: E402


async def timed(session: aiohttp.ClientSession, url: str, bodies: list[dict]
                ) -> tuple[float, int]:
    """Send `bodies` at once; (seconds until the last answer, completion tokens)."""
    start = time.perf_counter()
    answers = await asyncio.gather(*(post_json(session, url, body) for body in bodies))
    return time.perf_counter() - start, sum(a["usage"]["completion_tokens"] for a in answers)


async def run(args: argparse.Namespace) -> dict:
    url = args.base_url.rstrip("/") + "/v1/completions"
    timeout = aiohttp.ClientTimeout(total=3600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        model = args.model or await resolve_model(session, args.base_url)
        prompts = make_prompts(max(args.greedy_concurrency, args.beam_concurrency) + 1,
                               args.input_len, args.seed)
        base = {"model": model, "max_tokens": args.new_tokens, "ignore_eos": True}
        greedy = [{**base, "prompt": p, "temperature": 0} for p in prompts]
        beam = [{**base, "prompt": p, "beam_width": args.beam_width} for p in prompts]
        await timed(session, url, greedy[:1] + beam[:1])  # warm-up
        one_greedy, _ = await timed(session, url, greedy[:1])
        one_beam, _ = await timed(session, url, beam[:1])
        greedy_s, greedy_tokens = await timed(session, url, greedy[: args.greedy_concurrency])
        beam_s, beam_tokens = await timed(session, url, beam[: args.beam_concurrency])
    return {
        "model": model,
        "new_tokens": args.new_tokens,
        "beam_width": args.beam_width,
        "one_greedy_s": round(one_greedy, 3),
        "one_beam_s": round(one_beam, 3),
        "latency_ratio": round(one_beam / one_greedy, 3),
        "greedy_concurrency": args.greedy_concurrency,
        "greedy_tokens_per_s": round(greedy_tokens / greedy_s, 1),
        "beam_concurrency": args.beam_concurrency,
        "beam_tokens_per_s": round(beam_tokens / beam_s, 1),
        "throughput_ratio": round((beam_tokens / beam_s) / (greedy_tokens / greedy_s), 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:9977")
    parser.add_argument("--model", default=None, help="default: the server's model")
    parser.add_argument("--beam-width", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--input-len", type=int, default=32, help="prompt words")
    parser.add_argument("--beam-concurrency", type=int, default=8)
    parser.add_argument("--greedy-concurrency", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print_result(asyncio.run(run(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
