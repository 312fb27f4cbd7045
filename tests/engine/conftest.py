"""Fixtures of the engine tests: transformers' SmolLM2, the engine on it, tiny random models."""

from __future__ import annotations

import gc
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # hf_oracle, under any pytest import mode

from hf_oracle import TINY_SPECS, build_tiny_model, load_hf_smollm2  # noqa: E402

# The shared engine on the default model: room for every test of the sampling module.
SMOL_MAX_MODEL_LEN = 1024
SMOL_NUM_BLOCKS = 256


@pytest.fixture(scope="session")
def smol_hf():
    """(model, tokenizer) of transformers on the default model's GGUF file (slow: once)."""
    return load_hf_smollm2()


@pytest.fixture(scope="session")
def smol_llm() -> Iterator[object]:
    """The engine's offline LLM on the default model."""
    from xllm.engine.llm import LLM

    llm = LLM("default", max_model_len=SMOL_MAX_MODEL_LEN, num_blocks=SMOL_NUM_BLOCKS)
    yield llm
    del llm
    gc.collect()


@pytest.fixture(scope="session")
def tiny_folders(tmp_path_factory: pytest.TempPathFactory, smol_hf) -> dict[str, Path]:
    """Hugging Face folders of small random-weight models, with SmolLM2's tokenizer."""
    _, tokenizer = smol_hf
    root = tmp_path_factory.mktemp("tiny_models")
    return {
        name: build_tiny_model(spec, root / name, tokenizer) for name, spec in TINY_SPECS.items()
    }
