"""Models and a tokenizer made on the spot: no download, no model package.

`build_tokenizer` trains a small byte-level BPE on built-in English text (well under a
second); `build_model` writes a random-weight transformers Llama or Qwen2 folder with it
(config, safetensors, tokenizer, generation config). Used where no model files exist: the
Triton engine test on the CPU, the CUDA engine test and the GPU throughput benchmark.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))  # hf_oracle, also when imported from elsewhere

from hf_oracle import CHAT_QUESTIONS, LONG_TEXT  # noqa: E402

BOS = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [BOS, IM_START, IM_END]  # ids 0, 1, 2
TOKENIZER_VOCAB = 1024

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

EXTRA_TEXT = """\
A quick brown fox jumps over the lazy dog, while five boxing wizards jump quickly.
Numbers such as 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 42, 100 and 2024 appear in prose too.
The weather today is sunny with a light breeze from the west; tomorrow it may rain.
She asked: "Where is the train station?" He answered, pointing: "Two streets that way."
Python code looks like this: def add(a, b): return a + b  # a comment
The capital of France is Paris, the capital of Italy is Rome, and Spain's is Madrid.
Water boils at one hundred degrees Celsius at sea level, and freezes at zero degrees.
"""

# Shapes: the "tiny" ones are in the range of hf_oracle's TINY_SPECS (heads of 16), the "-hd64"
# ones have heads of 64 as real models do; "qwen2-0.5b" is Qwen2-0.5B's own.
SHAPES: dict[str, dict] = {
    "tiny": dict(
        hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=1088, max_position_embeddings=1024,
        tie_word_embeddings=False, rope_theta=10000.0,
    ),
    "tiny-gqa4": dict(
        hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=8,
        num_key_value_heads=2, vocab_size=1152, max_position_embeddings=1024,
        tie_word_embeddings=True, rope_theta=10000.0,
    ),
    "tiny-hd64": dict(
        hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=1088, max_position_embeddings=1024,
        tie_word_embeddings=False, rope_theta=10000.0,
    ),
    "tiny-hd64-gqa4": dict(
        hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, vocab_size=1152, max_position_embeddings=1024,
        tie_word_embeddings=True, rope_theta=10000.0,
    ),
    "qwen2-0.5b": dict(
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
        tie_word_embeddings=True, rope_theta=1000000.0,
    ),
}  # fmt: skip


def training_text() -> list[str]:
    """The built-in English text the tokenizer learns from (a few KB)."""
    return [LONG_TEXT, EXTRA_TEXT, *CHAT_QUESTIONS]


def build_tokenizer(folder: Path | None = None, vocab_size: int = TOKENIZER_VOCAB):
    """A byte-level BPE PreTrainedTokenizerFast trained here; saved to `folder` if given.

    Special tokens: <|endoftext|> (BOS and padding, id 0), <|im_start|> (1) and
    <|im_end|> (2, EOS); a ChatML chat template.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(training_text(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=IM_END,
        pad_token=BOS,
        additional_special_tokens=[IM_START],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    if folder is not None:
        tokenizer.save_pretrained(folder)
    return tokenizer


def hf_config(kind: str, shape: dict, tokenizer, dtype: torch.dtype):
    """The transformers config of a `kind` ("llama" or "qwen2") model of `shape`."""
    from transformers import LlamaConfig, Qwen2Config

    shape = dict(shape)
    assert shape["vocab_size"] >= len(tokenizer), "the model's vocab must hold the tokenizer's"
    theta = shape.pop("rope_theta", 10000.0)
    common = dict(
        **shape,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": theta},
        dtype=str(dtype).removeprefix("torch."),
    )
    if kind == "llama":
        return LlamaConfig(**common)
    if kind == "qwen2":
        return Qwen2Config(**common, use_sliding_window=False)
    raise ValueError(f"unknown model kind {kind!r} (llama or qwen2)")


def random_weights(
    config, seed: int, dtype: torch.dtype, device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """Random weights under transformers' parameter names, scaled to keep activations O(1).

    A matrix [out, in] gets std 1/sqrt(in) (times a gain), so that each layer adds
    to the residual stream about as much as it holds, and the logits spread by a few
    units: greedy continuations that vary, not one token repeated. Norm gains are
    around 1 and differ; Qwen2's q/k/v biases are small.
    """
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        shapes = {
            name: p.shape for name, p in AutoModelForCausalLM.from_config(config).named_parameters()
        }  # tied weights appear once, under the embedding's name
    generator = torch.Generator(device).manual_seed(seed)
    weights = {}
    for name, shape in shapes.items():
        noise = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
        if name.endswith("norm.weight"):
            value = 1.0 + 0.1 * noise
        elif name.endswith(".bias"):
            value = 0.1 * noise
        elif "embed_tokens" in name:
            value = noise  # rows of norm ~sqrt(hidden): the first RMSNorm rescales them anyway
            if getattr(config, "tie_word_embeddings", False):  # also the LM head
                value = noise * 3.0 / math.sqrt(shape[1])
        elif name == "lm_head.weight":
            value = noise * 3.0 / math.sqrt(shape[1])
        else:  # projections [out, in]
            value = noise * 1.5 / math.sqrt(shape[1])
        weights[name] = value.to(dtype).cpu().contiguous()
    return weights


def build_model(
    folder: Path,
    kind: str,
    shape: str | dict,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    tokenizer=None,
    device: str | torch.device = "cpu",
) -> Path:
    """Write a random-weight `kind` ("llama" or "qwen2") model of `shape` (a SHAPES name or
    a dict of config fields) into `folder`: config.json, model.safetensors, the tokenizer
    (built here unless given) and generation_config.json with EOS. `device` draws the
    random numbers (a GPU is much faster for the 0.5B shape). Returns `folder`."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shape = SHAPES[shape] if isinstance(shape, str) else shape
    tokenizer = tokenizer or build_tokenizer()
    config = hf_config(kind, shape, tokenizer, dtype)
    config.save_pretrained(folder)
    weights = random_weights(config, seed, dtype, device)
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(folder)
    generation = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": [tokenizer.eos_token_id],
        "pad_token_id": tokenizer.pad_token_id,
        "do_sample": False,
    }
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return folder


def window_prompts(tokenizer, lengths: list[int]) -> list[list[int]]:
    """Prompts of exactly these lengths from LONG_TEXT (BOS first), different windows each."""
    from hf_oracle import text_prompts as windows

    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    return windows(encode, tokenizer.bos_token_id, lengths)


def random_prompts(
    tokenizer, lengths: list[int], generator: torch.Generator
) -> list[list[int]]:
    """Prompts of random ordinary tokens (no special ones) of these lengths."""
    low, high = len(SPECIAL_TOKENS), len(tokenizer)
    return [torch.randint(low, high, (n,), generator=generator).tolist() for n in lengths]


@torch.no_grad()
def check_logits_vary(folder: Path, prompt: list[int], device: str = "cpu") -> dict[str, float]:
    """Load the folder with transformers and check that its logits are not degenerate:
    they spread (std across the vocab), the greedy next tokens differ across positions.
    Returns the measured figures; raises AssertionError when degenerate."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()
    logits = model(torch.tensor([prompt], device=device)).logits[0].float()
    spread = float(logits.std(dim=-1).mean())
    distinct = len(set(logits.argmax(dim=-1).tolist()))
    assert torch.isfinite(logits).all(), "non-finite logits"
    assert spread > 0.5, f"logits barely vary across the vocabulary (std {spread:.3f})"
    assert distinct >= min(4, len(prompt) // 4), f"only {distinct} distinct greedy tokens"
    return {"logit_std": spread, "distinct_argmax": distinct, "positions": len(prompt)}
