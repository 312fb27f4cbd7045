"""Vision-language figures, each taken in one run:

- `encoder`: the engine's vision encoder beside transformers' on the same weights, time per
  image for a few image sizes (the weights of a model folder, or random ones in the shape of
  Qwen2.5-VL-7B's vision tower: `--shape 7b`);
- `serve`: a running vision server under 8 concurrent image requests, 8 concurrent text
  requests, and both at once (each image is a different random picture: no prefix-cache hit).

    python benchmarks/vision_bench.py encoder --shape 7b --sizes 224x224,448x448
    python benchmarks/vision_bench.py serve --base-url http://127.0.0.1:12345
"""

import argparse
import asyncio
import base64
import io
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import aiohttp
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from serve_bench import WORDS, post_json, print_result, resolve_model  # noqa: E402

SHAPE_7B = dict(depth=32, hidden_size=1280, num_heads=16, intermediate_size=3420,
                out_hidden_size=3584, fullatt_block_indexes=[7, 15, 23, 31])


def random_png(width: int, height: int, seed: int) -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def sizes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in item.split("x")) for item in text.split(",")]


def encoders(args: argparse.Namespace):
    """(ours, transformers') vision encoders on the same weights, and the image config."""
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
        Qwen2_5_VisionTransformerPretrainedModel,
    )

    from xllm.engine.images import ImageConfig
    from xllm.model.qwen2_5_vl import VisionEncoder

    if args.model:
        folder = Path(args.model)
        config = Qwen2_5_VLConfig.from_pretrained(folder).vision_config
        image_config = ImageConfig.from_folder(folder)
        from xllm.model.loader import iterate_weights

        state = {name.removeprefix("model.").removeprefix("visual."): tensor
                 for name, tensor in iterate_weights(folder)
                 if name.removeprefix("model.").startswith("visual.")}
    else:
        config = Qwen2_5_VLConfig(vision_config=SHAPE_7B).vision_config
        image_config = ImageConfig()
        state = None
    theirs = Qwen2_5_VisionTransformerPretrainedModel._from_config(config, dtype=torch.float32)
    if state is not None:
        theirs.load_state_dict(state, strict=False)
    ours = VisionEncoder(config)
    ours.load_state_dict(theirs.state_dict(), strict=False)
    return ours.eval(), theirs.eval(), image_config


def median_seconds(fns: list, repeats: int) -> list[float]:
    """Each function's median time, the functions taking turns (after one warm-up each)."""
    times: list[list[float]] = [[] for _ in fns]
    for round_ in range(repeats + 1):
        for fn, spent in zip(fns, times):
            start = time.perf_counter()
            fn()
            if round_:
                spent.append(time.perf_counter() - start)
    return [statistics.median(spent) for spent in times]


@torch.inference_mode()
def bench_encoder(args: argparse.Namespace) -> dict:
    from xllm.engine.images import process_image

    ours, theirs, image_config = encoders(args)
    result = {"threads": torch.get_num_threads(), "weights": args.model or "random, 7b shape"}
    for width, height in sizes(args.sizes):
        image = process_image(random_png(width, height, 0), image_config)
        pixels, grid = image.pixel_values, [image.grid_thw]
        a, b = median_seconds([partial(ours, pixels, grid),
                               partial(theirs, pixels, torch.tensor(grid))], args.repeats)
        got = ours(pixels, grid)
        want = theirs(pixels, torch.tensor(grid)).pooler_output
        key = f"{width}x{height} ({image.num_tokens} tokens)"
        result[f"{key} xllm ms"] = round(a * 1e3, 1)
        result[f"{key} transformers ms"] = round(b * 1e3, 1)
        result[f"{key} speedup"] = round(b / a, 2)
        result[f"{key} max abs diff"] = float((got - want).abs().max())
    return result


async def bench_serve(args: argparse.Namespace) -> dict:
    base = args.base_url.rstrip("/").removesuffix("/v1")
    url = base + "/v1/chat/completions"
    width, height = sizes(args.image_size)[0]
    rng = np.random.default_rng(args.seed)
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        model = args.model or await resolve_model(session, base)
        seed = iter(range(10**6))

        def image_body() -> dict:
            data = base64.b64encode(random_png(width, height, args.seed + next(seed))).decode()
            content = [{"type": "text", "text": "Describe this picture."},
                       {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}}]
            return {"model": model, "messages": [{"role": "user", "content": content}],
                    "max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True}

        def text_body() -> dict:
            text = " ".join(rng.choice(WORDS) for _ in range(args.text_words))
            return {"model": model, "messages": [{"role": "user", "content": text}],
                    "max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True}

        async def one(body: dict) -> tuple[float, int, int]:
            start = time.perf_counter()
            answer = await post_json(session, url, body)
            usage = answer["usage"]
            return time.perf_counter() - start, usage["prompt_tokens"], usage["completion_tokens"]

        async def load(bodies: list[dict], concurrency: int
                       ) -> tuple[float, list[tuple[float, int, int]]]:
            """Wall seconds and per-request results, `concurrency` requests in flight."""
            semaphore = asyncio.Semaphore(concurrency)

            async def limited(body: dict):
                async with semaphore:
                    return await one(body)

            start = time.perf_counter()
            results = await asyncio.gather(*(limited(body) for body in bodies))
            return time.perf_counter() - start, results

        await one(image_body())  # warm up
        n = args.num_requests
        result: dict = {"model": model, "image": f"{width}x{height}",
                        "concurrency": args.concurrency, "requests per kind": n,
                        "max_tokens": args.max_tokens}
        image_bodies = [image_body() for _ in range(n)]
        alone = [await one(body) for body in image_bodies[: args.concurrency]]
        result["image request alone, mean s"] = round(statistics.mean(r[0] for r in alone), 3)
        result["image prompt tokens"] = alone[0][1]
        for name, bodies in (("image", [image_body() for _ in range(n)]),
                             ("text", [text_body() for _ in range(n)])):
            wall, rows = await load(bodies, args.concurrency)
            result[f"{name}: req/s"] = round(len(rows) / wall, 3)
            result[f"{name}: output tok/s"] = round(sum(r[2] for r in rows) / wall, 1)
            result[f"{name}: mean latency s"] = round(statistics.mean(r[0] for r in rows), 3)
        mixed = [image_body() for _ in range(n)] + [text_body() for _ in range(n)]
        wall, rows = await load(mixed, 2 * args.concurrency)
        result["mixed: req/s"] = round(len(rows) / wall, 3)
        result["mixed: output tok/s"] = round(sum(r[2] for r in rows) / wall, 1)
        result["mixed: image mean latency s"] = round(statistics.mean(r[0] for r in rows[:n]), 3)
        result["mixed: text mean latency s"] = round(statistics.mean(r[0] for r in rows[n:]), 3)
        return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = parser.add_subparsers(dest="mode", required=True)
    enc = modes.add_parser("encoder", help="the vision encoder beside transformers'")
    enc.add_argument("--model", help="a Qwen2.5-VL folder; default: random 7B-shaped weights")
    enc.add_argument("--shape", choices=["7b"], default="7b")
    enc.add_argument("--sizes", default="224x224,448x448,672x504")
    enc.add_argument("--repeats", type=int, default=3)
    serve = modes.add_parser("serve", help="a running vision server")
    serve.add_argument("--base-url", default="http://127.0.0.1:12345")
    serve.add_argument("--model", default=None)
    serve.add_argument("--concurrency", type=int, default=8)
    serve.add_argument("--num-requests", type=int, default=16)
    serve.add_argument("--image-size", default="448x448")
    serve.add_argument("--text-words", type=int, default=64)
    serve.add_argument("--max-tokens", type=int, default=32)
    serve.add_argument("--seed", type=int, default=0)
    serve.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args(argv)
    result = bench_encoder(args) if args.mode == "encoder" else asyncio.run(bench_serve(args))
    print_result(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
