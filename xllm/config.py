"""Configuration: what `xllm serve` flags set, in one dataclass for the engine and one for
the HTTP server. Each default is written here once."""

from dataclasses import dataclass


@dataclass
class EngineConfig:
    model: str = "default"
    max_model_len: int | None = None  # None: the model's own context length
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512  # small chunks keep time to first token short
    block_size: int = 16
    num_blocks: int | None = None  # None: derived from kv_cache_memory
    kv_cache_memory: int | None = None  # bytes for K and V of all layers; None: see below
    cpu_kv_cache_memory: int = 1 << 30  # the CPU's default (CUDA: gpu_memory_utilization)
    gpu_memory_utilization: float = 0.9  # share of the GPU's memory the engine may fill
    device: str = "auto"  # "auto": cuda when torch sees a GPU, else cpu
    dtype: str = "auto"  # "auto": bfloat16 on CUDA, float32 on the CPU
    # "auto": a GGUF file's quantized weights stay quantized, a folder keeps its dtype;
    # "int8": weight-only int8 per output row, made at load time; "none": all in `dtype`
    quantization: str = "auto"
    # float32 linears on the CPU: "highest" multiplies in float32; "medium" lets them round
    # x and W to bfloat16 (sums in float32) where that is faster, as torch's setting of the name
    matmul_precision: str = "highest"
    # the KV cache's dtype: "auto" is the model's; "bfloat16" halves the cache's bytes (the
    # keys and values are rounded to bfloat16 as they are written, attention math stays as is)
    kv_cache_dtype: str = "auto"
    enforce_eager: bool = False  # True: no CUDA graphs for decode steps
    seed: int = 0
    enable_prefix_caching: bool = True
    num_threads: int | None = None  # torch intra-op threads; None: all cores
    max_n: int = 128  # most choices of one request (OpenAI's limit)
    max_beam_width: int = 8  # most beams of one beam search
    limit_images_per_prompt: int = 8
    image_min_pixels: int | None = None  # None: the model's preprocessor_config.json
    image_max_pixels: int | None = None  # (both bound an image after resizing)
    max_image_pixels: int | None = None  # largest decoded image; None: the default of images.py


@dataclass
class ServerConfig:
    served_model_name: str
    host: str = "127.0.0.1"
    port: int = 9977
    max_concurrent_requests: int = 256  # sequences in flight: choices, prompts and beams
    max_request_bytes: int | None = None  # larger bodies are answered 413; None: as below
    request_body_timeout: float = 30.0  # seconds to receive a whole body
    api_key: str | None = None  # None: the server is open to anyone who can reach it
    allowed_origins: tuple[str, ...] = ()  # CORS; empty: no CORS headers
    allowed_hosts: tuple[str, ...] = ()  # accepted Host headers; empty: any
    shutdown_timeout: float = 30.0  # seconds in-flight requests get to finish on SIGTERM
    allowed_media_domains: tuple[str, ...] = ()  # hosts image URLs may name; empty: any
    allowed_local_media_path: str | None = None  # file:// image URLs only under it; None: none
    media_fetch_timeout: float = 10.0  # seconds for one image URL's fetch
    max_image_bytes: int = 20 << 20  # largest image file (fetched, data: URL or local)

    def request_bytes_limit(self, vision: bool) -> int:
        """The body limit: 4 MiB, or for a vision model room for base64 images."""
        if self.max_request_bytes is not None:
            return self.max_request_bytes
        return 64 << 20 if vision else 4 << 20
