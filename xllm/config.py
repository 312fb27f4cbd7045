"""Engine configuration: what `xllm serve` flags set, in one dataclass."""

from dataclasses import dataclass


@dataclass
class EngineConfig:
    model: str = "default"
    served_model_name: str | None = None
    max_model_len: int | None = None  # None: the model's own context length
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512  # small chunks keep time to first token short
    block_size: int = 16
    num_blocks: int | None = None  # None: derived from kv_cache_memory
    kv_cache_memory: int = 1 << 30  # bytes for K and V of all layers
    dtype: str = "float32"
    seed: int = 0
    enable_prefix_caching: bool = True
    num_threads: int | None = None  # torch intra-op threads; None: all cores
