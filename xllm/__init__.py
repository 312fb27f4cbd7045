"""xllm: an OpenAI-compatible LLM inference server built on its own kernels."""

__version__ = "0.1.0"
