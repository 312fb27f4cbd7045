"""A model folder's Hugging Face config: which architecture serves it, and its context length."""

from pathlib import Path

from transformers import AutoConfig

from xllm.model.llama import LlamaForCausalLM
from xllm.model.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration

ARCHITECTURES = {"llama": LlamaForCausalLM, "qwen2": LlamaForCausalLM,
                 "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration}


def load_hf_config(folder: Path):
    """The folder's config; ValueError for an architecture xllm does not serve."""
    config = AutoConfig.from_pretrained(folder)
    if config.model_type not in ARCHITECTURES:
        raise ValueError(f"unsupported architecture {config.model_type!r}")
    return config


def context_length(hf_config) -> int:
    return int(getattr(hf_config.get_text_config(), "max_position_embeddings", 2048))


def is_vision_model(hf_config) -> bool:
    return getattr(hf_config, "vision_config", None) is not None
